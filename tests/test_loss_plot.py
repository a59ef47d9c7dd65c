"""loss.png: drawn during training by a helper process (never failing the run), and `finetune plot` for
one or several runs, with one clear line for a damaged metrics file, a run without metrics or no such run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_metrics, run_cli
from short_runs import base_args

from finetune import loss_plot


def train_args(model_dir: Path, run: str, steps: int, *extra) -> list:
    return base_args(model_dir, run, steps, 2, "--runs-dir", "runs", *extra)


def image(path: Path):
    """The PNG's pixels (height, width, channels): the file is a whole, readable image."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, gpt2_dir) -> Path:
    """Two short runs with different learning rates, the first resumed once (its steps continue)."""
    import os

    root = tmp_path_factory.mktemp("plots")
    before = Path.cwd()
    os.chdir(root)
    try:
        run_cli(*train_args(gpt2_dir, "base", 4))
        run_cli(*train_args(gpt2_dir, "base", 6))  # resumed from step 4
        run_cli(*train_args(gpt2_dir, "fast", 4, "--lr", "1e-3"))
    finally:
        os.chdir(before)
    return root


def test_training_draws_loss_png_whose_steps_continue_across_a_resume(two_runs):
    run_dir = two_runs / "runs" / "base"
    pixels = image(run_dir / "loss.png")
    assert pixels.shape[0] > 500 and pixels.shape[1] > 800
    series = loss_plot.read_series(run_dir)
    assert series.train_steps == [1, 2, 3, 4, 5, 6]
    assert series.val_steps == [0, 2, 4, 6]  # step 0: the validation loss before training
    assert series.val_loss[0] == next(m["initial_val_loss"] for m in read_metrics(run_dir) if m["step"] == 0)
    assert series.train_loss == [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def test_plot_draws_one_run_into_its_loss_png_and_several_on_the_same_axes(two_runs, monkeypatch):
    monkeypatch.chdir(two_runs)
    png = two_runs / "runs" / "base" / "loss.png"
    png.unlink()
    result = run_cli("plot", "base")
    assert result.output.strip() == str(Path("runs") / "base" / "loss.png")
    image(png)

    result = run_cli("plot", "base", "fast")
    assert result.output.strip() == "loss-compare.png"
    image(two_runs / "loss-compare.png")

    result = run_cli("plot", "runs/fast", "base", "--output", "out/compare.svg", expect=2)
    assert "out/compare.svg" in result.output  # its directory does not exist: named, one line
    assert len(result.output.strip().splitlines()) == 1
    (two_runs / "out").mkdir()
    run_cli("plot", "runs/fast", "base", "--output", "out/compare.svg")
    assert (two_runs / "out" / "compare.svg").read_text().lstrip().startswith("<?xml")


def test_a_torn_last_line_is_left_out_and_other_damage_is_one_line(tmp_path, two_runs, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "torn"
    shutil.copytree(two_runs / "runs" / "fast", run_dir)
    metrics = run_dir / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 5, "loss": 3.1')  # a crash mid-line
    run_cli("plot", "torn")
    assert loss_plot.read_series(run_dir).train_steps == [1, 2, 3, 4]

    lines = whole.splitlines()
    metrics.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    result = run_cli("plot", "torn", expect=2)
    assert result.output.startswith("error: metrics file runs/torn/metrics.jsonl:2 is not valid JSON")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "case, words",
    [
        ("unknown", "no run named 'nope'"),
        ("no metrics", "run 'empty' has no metrics yet"),
        ("bad output", "--output loss.jpg must end in one of .png, .svg, .pdf"),
    ],
)
def test_plot_errors_are_one_line(tmp_path, monkeypatch, case, words):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    (empty / "config.yaml").write_text("model: {name: tiny}\n")
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens_seen": 64}) + "\n")
    args = {"unknown": ["nope"], "no metrics": ["empty"], "bad output": ["empty", "--output", "loss.jpg"]}[case]
    result = run_cli("plot", *args, expect=2)
    assert words in result.output and len(result.output.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))


def test_a_failing_plot_warns_once_and_training_goes_on(workdir, gpt2_dir):
    run_dir = workdir / "runs" / "unplottable"
    (run_dir / "loss.png").mkdir(parents=True)  # a directory where the plot goes: every drawing fails
    result = run_cli(*train_args(gpt2_dir, "unplottable", 6))
    warnings = [line for line in result.output.splitlines() if "is no longer drawn" in line]
    assert len(warnings) == 1, result.output
    assert "loss.png" in warnings[0] and "training goes on" in warnings[0]
    assert (run_dir / "checkpoint-000006").is_dir()
    assert "loss plot:" not in result.output


def test_smoothing_follows_the_trend_and_starts_at_the_first_value():
    values = [float(10 - i % 2 * 2 - i * 0.1) for i in range(60)]  # a zigzag falling line
    smooth = loss_plot.smoothed(values)
    assert smooth[0] == values[0]
    assert max(abs(a - b) for a, b in zip(smooth[10:], smooth[11:])) < 0.8  # the zigzag (2.0) mostly gone
    assert smooth[-1] < smooth[10]


def test_ctrl_c_stops_training_and_loss_png_is_drawn_to_the_last_step(workdir, gpt2_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    args = [str(a) for a in train_args(gpt2_dir, "stopped", 100000)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", *args], cwd=workdir, env=env, stderr=subprocess.PIPE, text=True
    )
    run_dir = workdir / "runs" / "stopped"
    deadline = time.monotonic() + 180
    while not (
        (run_dir / "loss.png").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 4
    ):  # step 0 + 3
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    before = (run_dir / "loss.png").stat().st_mtime_ns
    proc.send_signal(signal.SIGINT)  # to training only: the plot's helper is in a session of its own
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "stopped by SIGINT" in err
    assert f"loss plot: {Path('runs') / 'stopped' / 'loss.png'}" in err and "no longer drawn" not in err
    last = loss_plot.read_series(run_dir).train_steps[-1]
    assert (run_dir / "loss.png").stat().st_mtime_ns > before and last >= 3
