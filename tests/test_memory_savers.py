"""Memory savers: gradient checkpointing gives the same loss; frozen layers stay unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import short_runs
from conftest import run_cli
from short_runs import base_args, losses


@pytest.fixture(scope="module")
def plain_gpt2(tmp_path_factory) -> Path:
    return short_runs.plain_gpt2(tmp_path_factory.mktemp("plain"))


def test_gradient_checkpointing_gives_the_same_loss(workdir, plain_gpt2):
    run_cli(*base_args(plain_gpt2, "plain", 3, 4))
    run_cli(*base_args(plain_gpt2, "ckpt", 3, 4, "--gradient-checkpointing"))
    for a, b in zip(losses(workdir / "runs/plain"), losses(workdir / "runs/ckpt")):
        assert abs(a - b) < 1e-5


def test_freeze_layers_and_train_only_blocks(workdir, plain_gpt2):
    from safetensors.torch import load_file

    base = load_file(plain_gpt2 / "model.safetensors")
    run_cli(*base_args(plain_gpt2, "frozen", 2, 4, "--freeze-layers", 1, "--lr", "1e-2"))
    after = load_file(workdir / "runs/frozen/checkpoint-000002/model.safetensors")
    changed = {k for k in base if not (base[k] == after[k]).all()}
    assert not any(k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.")) for k in changed)
    assert any(k.startswith("transformer.h.1.") for k in changed)
    run_cli(*base_args(plain_gpt2, "blocks", 2, 4, "--train-only-blocks", "--lr", "1e-2"))
    after = load_file(workdir / "runs/blocks/checkpoint-000002/model.safetensors")
    changed = {k for k in base if not (base[k] == after[k]).all()}
    assert changed and all(k.startswith("transformer.h.") for k in changed)
