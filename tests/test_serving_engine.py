"""The serving engine (finetune/serving): continuous batching over the ONNX Runtime and torch backends."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model_dir, run_cli

from finetune.serving import (
    Engine,
    EngineStats,
    EngineStopped,
    FinalEvent,
    PromptEvent,
    QueueFull,
    Request,
    RequestError,
    TokenEvent,
)

PROMPTS = ["Title:", "Title: Lemon cake", "Serves 4 people with", "Ingredients: 2 cups flour, 1 cup sugar and"]
NEW_TOKENS = 24
DELIMITER = "=" * 20 + "\n"


def context_dependent_model(path: Path, architecture: str) -> Path:
    """A tiny model without dropout whose weights are large enough that its tokens depend on the whole context.

    (At the default init scale it repeats the last prompt token forever, which any engine gets right.)
    """
    import torch
    from transformers import AutoModelForCausalLM

    make_model_dir(path, architecture, dropout=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.15, generator=generator)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return context_dependent_model(tmp_path_factory.mktemp("serving") / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="module")
def onnx_dir(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serving-onnx") / "onnx"
    run_cli("export", "--checkpoint", model_dir, "--format", "onnx", "--output", out)
    return out


@pytest.fixture(scope="module")
def backends(model_dir, onnx_dir) -> dict:
    from finetune.serving.onnx_backend import OnnxBackend
    from finetune.serving.torch_backend import TorchBackend

    return {"torch": TorchBackend.load(str(model_dir)), "onnx": OnnxBackend.load(onnx_dir)}


@pytest.fixture(params=["torch", "onnx"])
def backend(request, backends):
    return backends[request.param]


@pytest.fixture(scope="module")
def generated_texts(model_dir) -> list[str]:
    """`finetune generate --temperature 0`'s continuation of each prompt, each decoded alone."""
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    out = run_cli(
        "generate",
        "--checkpoint",
        model_dir,
        *prompts,
        "--temperature",
        0,
        "--max-new-tokens",
        NEW_TOKENS,
        "--batch-size",
        1,
        "--no-include-prompt",
        "--no-stream",
    ).stdout
    return [text.removesuffix("\n") for text in out.split(DELIMITER)[:-1]]


class Slow:
    """A backend whose decode steps take a few ms longer, so staggered submissions land mid-decode.

    eos_token_id can be overridden to end a request with finish_reason "stop" at a chosen token.
    """

    def __init__(self, inner, delay: float = 0.004, eos_token_id: int | None = None):
        self.inner = inner
        self.delay = delay
        self.eos_token_id = inner.eos_token_id if eos_token_id is None else eos_token_id

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, tokens, mask, past):
        time.sleep(self.delay)
        return self.inner.step(tokens, mask, past)


def token_ids(handle) -> tuple[list[int], FinalEvent]:
    tokens, final, _ = handle.result(timeout=60)
    return [t.token_id for t in tokens], final


def greedy(backend, prompt: str, **fields) -> Request:
    return Request(backend.encode(prompt), **{"max_tokens": NEW_TOKENS, "temperature": 0, **fields})


def alone_staggered_together(backend) -> tuple[list, list, list, EngineStats]:
    """Each prompt's greedy tokens alone, submitted one after another while the earlier ones decode
    (each newcomer joins the running batch), and submitted all at once (prefilled together)."""
    engine = Engine(Slow(backend), max_batch_size=8)
    try:
        alone = [token_ids(engine.submit(greedy(backend, p)))[0] for p in PROMPTS]
        assert engine.stats.max_batch_size_seen == 1
        # Prompt lengths 7, 20, 2, 8 tokens: newcomers both longer than the running batch (its past is
        # padded) and shorter (theirs is).
        order = [1, 3, 0, 2]
        handles, firsts = {}, {}
        for i in order:
            handles[i] = engine.submit(greedy(backend, PROMPTS[i]))
            first = handles[i].next_event(timeout=60)
            assert isinstance(first, TokenEvent)
            firsts[i] = first.token_id
        staggered = [[firsts[i], *token_ids(handles[i])[0]] for i in range(len(PROMPTS))]
        together = [token_ids(h)[0] for h in [engine.submit(greedy(backend, p)) for p in PROMPTS]]
    finally:
        engine.stop(5)
    return alone, staggered, together, engine.stats


