"""The in-place KV cache of GroupQueryAttention exports (finetune/onnx_kv_cache.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_model_dir, run_cli

from finetune import onnx_kv_cache
from finetune.errors import FinetuneError
from finetune.onnx_kv_cache import SharedFeed, SharedKV


def filled(rows: int, lengths: list[int], seed: int) -> SharedKV:
    """A SharedKV of two buffers (heads 2, dim 3) whose filled positions hold random numbers."""
    kv = SharedKV.empty([(2, 3), (2, 3)], rows, np.float32)
    kv.reserve(rows, max(lengths))
    rng = np.random.default_rng(seed)
    for buffer in kv.buffers:
        for row, length in enumerate(lengths):
            buffer[row, :, :length] = rng.normal(size=(2, length, 3))
    kv.lengths = np.array(lengths, np.int64)
    return kv


def contents(kv: SharedKV) -> list[list[np.ndarray]]:
    return [[buffer[row, :, :length].copy() for row, length in enumerate(kv.lengths)] for buffer in kv.buffers]


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys, strict=True))


def test_buffers_grow_keep_rows_and_take_in_new_ones():
    kv = filled(3, [2, 5, 4], seed=0)
    assert kv.room == 5 + onnx_kv_cache.SPARE_POSITIONS
    before = contents(kv)
    kv.reserve(3, kv.room)  # fits: nothing moves
    assert same(contents(kv), before)
    buffers = kv.buffers
    kv.reserve(5, 120, limit=150)  # more rows and positions (spare capped at the context), filled part kept
    assert kv.buffers is not buffers and kv.room == 150 and kv.buffers[0].shape[0] >= 5
    assert same(contents(kv), before)

    kv.keep(np.array([0, 2]))  # row 1 leaves; row 2 moves up
    assert kv.rows == 2 and kv.lengths.tolist() == [2, 4]
    assert same(contents(kv), [[rows[0], rows[2]] for rows in before])

    shuffled = filled(5, [3, 1, 4, 1, 5], seed=2)
    rows = contents(shuffled)
    shuffled.keep(np.array([4, 1, 3]))  # the engine's order: the last row fills the first gap
    assert shuffled.lengths.tolist() == [5, 1, 1] and same(contents(shuffled), [[r[4], r[1], r[3]] for r in rows])
    swapped = filled(3, [2, 3, 1], seed=3)
    rows = contents(swapped)
    swapped.keep(np.array([2, 0, 1]))  # every source is also a target: gathered at once
    assert same(contents(swapped), [[r[2], r[0], r[1]] for r in rows])

    other = filled(2, [6, 1], seed=1)
    joined = kv.extend(other)
    assert joined is kv and kv.lengths.tolist() == [2, 4, 6, 1]
    assert same(contents(kv), [[*a[0:1], a[2], *b] for a, b in zip(before, contents(other))])
    assert all(view.flags.c_contiguous and view.shape[0] == 4 for view in kv.views())


def test_a_left_padded_block_is_fed_right_padded_and_its_logits_put_back():
    ids = np.array([[9, 9, 1, 2], [3, 4, 5, 6], [9, 9, 9, 7]])
    mask = (ids != 9).astype(np.int64)
    feed = SharedFeed.of(ids, mask, SharedKV.empty([(1, 1)], 3, np.float32), limit=None)
    assert feed.input_ids.tolist() == [[1, 2, 9, 9], [3, 4, 5, 6], [7, 9, 9, 9]]
    assert feed.seqlens_k.tolist() == [1, 3, 0] and int(feed.total_sequence_length) == 4
    assert feed.position_ids.tolist() == [[0, 1, 2, 3]] * 3
    logits = feed.input_ids[:, :, None].astype(np.float32)  # each position's "logits" is its token
    assert feed.left_padded(logits)[:, :, 0][mask == 1].tolist() == ids[mask == 1].tolist()
    assert np.take_along_axis(feed.input_ids, feed.last_positions(), 1)[:, 0].tolist() == [2, 6, 7]
    assert feed.all_positions().tolist() == [[0, 1, 2, 3]] * 3

    past = SharedKV.empty([(1, 1)], 2, np.float32)
    past.lengths = np.array([5, 2])
    step = SharedFeed.of(np.array([[4], [8]]), np.ones((2, 6), np.int64), past, limit=6)
    assert step.position_ids.tolist() == [[5], [2]] and step.seqlens_k.tolist() == [5, 2]
    assert int(step.total_sequence_length) == 6
    with pytest.raises(ValueError):  # ONNX Runtime would count the padding as filled positions
        SharedFeed.of(ids[:2], np.ones((2, 9), np.int64) * np.pad(mask[:2], ((0, 0), (5, 0))), past, limit=None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_model_dir(tmp_path_factory.mktemp("kv") / "tiny-gpt2", "gpt2", dropout=False)
    out = model.parent / "onnx"
    run_cli("export", "--checkpoint", model, "--format", "onnx", "--output", out, "--no-verify")
    return model, out


def test_decoding_past_the_buffers_room_matches_transformers(exported, monkeypatch):
    """Rows of different lengths, the buffers growing every step (no spare room): greedy tokens equal
    transformers' generate, and a step with room to spare writes into the same buffers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.onnx_generation import OnnxCausalLM

    model_dir, onnx_dir = exported
    lm = OnnxCausalLM(onnx_dir)
    assert lm.shared_kv and lm.manifest["kv_cache"] == "shared"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = [tokenizer(p)["input_ids"] for p in ("Title: Lemon cake with a glaze of", "Stir")]
    width = max(len(e) for e in encoded)
    ids = np.array([[0] * (width - len(e)) + e for e in encoded], np.int64)
    mask = (np.arange(width) >= width - np.array([len(e) for e in encoded])[:, None]).astype(np.int64)
    monkeypatch.setattr(onnx_kv_cache, "SPARE_POSITIONS", 0)
    ours = lm.greedy(ids, mask, 20)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        theirs = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=20,
            min_new_tokens=20,
            pad_token_id=0,
            eos_token_id=None,
        )[:, width:]
    assert ours.tolist() == theirs.tolist()

    monkeypatch.setattr(onnx_kv_cache, "SPARE_POSITIONS", 8)
    logits, past = lm.forward(ids, mask, None, lm.empty_past(2))
    buffers = list(past.buffers)
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    _, stepped = lm.forward(logits[:, -1].argmax(-1)[:, None], step_mask, None, past)
    assert stepped is past and all(a is b for a, b in zip(stepped.buffers, buffers))
    assert stepped.lengths.tolist() == [len(e) + 1 for e in encoded]


def swap_first_present(manifest: dict) -> None:
    outputs = manifest["outputs"]
    outputs[1], outputs[2] = outputs[2], outputs[1]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(kv_cache="paged"), "'kv_cache' should be one of concat, shared"),
        (lambda m: m.update(kv_cache=["shared"]), "'kv_cache' should be one of"),
        # a present bound to the wrong past would silently compute other numbers
        (swap_first_present, "'outputs' should be logits then present.0.key, present.0.value"),
        (lambda m: m.pop("outputs"), "'outputs' should be logits then"),
        (lambda m: m.update(max_positions=True), "'max_positions' should be a non-negative integer"),
        (lambda m: m.update(max_positions=0), "'max_positions' should be at least 1"),
    ],
)
def test_a_malformed_shared_manifest_is_one_clear_error(exported, tmp_path, edit, message):
    from finetune.onnx_generation import OnnxCausalLM

    copy = shutil.copytree(exported[1], tmp_path / "onnx")
    manifest = json.loads((copy / "finetune_onnx.json").read_text())
    edit(manifest)
    (copy / "finetune_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(FinetuneError, match=message):
        OnnxCausalLM(copy)
