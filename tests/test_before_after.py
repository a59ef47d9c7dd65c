"""Before and after: every run that validates measures the validation split at step 0, before any update,
and its last line (and the exported model card) compares that figure with the final one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import SAMPLE, read_metrics, run_cli
from test_validation import summed_loss, train_with_validation, val_blocks

from finetune.perplexity import change_line, perplexity, relative_change, shown


@pytest.fixture(scope="module")
def val_text(tmp_path_factory) -> Path:
    """A separate validation file (test_validation's): the same blocks whatever the run."""
    path = tmp_path_factory.mktemp("val") / "val.txt"
    path.write_text(SAMPLE.read_text()[-560:])
    return path


LINE = re.compile(r"^validation perplexity (\S+) → (\S+) \(([−+±]\S+%)\)$")


def test_step_0_is_the_base_model_on_the_validation_split(workdir, gpt2_dir, val_text):
    result = train_with_validation(gpt2_dir, val_text, "before")
    records = read_metrics(workdir / "runs/before")
    initial = [r for r in records if "initial_val_loss" in r]
    assert len(initial) == 1 and initial[0]["step"] == 0 and records[0] is initial[0]
    # The model as loaded, before any update, by an independent transformers computation.
    total, count = summed_loss(gpt2_dir, val_blocks(gpt2_dir, val_text))
    assert abs(initial[0]["initial_val_loss"] - total / count) < 1e-5
    assert abs(initial[0]["initial_val_perplexity"] - perplexity(total / count)) < 1e-2
    # The progress output shows it, and the last line compares it with the final validation loss.
    assert f"step 0 (before training): validation loss {initial[0]['initial_val_loss']:.4f}" in result.output
    last = result.stderr.strip().splitlines()[-1]
    final = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert last == change_line(initial[0]["initial_val_loss"], final), result.output
    assert LINE.match(last), last
    # The validation records are still those of the --eval-every cadence only.
    assert [r["step"] for r in records if "val_loss" in r] == [2]


def test_a_resumed_run_keeps_its_step_0_figure(workdir, gpt2_dir, val_text):
    train_with_validation(gpt2_dir, val_text, "resumed")
    first = read_metrics(workdir / "runs/resumed")[0]["initial_val_loss"]
    result = train_with_validation(gpt2_dir, val_text, "resumed", "--steps", 4)
    assert "resuming run 'resumed'" in result.output
    assert "step 0 (before training)" not in result.output  # not evaluated again
    records = read_metrics(workdir / "runs/resumed")
    assert [r["initial_val_loss"] for r in records if "initial_val_loss" in r] == [first]
    final = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert result.stderr.strip().splitlines()[-1] == change_line(first, final)


def test_the_model_card_carries_the_line(workdir, gpt2_dir, val_text):
    train_with_validation(gpt2_dir, val_text, "card")
    run_cli("export", "--run", "card", "--output", workdir / "card")
    records = read_metrics(workdir / "runs/card")
    expected = change_line(records[0]["initial_val_loss"], records[-1]["val_loss"])
    assert f"| before → after fine-tuning | {expected} |" in (workdir / "card" / "README.md").read_text()


def test_no_validation_no_step_0(workdir, gpt2_dir):
    result = run_cli(
        "train", SAMPLE, "--model", gpt2_dir, "--run-name", "noval", "--steps", 2, "--block-size", 16,
        "--batch-size", 4, "--eval-every", 0, "--sample-every", 0,
    )  # fmt: skip
    assert not any("initial_val_loss" in r for r in read_metrics(workdir / "runs/noval"))
    assert "step 0" not in result.output and "→" not in result.output


def test_figures_read_at_a_glance():
    assert [shown(x) for x in (1234.5, 957.46, 41.23, 9.812, 1.049)] == ["1,234", "957", "41.2", "9.81", "1.05"]
    assert [relative_change(41.2, after) for after in (9.8, 40.0, 41.2, 45.0)] == ["−76%", "−2.9%", "±0%", "+9.2%"]
    assert change_line(None, 2.0) == "" and change_line(2.0, None) == ""