def test_greedy_is_the_same_alone_batched_and_as_generate(backend, generated_texts):
    alone, staggered, together, stats = alone_staggered_together(backend)
    assert staggered == alone and together == alone
    assert [backend.decode(a) for a in alone] == generated_texts and backend.batch_invariant
    assert stats.max_batch_size_seen > 1 and stats.joined_while_decoding >= 1
    assert stats.batch_size == 0 and stats.queue_depth == 0  # every finished request left the batch
    assert stats.finished == {"length": 3 * len(PROMPTS)}
    assert stats.tokens_generated == 3 * len(PROMPTS) * NEW_TOKENS
    ttft, per_token = stats.take_samples()
    assert len(ttft) == 3 * len(PROMPTS) and len(per_token) == 3 * len(PROMPTS) * (NEW_TOKENS - 1)


def test_greedy_batched_equals_alone_on_llama(tmp_path_factory):
    """Rotary positions and grouped KV heads: left padding and merging must not move a row's positions."""
    from finetune.serving.onnx_backend import OnnxBackend
    from finetune.serving.torch_backend import TorchBackend

    model = context_dependent_model(tmp_path_factory.mktemp("serving-llama") / "tiny-llama", "llama")
    onnx = model.parent / "onnx"
    run_cli("export", "--checkpoint", model, "--format", "onnx", "--output", onnx)
    results = {}
    for backend in (TorchBackend.load(str(model)), OnnxBackend.load(onnx)):
        alone, staggered, together, stats = alone_staggered_together(backend)
        assert staggered == alone and together == alone and stats.joined_while_decoding >= 1, backend.name
        results[backend.name] = alone
    assert results["torch"] == results["onnx"]


def test_int8_exports_are_batch_invariant(model_dir, onnx_dir):
    """int8 exports, fused or --no-optimize, quantize each row's activations on their own: a row's logits are
    bit-identical alone and in a batch, so batched greedy == alone. Manifests of earlier int8 exports (one
    activation scale per tensor; MatMulNBits) say they are not."""
    import numpy as np

    from finetune.onnx_quantize import batch_invariant
    from finetune.serving.onnx_backend import OnnxBackend

    int8 = ["export", "--checkpoint", model_dir, "--format", "onnx", "--quantize", "int8"]
    for name, extra in (("int8", []), ("int8-plain", ["--no-optimize"])):
        out = onnx_dir.parent / name
        run_cli(*int8, *extra, "--output", out)
        backend = OnnxBackend.load(out)
        assert backend.batch_invariant, name
        ids = backend.encode(" ".join(PROMPTS))
        rows = [ids[i : i + 6] for i in range(4)]  # equal lengths: no padding, so "alone" and "batched" match
        together, past = backend.prefill(rows, all_logits=True)
        step, _ = backend.step(np.array([r[-1] for r in rows]), np.ones((4, 7), np.int64), past)
        for i, row in enumerate(rows):
            alone, alone_past = backend.prefill([row], all_logits=True)
            assert np.array_equal(alone[0], together[i]), (name, i)
            alone_step, _ = backend.step(np.array([row[-1]]), np.ones((1, 7), np.int64), alone_past)
            assert np.array_equal(alone_step[0], step[i]), (name, i)
        alone, staggered, together_ids, _ = alone_staggered_together(backend)
        assert staggered == alone and together_ids == alone, name
    assert not batch_invariant("dynamic int8 (MatMulInteger, one scale per weight tensor, int8 activations)")
    assert batch_invariant(None)


def test_prefill_groups_keep_echo_alone_and_bound_their_size(monkeypatch):
    from finetune.serving import engine as engine_module
    from finetune.serving.requests import Handle

    def handle(length: int, echo: bool = False) -> Handle:
        return Handle(Request([1] * length, max_tokens=1, echo_logprobs=echo), 0.0)

    monkeypatch.setattr(engine_module, "PREFILL_TOKENS", 30)
    handles = [handle(5), handle(9), handle(4, echo=True), handle(3), handle(10), handle(10), handle(10)]
    groups = engine_module.prefill_groups(handles)
    assert [[len(h.request.prompt_ids) for h in g] for g in groups] == [[5, 9], [4], [3, 10, 10], [10]]


