"""Every training fast path (fast_paths.py) gives the plain path's numbers on CPU (they default on only with CUDA)."""

from __future__ import annotations

import pytest
from conftest import SAMPLE, make_model_dir, read_metrics, run_cli

from finetune.architectures import ARCHITECTURES

# The chunked loss is claimed for these; conftest.make_model_dir builds each.
CHUNKED_LOSS_ARCHITECTURES = [name for name, row in ARCHITECTURES.items() if row.chunked_loss]


@pytest.fixture(scope="module")
def plain_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    return {arch: make_model_dir(root / arch, arch, dropout=False) for arch in ("gpt2", "llama")}


@pytest.mark.parametrize("architecture", CHUNKED_LOSS_ARCHITECTURES)
def test_chunked_loss_equals_the_model_loss_and_gradients(plain_models, tmp_path, architecture):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.fast_paths import chunked_causal_lm_loss, supports_chunked_loss

    model_dir = plain_models.get(architecture) or make_model_dir(tmp_path / architecture, architecture, dropout=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert supports_chunked_loss(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    reference = model(input_ids=ids, labels=ids).loss
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = chunked_causal_lm_loss(model, ids, model.config.vocab_size, chunk_tokens=16)  # several chunks
    chunked.backward()
    assert abs(chunked.item() - reference.item()) < 1e-5
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, ref_grads[name], atol=1e-5), name


def test_padded_vocabulary_keeps_the_loss_and_clean_checkpoints(workdir, plain_models):
    import json

    base = [
        "train",
        SAMPLE,
        "--model",
        plain_models["gpt2"],
        "--steps",
        3,
        "--batch-size",
        4,
        "--block-size",
        32,
        "--log-every",
        1,
        "--eval-every",
        0,
        "--sample-every",
        3,
    ]
    run_cli(*base, "--run-name", "plain")
    run_cli(*base, "--run-name", "fast", "--fused-loss", "--pad-vocab", "--loss-sync-every", 2)
    plain = [m["loss"] for m in read_metrics(workdir / "runs/plain") if "loss" in m]
    fast = [m["loss"] for m in read_metrics(workdir / "runs/fast") if "loss" in m]
    assert len(fast) == 3 and all(abs(a - b) < 1e-4 for a, b in zip(plain, fast)), (plain, fast)
    config = json.loads((workdir / "runs/fast/checkpoint-000003/config.json").read_text())
    original = json.loads((plain_models["gpt2"] / "config.json").read_text())
    assert config["vocab_size"] == original["vocab_size"] and original["vocab_size"] % 64 != 0
    from safetensors.torch import load_file

    weights = load_file(workdir / "runs/fast/checkpoint-000003/model.safetensors")
    assert weights["transformer.wte.weight"].shape[0] == original["vocab_size"]
    # the checkpoint generates like any other
    assert run_cli("generate", "--run", "fast", "--prompt", "Title:", "--max-new-tokens", 5).stdout.startswith("Title:")
    # Optimizer state is stored without the padding rows and the loss wrapper's names, so each run
    # resumes with the other's fast paths and both continue alike.
    from finetune.checkpoint import load_torch_file

    moments = load_torch_file(workdir / "runs/fast/checkpoint-000003/training_state/optimizer.pt")["state"]
    assert moments["transformer.wte.weight"]["exp_avg"].shape[0] == original["vocab_size"]
    more = [*base[:5], 5, *base[6:]]
    run_cli(*more, "--run-name", "fast", "--no-fused-loss", "--no-pad-vocab")
    run_cli(*more, "--run-name", "plain", "--fused-loss", "--pad-vocab")
    plain = [m["loss"] for m in read_metrics(workdir / "runs/plain") if "loss" in m]
    fast = [m["loss"] for m in read_metrics(workdir / "runs/fast") if "loss" in m]
    assert len(fast) == len(plain) == 5 and all(abs(a - b) < 1e-4 for a, b in zip(plain, fast)), (plain, fast)


@pytest.mark.slow
def test_compiled_training_matches_eager(workdir, plain_models):
    base = [
        "train",
        SAMPLE,
        "--model",
        plain_models["gpt2"],
        "--steps",
        2,
        "--batch-size",
        4,
        "--block-size",
        32,
        "--log-every",
        1,
        "--eval-every",
        0,
        "--sample-every",
        0,
    ]
    run_cli(*base, "--run-name", "eager")
    run_cli(*base, "--run-name", "compiled", "--compile")
    eager = [m["loss"] for m in read_metrics(workdir / "runs/eager") if "loss" in m]
    compiled = [m["loss"] for m in read_metrics(workdir / "runs/compiled") if "loss" in m]
    assert all(abs(a - b) < 1e-4 for a, b in zip(eager, compiled))


@pytest.mark.slow
def test_the_cuda_default_combination_runs_on_cpu(workdir, plain_models):
    """compile + chunked loss + padded vocabulary + deferred loss reads, as CUDA runs by default."""
    base = [
        "train",
        SAMPLE,
        "--model",
        plain_models["gpt2"],
        "--steps",
        3,
        "--batch-size",
        4,
        "--block-size",
        32,
        "--log-every",
        1,
        "--eval-every",
        3,
        "--sample-every",
        3,
        "--save-every",
        3,
    ]
    run_cli(*base, "--run-name", "eager")
    run_cli(*base, "--run-name", "cudalike", "--compile", "--fused-loss", "--pad-vocab", "--loss-sync-every", 2)
    eager = [m["loss"] for m in read_metrics(workdir / "runs/eager") if "loss" in m]
    fast = [m["loss"] for m in read_metrics(workdir / "runs/cudalike") if "loss" in m]
    assert len(fast) == 3 and all(abs(a - b) < 1e-4 for a, b in zip(eager, fast)), (eager, fast)
    # resume
    run_cli("train", *base[1:], "--run-name", "cudalike", "--compile", "--fused-loss", "--pad-vocab", "--steps", 4)
