"""Exact resume across epoch boundaries: a run killed mid-epoch and resumed logs the same losses and
ends with bit-identical weights as an uninterrupted run, in one process and in two."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLE, make_model_dir, run_cli
from test_resume import losses, stderr_of, weights

STEPS = 10  # 13 blocks of 16 tokens at batch 4: 4 steps per epoch, so epochs begin at steps 5 and 9


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(SAMPLE.read_text()[:700])
    return path


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    """No dropout: two processes split a batch, and only then match one process bit for bit."""
    return make_model_dir(tmp_path_factory.mktemp("plain") / "gpt2", "gpt2", dropout=False)


def args_for(data: Path, model: Path, run: str, batch: int, *extra) -> list[str]:
    return [
        "train",
        str(data),
        "--model",
        str(model),
        "--run-name",
        run,
        "--steps",
        str(STEPS),
        "--save-every",
        "3",
        "--block-size",
        "16",
        "--batch-size",
        str(batch),
        "--val-fraction",
        "0",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--keep",
        "5",
        *map(str, extra),
    ]


def kill_when_paused(args: list[str], cwd: Path, pause_at: str, timeout: float = 300) -> None:
    """Run `finetune ARGS` until it prints PAUSED at `pause_at`, then SIGKILL it and all its processes."""
    env = {**os.environ, "FINETUNE_TEST_PAUSE_AT": pause_at}
    log = open(cwd / f"stderr-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    proc.stderr_log = log
    deadline = time.monotonic() + timeout
    try:
        line = proc.stdout.readline()
        while "PAUSED" not in line:
            assert line or proc.poll() is None, f"ended ({proc.returncode}) before pausing:\n{stderr_of(proc)[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the pause"
            line = proc.stdout.readline()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_finetune(args: list[str], cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "finetune", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def assert_identical_runs(reference: Path, resumed: Path) -> None:
    ref, got = losses(reference), losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(ref)], (ref, got)
    a, b = weights(reference / f"checkpoint-{STEPS:06d}"), weights(resumed / f"checkpoint-{STEPS:06d}")
    assert a.keys() == b.keys()
    assert all(a[key].equal(b[key]) for key in a), "final weights differ"


def test_resume_mid_epoch_matches_across_two_epoch_boundaries(workdir, small_data, gpt2_dir):
    """Killed at step 3 (epoch 1), resumed through the epoch starts at steps 5 and 9."""
    run_cli(*args_for(small_data, gpt2_dir, "ref", 4))
    args = args_for(small_data, gpt2_dir, "killed", 4)
    kill_when_paused(args, workdir, "pruned@3")
    result = run_cli(*args)
    assert "resuming run 'killed' from checkpoint-000003 (step 3)" in result.output
    assert_identical_runs(workdir / "runs/ref", workdir / "runs/killed")


def test_resume_in_a_later_epoch_matches(workdir, small_data, gpt2_dir):
    """Killed at step 6 (inside the second epoch): the resumed pass must not restart the first epoch's order."""
    run_cli(*args_for(small_data, gpt2_dir, "ref", 4))
    args = args_for(small_data, gpt2_dir, "later", 4)
    kill_when_paused(args, workdir, "pruned@6")
    run_cli(*args)
    assert_identical_runs(workdir / "runs/ref", workdir / "runs/later")


@pytest.mark.slow
def test_two_processes_resume_across_epoch_boundaries(workdir, small_data, plain_model):
    """2 gloo processes x batch 2: killed at step 3, resumed to step 10, equal to an uninterrupted 2-process run."""
    two = ("--num-processes", "2")
    run_finetune([*args_for(small_data, plain_model, "ref", 2), *two], workdir)
    args = [*args_for(small_data, plain_model, "killed", 2), *two]
    kill_when_paused(args, workdir, "pruned@3")
    err = run_finetune(args, workdir)
    assert "resuming run 'killed' from checkpoint-000003 (step 3)" in err
    assert_identical_runs(workdir / "runs/ref", workdir / "runs/killed")