def test_rows_that_stay_move_the_least_when_others_leave():
    from finetune.serving.engine import fill_from_tail

    assert fill_from_tail([0, 1, 2]) == [0, 1, 2]
    assert fill_from_tail([1, 2, 3, 5, 6]) == [6, 1, 2, 3, 5]  # row 0 left: the last row takes its place
    assert fill_from_tail([0, 4, 5]) == [0, 5, 4]
    assert sorted(fill_from_tail([2, 7, 9])) == [2, 7, 9] and fill_from_tail([2, 7, 9])[2] == 2


def test_seeded_sampling_is_the_same_alone_and_batched(backend):
    def sampled(prompt: str, seed: int) -> Request:
        return Request(backend.encode(prompt), max_tokens=16, temperature=0.9, top_k=40, top_p=0.9, seed=seed)

    engine = Engine(Slow(backend))
    try:
        alone = token_ids(engine.submit(sampled(PROMPTS[1], 7)))[0]
        again = token_ids(engine.submit(sampled(PROMPTS[1], 7)))[0]
        others = [engine.submit(sampled(PROMPTS[0], 1)), engine.submit(greedy(backend, PROMPTS[2]))]
        others[0].next_event(timeout=60)
        batched = token_ids(engine.submit(sampled(PROMPTS[1], 7)))[0]
        other = token_ids(engine.submit(sampled(PROMPTS[1], 8)))[0]
        for handle in others:
            token_ids(handle)
    finally:
        engine.stop(5)
    assert alone == again == batched
    assert other != alone  # the seed matters


def test_cancel_frees_the_slot_and_a_full_queue_refuses(backends):
    backend = backends["onnx"]  # the scheduling is the backends' shared code
    engine = Engine(Slow(backend), max_batch_size=1, max_queue=2)
    try:
        first = engine.submit(greedy(backend, PROMPTS[0], max_tokens=200))
        assert isinstance(first.next_event(timeout=60), TokenEvent)  # decoding: it holds the only slot
        queued = [engine.submit(greedy(backend, p, max_tokens=3)) for p in PROMPTS[1:3]]
        assert engine.stats.queue_depth == 2
        with pytest.raises(QueueFull, match="max_queue 2"):
            engine.submit(greedy(backend, PROMPTS[3]))
        assert engine.stats.queue_depth == 2
        queued.pop().cancel()  # a queued request cancelled leaves the queue at the next step
        deadline = time.monotonic() + 10
        while engine.stats.queue_depth > 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        queued.append(engine.submit(greedy(backend, PROMPTS[3], max_tokens=3)))
        first.cancel()
        tokens, final = token_ids(first)
        assert final.finish_reason == "cancelled" and final.completion_tokens == len(tokens) + 1 < 200
        for handle in queued:
            assert token_ids(handle)[1].finish_reason == "length"
        counts = engine.stats.snapshot()
        assert counts["rejected"] == 1 and counts["finished"] == {"cancelled": 2, "length": 2}
    finally:
        engine.stop(5)


def test_max_queue_zero_refuses_only_when_every_slot_is_busy(backends):
    backend = backends["onnx"]
    engine = Engine(Slow(backend), max_batch_size=2, max_queue=0)
    try:
        running = [engine.submit(greedy(backend, p, max_tokens=100)) for p in PROMPTS[:2]]
        for handle in running:
            handle.next_event(timeout=60)
        with pytest.raises(QueueFull):
            engine.submit(greedy(backend, PROMPTS[2]))
        for handle in running:
            handle.cancel()
            assert token_ids(handle)[1].finish_reason == "cancelled"
    finally:
        engine.stop(5)


