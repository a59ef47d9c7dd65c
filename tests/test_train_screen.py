"""What `finetune train` shows while it runs: the header in plain words, samples and checkpoint saves above the bar."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_cli
from short_runs import base_args

from finetune.generation import SAMPLE_DELIMITER


def train_args(model_dir: Path, steps: int, *extra) -> list:
    """Samples and a checkpoint every 2 steps, no validation: the screen shows samples and saves only."""
    return base_args(model_dir, "screen", steps, 4, "--eval-every", 0, "--sample-every", 2, *extra)


def on_screen(samples_file: Path, step: int) -> str:
    """The block the run prints for a samples file, as gpt-2-simple printed it."""
    with open(samples_file, encoding="utf-8", newline="") as fh:  # as written: a sampled "\r" stays one
        texts = fh.read().rstrip("\n").split(f"\n{SAMPLE_DELIMITER}\n")
    assert len(texts) == 2
    lines = [f"samples at step {step} (saved in runs/screen/samples/{samples_file.name}):"]
    for number, text in enumerate(texts, start=1):
        # Control characters (a random model samples some) are shown as U+FFFD: they would garble the screen.
        lines += [
            f"======== SAMPLE {number} ========",
            re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "\ufffd", text.rstrip("\n")),
        ]
    return "\n".join([*lines, "=" * 26]) + "\n"


def test_samples_and_saves_are_printed_and_no_print_samples_turns_samples_off(workdir, gpt2_dir):
    result = run_cli(*train_args(gpt2_dir, 4))
    run_dir = workdir / "runs" / "screen"
    for step in (2, 4):
        # On stdout, above the bar (which is on stderr): the very text saved in the samples file.
        assert on_screen(run_dir / "samples" / f"samples-{step:06d}.txt", step) in result.stdout, result.stdout
        assert f"step {step}: saved runs/screen/checkpoint-{step:06d}\n" in result.stdout
    header = next(line for line in result.output.splitlines() if line.startswith("run 'screen':"))
    assert "on CPU, precision fp32;" in header and "precision no" not in header, header
    assert "4 steps of 4 blocks of 32 tokens = 128 tokens per step" in header, header

    # Continuing the run with --no-print-samples: the samples are still written, not printed, and the
    # flag is not a change of the experiment (the resume line lists no changed setting for it).
    result = run_cli(*train_args(gpt2_dir, 6, "--no-print-samples"))
    assert "resuming run 'screen' from checkpoint-000004" in result.output
    assert "print_samples" not in result.output
    assert (run_dir / "samples" / "samples-000006.txt").read_text().strip()
    assert "SAMPLE 1" not in result.output and "samples at step" not in result.output
    assert "step 6: saved runs/screen/checkpoint-000006\n" in result.stdout
