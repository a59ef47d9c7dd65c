"""Short training runs through the CLI, for comparing two ways of training the same model on the same data."""

from __future__ import annotations

from pathlib import Path

from conftest import SAMPLE, make_model_dir, read_metrics


def plain_gpt2(root: Path) -> Path:
    """No dropout, so runs split across processes (or trained another way) can match exactly."""
    return make_model_dir(root / "gpt2", "gpt2", dropout=False)


def base_args(model_dir: Path, run: str, steps: int, batch: int, *extra) -> list:
    return [
        "train",
        SAMPLE,
        "--model",
        model_dir,
        "--run-name",
        run,
        "--steps",
        steps,
        "--batch-size",
        batch,
        "--block-size",
        32,
        "--log-every",
        1,
        "--eval-every",
        2,
        "--sample-every",
        0,
        "--save-every",
        2,
        *extra,
    ]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