def test_submit_many_is_all_or_nothing(backends):
    backend = backends["onnx"]
    engine = Engine(Slow(backend), max_batch_size=2, max_queue=1)
    try:
        with pytest.raises(QueueFull, match="4 more do not fit"):
            engine.submit_many([greedy(backend, p, max_tokens=3) for p in PROMPTS])
        assert engine.stats.submitted == 0 and engine.stats.queue_depth == 0
        with pytest.raises(RequestError):  # one bad request refuses them all
            engine.submit_many([greedy(backend, PROMPTS[0]), greedy(backend, PROMPTS[0], temperature=-1)])
        handles = engine.submit_many([greedy(backend, p, max_tokens=3) for p in PROMPTS[:3]])
        assert [token_ids(h)[1].completion_tokens for h in handles] == [3, 3, 3]
    finally:
        engine.stop(5)


def test_stop_drains_within_the_grace_period_then_cancels(backends):
    backend = backends["onnx"]
    engine = Engine(Slow(backend), max_batch_size=2)
    handles = [engine.submit(greedy(backend, p, max_tokens=10)) for p in PROMPTS]  # two of them still queued
    engine.stop(grace_s=60)
    assert not engine.running and not engine.accepting
    assert [token_ids(h)[1].finish_reason for h in handles] == ["length"] * len(PROMPTS)
    with pytest.raises(EngineStopped):
        engine.submit(greedy(backend, PROMPTS[0]))

    engine = Engine(Slow(backend, delay=0.02))
    handle = engine.submit(greedy(backend, PROMPTS[0], max_tokens=200))
    handle.next_event(timeout=60)
    started = time.monotonic()
    engine.stop(grace_s=0.1)
    assert time.monotonic() - started < 5 and not engine.running
    assert token_ids(handle)[1].finish_reason == "cancelled"


def test_finish_reasons_and_usage(backends):
    backend = backends["onnx"]
    engine = Engine(backend)
    request = greedy(backend, PROMPTS[3], max_tokens=12)
    tokens, final = token_ids(engine.submit(request))
    engine.stop(5)
    usage = (final.finish_reason, final.prompt_tokens, final.completion_tokens)
    assert usage == ("length", len(request.prompt_ids), 12)
    # Make the 4th new token (when new) the model's EOS: the request stops there, the EOS not sent.
    at = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    engine = Engine(Slow(backend, delay=0, eos_token_id=tokens[at]))
    stopped, final = token_ids(engine.submit(request))
    engine.stop(5)
    assert stopped == tokens[:at] and (final.finish_reason, final.completion_tokens) == ("stop", at)


def test_requests_the_model_cannot_take_are_refused(backends):
    backend = backends["torch"]
    engine = Engine(backend)
    try:
        with pytest.raises(RequestError, match="context of 256 tokens") as caught:
            engine.submit(Request([5] * 250, max_tokens=10))
        assert caught.value.param == "max_tokens"
        for fields, param in [
            ({"temperature": -1}, "temperature"),
            ({"top_p": 0}, "top_p"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"logprobs": 99}, "logprobs"),
            ({"seed": -1}, "seed"),
            ({"prompt_ids": [5, backend.vocab_size]}, "prompt"),
            ({"prompt_ids": [5, "6"]}, "prompt"),
        ]:
            with pytest.raises(RequestError) as caught:
                engine.submit(Request(**{"prompt_ids": [5, 6], **fields}))
            assert caught.value.param == param
        with pytest.raises(RequestError, match="empty"):
            engine.submit(Request([]))
        assert engine.stats.submitted == 0
    finally:
        engine.stop(5)


