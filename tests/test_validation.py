"""Validation loss through the CLI equals an independent computation: transformers' forward pass
with a summed cross-entropy over the same blocks, divided by the predicted tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SAMPLE, read_metrics, run_cli


@pytest.fixture(scope="module")
def val_text(tmp_path_factory) -> Path:
    """A validation file of 13 blocks of 16 tokens: batches of 4 leave a last batch of 1 block."""
    path = tmp_path_factory.mktemp("val") / "val.txt"
    path.write_text(SAMPLE.read_text()[-560:])
    return path


def val_blocks(checkpoint: Path, val_file: Path):
    from finetune import modeling
    from finetune.config import DataConfig
    from finetune.token_cache import prepare_data

    tokenizer = modeling.load_tokenizer(str(checkpoint))
    prepared = prepare_data([SAMPLE], tokenizer, 16, DataConfig(), val_files=[val_file], log=lambda _m: None)
    return [prepared.val[i] for i in range(len(prepared.val))]


def summed_loss(checkpoint: Path, blocks) -> tuple[float, int]:
    """(sum of next-token cross-entropies, number of predicted tokens) with a plain transformers model."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.from_numpy(np.stack(blocks))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return total.item(), ids[:, 1:].numel()


def train_with_validation(gpt2_dir: Path, val_file: Path, run: str, *extra):
    return run_cli(
        "train",
        SAMPLE,
        "--model",
        gpt2_dir,
        "--run-name",
        run,
        "--val-file",
        val_file,
        "--steps",
        2,
        "--block-size",
        16,
        "--batch-size",
        4,
        "--eval-every",
        2,
        "--sample-every",
        0,
        "--save-every",
        2,
        *extra,
    )


def eval_batches_config(workdir: Path, batches: int) -> Path:
    path = workdir / "eval.yaml"
    path.write_text(f"train:\n  eval_batches: {batches}\n")
    return path


def logged_val_loss(run_dir: Path) -> float:
    return [m for m in read_metrics(run_dir) if "val_loss" in m][-1]["val_loss"]


def test_validation_loss_is_weighted_by_tokens(workdir, gpt2_dir, val_text):
    result = train_with_validation(gpt2_dir, val_text, "val")
    assert "validation:" not in result.output  # no cap applies: every batch is used
    checkpoint = workdir / "runs/val/checkpoint-000002"
    blocks = val_blocks(checkpoint, val_text)
    assert len(blocks) % 4 == 1, len(blocks)  # a short last batch, where a mean of batch means goes wrong
    total, count = summed_loss(checkpoint, blocks)
    assert abs(logged_val_loss(workdir / "runs/val") - total / count) < 1e-5
    # and that differs from the mean of per-batch means by more than the tolerance above
    batch_means = [summed_loss(checkpoint, blocks[i : i + 4]) for i in range(0, len(blocks), 4)]
    assert abs(sum(s / n for s, n in batch_means) / len(batch_means) - total / count) > 1e-4


def test_capped_validation_covers_the_split_evenly_and_says_so(workdir, gpt2_dir, val_text):
    result = train_with_validation(gpt2_dir, val_text, "capped", "--config", eval_batches_config(workdir, 2))
    notes = [line for line in result.output.splitlines() if line.startswith("validation:")]
    assert notes == [
        "validation: 2 of the 4 validation batches, evenly spaced over the split "
        "(train.eval_batches: 2; raise it in a --config file to validate on more)"
    ], result.output
    checkpoint = workdir / "runs/capped/checkpoint-000002"
    blocks = val_blocks(checkpoint, val_text)
    picked = blocks[0:4] + blocks[8:12]  # batches 0 and 2 of 4, not the first two
    total, count = summed_loss(checkpoint, picked)
    assert abs(logged_val_loss(workdir / "runs/capped") - total / count) < 1e-5


@pytest.mark.slow
def test_validation_under_two_processes_adds_sums_and_counts(workdir, gpt2_dir, val_text):
    """2 gloo processes share the 4 batches (one of them short): the loss is still the token-weighted mean."""
    import subprocess
    import sys

    args = [
        "train",
        SAMPLE,
        "--model",
        gpt2_dir,
        "--run-name",
        "two",
        "--val-file",
        val_text,
        "--steps",
        2,
        "--block-size",
        16,
        "--batch-size",
        4,
        "--eval-every",
        2,
        "--sample-every",
        0,
        "--save-every",
        2,
        "--num-processes",
        2,
    ]
    result = subprocess.run(
        [sys.executable, "-m", "finetune", *map(str, args)], cwd=workdir, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = workdir / "runs/two/checkpoint-000002"
    total, count = summed_loss(checkpoint, val_blocks(checkpoint, val_text))
    assert abs(logged_val_loss(workdir / "runs/two") - total / count) < 1e-5
