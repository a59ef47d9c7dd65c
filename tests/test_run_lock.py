"""One `finetune train` per run: a second process on the same run is refused in one line naming the
holder's pid, changes nothing (not even with --overwrite), and the run continues once the holder is gone."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_cli
from test_resume import start, stderr_of, train_args


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root`, with a hash of each file's bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


def paused(proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    while "PAUSED" not in line:
        assert line or proc.poll() is None, f"ended ({proc.returncode}) before pausing:\n{stderr_of(proc)[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the pause"
        line = proc.stdout.readline()


def assert_refused(result, pid: int) -> None:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: run 'locked' is in use by another finetune process (pid {pid}); wait for it to finish or stop it, "
        f"or use another --run-name"
    ], result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output


def test_second_process_on_a_run_is_refused_and_changes_nothing(workdir, gpt2_dir):
    args = train_args(gpt2_dir, "locked", 3, 1)
    holder = start(args, workdir, pause_at="pruned@2")  # holds the run with checkpoints 1 and 2 written
    try:
        paused(holder)
        run_dir = workdir / "runs" / "locked"
        before = snapshot(run_dir)
        assert_refused(run_cli(*args, expect=None), holder.pid)
        assert_refused(run_cli(*args, "--overwrite", expect=None), holder.pid)  # --overwrite deletes nothing
        assert_refused(run_cli(*args, "--num-processes", 2, expect=None), holder.pid)  # refused before launching
        assert snapshot(run_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the killed holder's lock: the run resumes from its latest checkpoint.
    result = run_cli(*args)
    assert "resuming run 'locked' from checkpoint-000002 (step 2)" in result.output
    assert not (workdir / "runs" / ".locked.lock").exists()


def test_accelerate_ranks_other_than_0_do_not_lock(workdir, gpt2_dir, monkeypatch):
    """Under `accelerate launch` every rank runs train(); only rank 0 may take the lock (rank 1 would find it taken)."""
    from finetune import locking, runs

    run_dir = workdir / "runs" / "shared"
    with locking.exclusive(run_dir, "run 'shared'", "use another --run-name"):  # rank 0, here
        monkeypatch.setenv("RANK", "1")
        with runs.run_lock(run_dir):
            assert locking.holder_pid(run_dir) == os.getpid()
        monkeypatch.setenv("RANK", "0")
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "from pathlib import Path; from finetune import runs\n"
                f"with runs.run_lock(Path({str(run_dir)!r})): pass",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "RANK": "0"},
        )
        assert proc.returncode != 0 and f"(pid {os.getpid()})" in proc.stderr