def reference_logprobs(model_dir, ids: list[int]) -> np.ndarray:
    """log_softmax of the torch model's logits at every position, computed here without the engine."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()


def test_echo_logprobs_equal_the_models_log_softmax(backend, model_dir):
    engine = Engine(backend)
    try:
        prompt = backend.encode(PROMPTS[3])
        tokens, final, echoed = engine.submit(Request(prompt, max_tokens=0, echo_logprobs=True, logprobs=3)).result(60)
        generated, _, _ = engine.submit(Request(prompt, max_tokens=3, temperature=0, logprobs=2)).result(60)
    finally:
        engine.stop(5)
    assert tokens == [] and (final.finish_reason, final.completion_tokens) == ("length", 0)
    assert isinstance(echoed, PromptEvent) and echoed.token_ids == prompt
    assert len(echoed.logprobs) == len(echoed.top_logprobs) == len(prompt)
    assert echoed.logprobs[0] is None and echoed.top_logprobs[0] is None
    assert all(len(top) == 3 for top in echoed.top_logprobs[1:])
    expected = reference_logprobs(model_dir, prompt + [t.token_id for t in generated])
    np.testing.assert_allclose(echoed.logprobs[1:], expected[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)
    for position, top in enumerate(echoed.top_logprobs[1:]):
        best = np.argsort(-expected[position])[:3]
        assert list(top) == best.tolist()
        np.testing.assert_allclose(list(top.values()), expected[position, best], atol=1e-4)
    for offset, event in enumerate(generated):
        row = expected[len(prompt) - 1 + offset]
        assert event.token_id == int(row.argmax()) and abs(event.logprob - row[event.token_id]) < 1e-4
        assert list(event.top_logprobs) == np.argsort(-row)[:2].tolist()


def test_a_handle_streams_to_an_async_consumer(backends):
    backend = backends["onnx"]
    engine = Engine(backend)

    async def consume():
        handle = engine.submit(greedy(backend, PROMPTS[1], max_tokens=5))
        return [event async for event in handle]

    try:
        events = asyncio.run(consume())
        expected, _ = token_ids(engine.submit(greedy(backend, PROMPTS[1], max_tokens=5)))
    finally:
        engine.stop(5)
    assert [e.token_id for e in events[:-1]] == expected and events[-1].finish_reason == "length"


def test_the_onnx_engine_imports_no_torch(backends, onnx_dir):
    backend = backends["onnx"]
    prompt = backend.encode(PROMPTS[2])
    code = (
        "import json, sys\n"
        "for name in ('torch', 'transformers', 'accelerate'):\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "from finetune.serving import Engine, Request\n"
        "from finetune.serving.onnx_backend import OnnxBackend\n"
        f"engine = Engine(OnnxBackend.load({str(onnx_dir)!r}))\n"
        f"handles = [engine.submit(Request({prompt!r}, max_tokens=8, temperature=0)) for _ in range(2)]\n"
        "print(json.dumps([[e.token_id for e in h.result(60)[0]] for h in handles]))\n"
        "engine.stop(5)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    engine = Engine(backend)
    try:
        expected, _ = token_ids(engine.submit(Request(prompt, max_tokens=8, temperature=0)))
    finally:
        engine.stop(5)
    assert json.loads(result.stdout) == [expected, expected]


class FailsOnce(Slow):
    """A backend whose first decode step raises (a broken graph, NaN logits)."""

    failed = False

    def step(self, tokens, mask, past):
        if not self.failed:
            self.failed = True
            raise RuntimeError("the step broke")
        return self.inner.step(tokens, mask, past)


def test_a_failing_step_ends_its_batch_with_an_error_and_the_engine_keeps_serving(backends):
    backend = backends["onnx"]
    engine = Engine(FailsOnce(backend))
    try:
        tokens, final = token_ids(engine.submit(greedy(backend, PROMPTS[0], max_tokens=5)))
        assert (final.finish_reason, final.error, len(tokens)) == ("error", "the step broke", 1)
        assert token_ids(engine.submit(greedy(backend, PROMPTS[0], max_tokens=5)))[1].finish_reason == "length"
    finally:
        engine.stop(5)


def test_nan_weights_end_the_request_with_an_error_not_token_zero(model_dir):
    """NaN logits end each request with an error, whether prefilled alone or together, never token 0."""
    import torch

    from finetune.generation import load_for_generation
    from finetune.serving import cpu_linear
    from finetune.serving.torch_backend import TorchBackend

    model, tokenizer = load_for_generation(str(model_dir))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    assert cpu_linear.pack_weights(model) > 0  # as TorchBackend.load does
    backend = TorchBackend(model, tokenizer)
    engine = Engine(backend)
    try:
        # Two submitted together are prefilled together (2 rows: the packed weights), then one alone.
        pair = engine.submit_many([greedy(backend, PROMPTS[0]), greedy(backend, PROMPTS[1])])
        finals = [token_ids(h)[1] for h in pair]
        finals.append(token_ids(engine.submit(greedy(backend, PROMPTS[0])))[1])
    finally:
        engine.stop(5)
    assert len(finals) == 3
    assert all(f.finish_reason == "error" and "NaN" in f.error and f.completion_tokens == 0 for f in finals)


def test_a_burst_from_32_clients_loses_nothing(backends):
    """200 requests from 32 threads: each gets its whole answer or QueueFull, and the engine ends empty."""
    from concurrent.futures import ThreadPoolExecutor

    backend = backends["onnx"]
    engine = Engine(backend, max_batch_size=4, max_queue=16)

    def client(i: int) -> str:
        try:
            handle = engine.submit(greedy(backend, PROMPTS[i % len(PROMPTS)], max_tokens=8))
        except QueueFull:
            return "429"
        tokens, final = token_ids(handle)
        return "ok" if (final.finish_reason, len(tokens), final.completion_tokens) == ("length", 8, 8) else "bad"

    try:
        with ThreadPoolExecutor(32) as pool:
            outcomes = list(pool.map(client, range(200)))
    finally:
        engine.stop(5)
    assert outcomes.count("ok") + outcomes.count("429") == 200 and outcomes.count("ok") >= 20
    stats = engine.stats.snapshot()
    assert stats["finished"] == {"length": outcomes.count("ok")} and stats["rejected"] == outcomes.count("429")
    assert stats["batch_size"] == 0 and stats["queue_depth"] == 0 and not engine._handles
    assert stats["max_batch_size_seen"] == 4


def test_the_torch_kv_cache_appends_in_place_only_where_it_is_safe():
    """Columns go into spare room after the past, but a past stepped twice, or a tensor the cache did not
    make, is copied, never overwritten; past the spare room it grows by copying, with the same values."""
    import torch

    from finetune.serving.torch_backend import SPARE_COLUMNS, _appended

    def column(value: float) -> torch.Tensor:
        return torch.full((2, 3, 1, 4), value)

    start = torch.zeros(2, 3, 5, 4)
    first = _appended(start, column(1))
    second = _appended(first, column(2))
    assert second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()  # in place
    again = _appended(first, column(3))  # `first` stepped a second time
    assert second[:, :, -1].eq(2).all() and again[:, :, -1].eq(3).all()
    wide = torch.zeros(2, 3, 40, 4)
    _appended(wide[:, :, :6], column(4))  # a view of a buffer the cache did not make
    assert wide.eq(0).all()
    grown, expected = start, start
    for i in range(SPARE_COLUMNS + 10):
        grown = _appended(grown, column(i))
        expected = torch.cat([expected, column(i)], dim=2)
    assert torch.equal(grown, expected)


def test_packed_layers_still_show_their_weight_and_compute_the_same(model_dir):
    import torch

    from finetune.generation import load_for_generation
    from finetune.serving import cpu_linear

    model, _ = load_for_generation(str(model_dir))
    layer = model.transformer.h[0].mlp.c_fc
    weight = layer.weight
    x = torch.randn(4, 3, weight.shape[0])
    with torch.inference_mode():
        expected_rows, expected_one = layer(x), layer(x[:1, :1])
    assert cpu_linear.pack_weights(model) > 0
    packed = model.transformer.h[0].mlp.c_fc
    assert packed is not layer and packed.weight is weight and packed.bias is layer.bias  # model code may read them
    with torch.inference_mode():
        assert torch.allclose(packed(x), expected_rows, atol=1e-5)  # several rows: the packed copy
        assert torch.equal(packed(x[:1, :1]), expected_one)  # one row: the plain layer itself


def test_packing_is_skipped_when_a_second_weight_copy_would_not_fit(model_dir, monkeypatch):
    from finetune.serving import cpu_linear
    from finetune.serving.torch_backend import TorchBackend

    def packed_layers(backend) -> int:
        return sum(type(m).__name__ == "PackedLinear" for m in backend.model.modules())

    monkeypatch.setattr(cpu_linear, "_available_memory", lambda: 1000)  # bytes: far too little
    assert packed_layers(TorchBackend.load(str(model_dir))) == 0
    monkeypatch.setattr(cpu_linear, "_available_memory", lambda: None)  # unknown: pack
    assert packed_layers(TorchBackend.load(str(model_dir))) > 0
