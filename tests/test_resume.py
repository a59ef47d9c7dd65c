"""Fault tolerance through the CLI: exact resume after SIGKILL, SIGTERM, kills during a save,
non-finite losses, corrupt checkpoints, unwritable and full disks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import SAMPLE, make_read_only, make_writable, read_metrics, run_cli

from finetune import checkpoint as ckpt

SAVE_STAGES = [
    "tmp-created",
    "model-written",
    "tokenizer-written",
    "optimizer-written",
    "rng-written",
    "state-written",
    "fsynced",
    "renamed",
    "latest-written",
    "pruned",
]


def train_args(model_dir: Path, run: str, steps: int, save_every: int, *extra) -> list[str]:
    return [
        "train",
        str(SAMPLE),
        "--model",
        str(model_dir),
        "--run-name",
        run,
        "--steps",
        str(steps),
        "--save-every",
        str(save_every),
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--keep",
        "2",
        *map(str, extra),
    ]


def start(args: list[str], cwd: Path, pause_at: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if pause_at:
        env["FINETUNE_TEST_PAUSE_AT"] = pause_at
    # stderr to a file: an undrained pipe could fill up and block the child before it pauses.
    log = open(cwd / f"stderr-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True
    )
    proc.stderr_log = log
    return proc


def stderr_of(proc: subprocess.Popen) -> str:
    proc.stderr_log.flush()
    proc.stderr_log.seek(0)
    return proc.stderr_log.read()


def wait_for_pause(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until the process prints PAUSED (the test hook), then SIGKILL it there."""
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    while "PAUSED" not in line:
        if not line and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before pausing:\n{stderr_of(proc)[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the pause")
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert (wa[key] - wb[key]).abs().max().item() <= 1e-6, key


def finished_run(tmp_path_factory, gpt2_dir, name: str, steps: int, save_every: int) -> Path:
    """A run trained to its end in a directory of its own, for module fixtures to share."""
    root = tmp_path_factory.mktemp(name)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_cli(*train_args(gpt2_dir, name, steps, save_every))
    finally:
        os.chdir(cwd)
    return root / "runs" / name


@pytest.fixture(scope="module")
def reference(tmp_path_factory, gpt2_dir):
    """An uninterrupted 6-step run to compare the interrupted ones with."""
    return finished_run(tmp_path_factory, gpt2_dir, "ref", 6, 2)


def test_sigkill_after_checkpoint_then_resume_is_exact(workdir, gpt2_dir, reference):
    args = train_args(gpt2_dir, "killed", 6, 3)
    proc = start(args, workdir, pause_at="pruned@3")
    wait_for_pause(proc)
    run_dir = workdir / "runs" / "killed"
    assert ckpt.latest_checkpoint(run_dir).name == "checkpoint-000003"
    result = run_cli(*args)
    assert "resuming run 'killed' from checkpoint-000003 (step 3)" in result.output
    ref, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in range(4, 7):
        assert abs(ref[step] - got[step]) <= 1e-6, (step, ref[step], got[step])
    assert_same_weights(reference / "checkpoint-000006", run_dir / "checkpoint-000006")


@pytest.mark.slow  # 30 s: kills a save at many points; tests/test_sweep.py's default cases cover damaged trees
def test_sigkill_during_save_never_breaks_latest(workdir, gpt2_dir, reference):
    """Kill at each stage of writing checkpoint 4 (checkpoint 2 exists); every resume finishes exactly."""

    def kill_at(stage: str) -> Path:
        cwd = workdir / stage
        cwd.mkdir()
        proc = start(train_args(gpt2_dir, "r", 6, 2), cwd, pause_at=f"{stage}@4")
        wait_for_pause(proc)
        return cwd

    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: one per core
        dirs = list(pool.map(kill_at, SAVE_STAGES))
    for stage, cwd in zip(SAVE_STAGES, dirs):
        run_dir = cwd / "runs" / "r"
        latest = ckpt.latest_checkpoint(run_dir)
        ckpt.verify_checkpoint(latest, for_resume=True)  # latest always names a complete checkpoint
        expected = "checkpoint-000004" if stage in ("latest-written", "pruned") else "checkpoint-000002"
        assert latest.name == expected, (stage, latest.name)
        os.chdir(cwd)
        run_cli(*train_args(gpt2_dir, "r", 6, 2))
        assert not list(run_dir.glob(".tmp-*")), f"leftovers after resume ({stage})"
        assert_same_weights(reference / "checkpoint-000006", run_dir / "checkpoint-000006")


def test_sigterm_saves_and_resume_completes(workdir, gpt2_dir):
    args = train_args(gpt2_dir, "term", 100000, 100000)
    proc = start(args, workdir)
    metrics = workdir / "runs" / "term" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, stderr_of(proc)[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    err = stderr_of(proc)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Resume with the same `finetune train` command" in err
    latest = ckpt.latest_checkpoint(workdir / "runs" / "term")
    stopped_at = int(latest.name.split("-")[1])
    assert stopped_at >= 2
    ckpt.verify_checkpoint(latest, for_resume=True)
    result = run_cli(*train_args(gpt2_dir, "term", stopped_at + 2, 100000))
    assert f"from checkpoint-{stopped_at:06d}" in result.output
    assert ckpt.latest_checkpoint(workdir / "runs" / "term").name == f"checkpoint-{stopped_at + 2:06d}"
    assert sorted(losses(workdir / "runs" / "term")) == list(range(1, stopped_at + 3))


def test_nan_loss_stops_and_keeps_the_good_checkpoint(workdir, gpt2_dir, monkeypatch):
    import finetune.training as training

    real = training.forward_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] > 4 and model.training else loss

    monkeypatch.setattr(training, "forward_loss", poisoned)
    result = run_cli(*train_args(gpt2_dir, "nan", 10, 2), expect=2)
    assert "the loss was not finite for 3 steps in a row (at step 5)" in result.output
    assert "the last good checkpoint is runs/nan/checkpoint-000004" in result.output
    latest = ckpt.latest_checkpoint(workdir / "runs" / "nan")
    assert latest.name == "checkpoint-000004"
    ckpt.verify_checkpoint(latest, for_resume=True)
    assert all(v.isfinite().all() for v in weights(latest).values())


def test_truncated_weights_are_named_and_an_earlier_checkpoint_resumes(workdir, gpt2_dir):
    args = train_args(gpt2_dir, "trunc", 2, 1)
    run_cli(*args)
    bad = workdir / "runs/trunc/checkpoint-000002/model.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    result = run_cli("generate", "--run", "trunc", expect=2)
    assert f"checkpoint file {bad.relative_to(workdir)} is corrupt" in result.output and "truncated" in result.output
    result = run_cli(*train_args(gpt2_dir, "trunc", 4, 1), expect=2)
    assert "model.safetensors is corrupt" in result.output and "--resume runs/trunc/checkpoint-NNNNNN" in result.output
    result = run_cli(*train_args(gpt2_dir, "trunc", 3, 1), "--resume", "runs/trunc/checkpoint-000001")
    assert "resuming run 'trunc' from checkpoint-000001 (step 1)" in result.output
    assert ckpt.latest_checkpoint(workdir / "runs/trunc").name == "checkpoint-000003"


def test_corrupt_optimizer_state_is_named(workdir, gpt2_dir):
    run_cli(*train_args(gpt2_dir, "opt", 1, 1))
    (workdir / "runs/opt/checkpoint-000001/training_state/optimizer.pt").write_bytes(b"garbage")
    result = run_cli(*train_args(gpt2_dir, "opt", 2, 1), expect=2)
    assert "checkpoint file runs/opt/checkpoint-000001/training_state/optimizer.pt is corrupt" in result.output


def test_experiment_changes_are_refused_and_harmless_ones_reported(workdir, gpt2_dir, llama_dir):
    run_cli(*train_args(gpt2_dir, "exp", 1, 1))
    result = run_cli(*train_args(gpt2_dir, "exp", 2, 1), "--seed", 7, expect=2)
    assert "cannot resume: --seed changed (42 -> 7)" in result.output
    result = run_cli(*train_args(llama_dir, "exp", 2, 1), expect=2)
    assert "cannot resume: model changed" in result.output
    result = run_cli(*[a if a != "32" else "16" for a in train_args(gpt2_dir, "exp", 2, 1)], expect=2)
    assert "cannot resume: --block-size changed" in result.output
    other = workdir / "other.txt"
    other.write_text(SAMPLE.read_text()[:20000])
    args = train_args(gpt2_dir, "exp", 2, 1)
    args[1] = str(other)
    result = run_cli(*args, expect=2)
    assert "cannot resume: the training data's contents changed" in result.output
    result = run_cli(*train_args(gpt2_dir, "exp", 2, 1), "--lr", "3e-4")
    assert "changed: train.steps 1 -> 2, train.lr 0.0001 -> 0.0003" in result.output


def test_read_only_run_directory(workdir, gpt2_dir):
    args = train_args(gpt2_dir, "ro", 2, 1)
    run_cli(*train_args(gpt2_dir, "ro", 1, 1))
    run_dir = workdir / "runs" / "ro"
    if not make_read_only(run_dir):
        pytest.skip("cannot make a directory read-only for root here (no chattr)")
    try:
        result = run_cli(*args, expect=2)
    finally:
        make_writable(run_dir)
    assert_one_error_line(
        result, "cannot write run config runs/ro/", "make the directory writable or choose another location"
    )
    ckpt.verify_checkpoint(run_dir / "checkpoint-000001", for_resume=True)


def test_disk_full_during_save_keeps_the_previous_checkpoint(workdir, gpt2_dir):
    mount = workdir / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        result = run_cli(*train_args(gpt2_dir, "full", 4, 1), "--keep", "1", "--runs-dir", mount, expect=2)
        assert "could not write checkpoint checkpoint-000002" in result.output
        assert "No space left on device; the previous checkpoint checkpoint-000001 is intact" in result.output
        run_dir = mount / "full"
        assert ckpt.latest_checkpoint(run_dir).name == "checkpoint-000001"
        ckpt.verify_checkpoint(run_dir / "checkpoint-000001", for_resume=True)
        assert not list(run_dir.glob(".tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_ctrl_c_saves_and_a_second_ctrl_c_aborts(workdir, gpt2_dir):
    # First Ctrl-C mid-run: finish the step, save, exit 130.
    proc = start(train_args(gpt2_dir, "int", 100000, 100000), workdir)
    metrics = workdir / "runs" / "int" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    err = stderr_of(proc)
    assert proc.returncode == 130 and "stopped by SIGINT" in err
    saved = ckpt.latest_checkpoint(workdir / "runs" / "int")
    ckpt.verify_checkpoint(saved, for_resume=True)

    # Ctrl-C twice while a save is being written: the second one aborts at once.
    step = int(saved.name.split("-")[1]) + 2
    proc = start(train_args(gpt2_dir, "int", step, 100000), workdir, pause_at=f"model-written@{step}")
    assert "PAUSED" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    err = stderr_of(proc)
    assert proc.returncode == 130 and "aborted" in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(workdir / "runs" / "int") == saved  # the half-written save never became latest


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root`, with a hash of each file's bytes."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    errors = [line for line in result.output.split("\n") if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.output  # on its own line, not the bar's
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, gpt2_dir):
    """A finished 2-step run (checkpoints 1 and 2), copied by each test that damages it."""
    return finished_run(tmp_path_factory, gpt2_dir, "run", 2, 1)


def copy_run(source: Path, workdir: Path) -> Path:
    import shutil

    target = workdir / "runs" / "run"
    shutil.copytree(source, target)
    return target


STATE = "checkpoint-000002/training_state/state.json"


@pytest.mark.parametrize(
    "damage, expected",
    [
        ({"state.json": "{not json"}, "is not valid JSON"),
        ({"state.json": "[1, 2]"}, "holds a JSON list, expected an object"),
        ({"state.json": '{"step": 2}'}, "lacks 'tokens_seen'"),
        ({"rng.pt": "garbage"}, "rng.pt is corrupt"),
        ({"optimizer.pt": "garbage"}, "optimizer.pt is corrupt"),
        ({"--seed": "7"}, "cannot resume: --seed changed (42 -> 7)"),
        (
            {"--optimizer": "sgd"},
            "cannot resume: --optimizer changed ('adamw' -> 'sgd') since the checkpoint; "
            "the checkpoint's optimizer state belongs to the optimizer it was saved with",
        ),
    ],
    ids=["state-not-json", "state-list", "state-missing-key", "rng", "optimizer", "seed", "optimizer-name"],
)
def test_a_refused_resume_changes_nothing_in_the_run(workdir, gpt2_dir, two_step_run, damage, expected):
    run_dir = copy_run(two_step_run, workdir)
    extra = []
    for what, value in damage.items():
        if what.startswith("--"):
            extra += [what, value]
        else:
            (run_dir / "checkpoint-000002/training_state" / what).write_text(value)
    (run_dir / ".tmp-checkpoint-000003").mkdir()  # a crash's leftover: removed only by a resume that goes ahead
    before = snapshot(run_dir)
    result = run_cli(*train_args(gpt2_dir, "run", 4, 1), *extra, expect=None)
    assert_one_error_line(result, expected)
    assert snapshot(run_dir) == before


def test_a_torn_metrics_line_does_not_block_resume(workdir, gpt2_dir, two_step_run):
    run_dir = copy_run(two_step_run, workdir)
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 6.')  # a crash in the middle of a write
    run_cli(*train_args(gpt2_dir, "run", 3, 1))
    assert sorted(losses(run_dir)) == [1, 2, 3]


def test_nan_weights_in_a_checkpoint_are_named_and_an_earlier_one_offered(workdir, gpt2_dir, two_step_run):
    from safetensors.torch import save_file

    run_dir = copy_run(two_step_run, workdir)
    path = run_dir / "checkpoint-000002/model.safetensors"
    tensors = weights(run_dir / "checkpoint-000002")
    tensors["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    before = snapshot(run_dir)
    result = run_cli(*train_args(gpt2_dir, "run", 4, 1), expect=None)
    assert_one_error_line(
        result,
        "the weights in runs/run/checkpoint-000002/model.safetensors hold NaN/inf",
        "resume from an earlier checkpoint with --resume runs/run/checkpoint-000001",
    )
    assert snapshot(run_dir) == before
    run_cli(*train_args(gpt2_dir, "run", 3, 1), "--resume", "runs/run/checkpoint-000001")


def test_full_disk_while_logging_metrics_is_one_line_after_the_bar(workdir, gpt2_dir, monkeypatch):
    import errno

    from finetune import files

    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", full_disk_open, raising=False)
    result = run_cli(*train_args(gpt2_dir, "full", 2, 1), expect=None)
    assert_one_error_line(result, "cannot write metrics file runs/full/metrics.jsonl: the disk is full")


def test_extending_a_finished_run_gives_the_added_steps_a_schedule(workdir, gpt2_dir, two_step_run):
    """2 steps done; --steps 6 adds 4 steps: 2 warmup steps (--warmup 0.5) to --lr, then cosine decay to 0."""
    run_dir = copy_run(two_step_run, workdir)
    result = run_cli(*train_args(gpt2_dir, "run", 6, 1), "--warmup", 0.5, "--lr", 2e-4)
    assert (
        "the 4 added steps get their own LR schedule: 2 warmup steps to --lr 0.0002, then cosine decay to step 6"
        in result.output
    )
    # metrics.jsonl logs after each step the LR the next step uses
    logged = {m["step"]: m["lr"] for m in read_metrics(run_dir) if "lr" in m}
    expected = {3: 1e-4, 4: 2e-4, 5: 1e-4, 6: 0.0}
    assert all(abs(logged[step] - lr) < 1e-12 for step, lr in expected.items()), logged


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, gpt2_dir):
    """A run of 6 steps killed after its checkpoint at step 3: it has not finished its schedule."""
    root = tmp_path_factory.mktemp("stopped")
    wait_for_pause(start(train_args(gpt2_dir, "run", 6, 3), root, pause_at="pruned@3"))
    return root / "runs" / "run"


@pytest.mark.parametrize(
    "change",
    [
        ("--lr", "3e-4"),
        ("--weight-decay", "0.5"),
        ("--schedule", "constant"),
        ("--warmup", "0.9"),
        ("--max-grad-norm", "0.01"),
    ],
)
def test_settings_changed_on_resume_take_effect(workdir, gpt2_dir, stopped_run, change):
    import shutil

    plain, changed = workdir / "runs" / "plain", workdir / "runs" / "changed"
    shutil.copytree(stopped_run, plain)
    shutil.copytree(stopped_run, changed)
    run_cli(*train_args(gpt2_dir, "plain", 6, 3))
    result = run_cli(*train_args(gpt2_dir, "changed", 6, 3), *change)
    assert "changed: train." + change[0][2:].replace("-", "_") in result.output
    lr_plain = {m["step"]: m["lr"] for m in read_metrics(plain) if "lr" in m}
    lr_changed = {m["step"]: m["lr"] for m in read_metrics(changed) if "lr" in m}
    if change[0] == "--lr":  # the new peak drives the rest of the same schedule
        assert all(abs(lr_changed[s] - 3 * lr_plain[s]) < 1e-12 for s in (4, 5)), (lr_plain, lr_changed)
    elif change[0] == "--schedule":
        assert lr_changed[4] == lr_changed[5] == 1e-4 and lr_plain[5] < lr_plain[4] < 1e-4
    elif change[0] == "--warmup":  # 5 of 6 steps of warmup: the LR still rises after step 3
        assert lr_changed[4] < lr_changed[5] and lr_plain[5] < lr_plain[4], (lr_plain, lr_changed)
    a, b = weights(plain / "checkpoint-000006"), weights(changed / "checkpoint-000006")
    assert any(not a[key].equal(b[key]) for key in a), "the changed setting had no effect on the weights"


def test_default_run_names_differ_per_data_format(workdir, gpt2_dir):
    """notes.csv and notes.jsonl are two runs (the second used to be refused: 'contents changed')."""
    import csv
    import json

    texts = [line for line in SAMPLE.read_text().split("\n\n") if line.strip()][:40]
    with open(workdir / "notes.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["text"], *[[t] for t in texts]])
    (workdir / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(texts)))
    (workdir / "notes.txt").write_text("\n\n".join(texts))
    for name in ("notes.csv", "notes.jsonl", "notes.txt"):
        args = train_args(gpt2_dir, "unused", 1, 1)
        args[1] = name
        del args[4:6]  # no --run-name: the default
        run_cli(*args, "--val-fraction", 0)
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["notes", "notes-csv", "notes-jsonl"]
