"""`finetune runs` through the CLI: a table of every run (finished, failed, stopped by a signal, running, killed,
damaged in each way a crash or a bad copy leaves a run), `--json`, and one run in detail."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import short_runs
import yaml
from conftest import REPO, read_metrics, run_cli

# Damaged copies of the finished run, each with what `finetune runs` must say about it (None: nothing, it is fine).
DAMAGED = {
    "torn": None,  # metrics.jsonl's last line cut off by a crash: dropped, as training drops it on resume
    "corrupt": "metrics.jsonl:2 is not valid JSON",
    "no-checkpoints": None,
    "bad-state": "state.json is not valid JSON",
    "bad-weights": "model.safetensors is corrupt",
    "bad-config": "config.yaml is not valid YAML",
    "bad-status": "status.json is not valid JSON",
}


def train_args(model_dir: Path, run: str, steps: int, *extra) -> list:
    return short_runs.base_args(model_dir, run, steps, 4, *extra)


def damage(runs: Path, name: str) -> None:
    run = runs / name
    shutil.copytree(runs / "done", run)
    latest = run / "checkpoint-000004"
    if name == "torn":
        with open(run / "metrics.jsonl", "a") as fh:
            fh.write('{"step": 5, "loss": 3.')
    elif name == "corrupt":
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        (run / "metrics.jsonl").write_text(lines[0] + "}{ not json\n" + "".join(lines[1:]))
    elif name == "no-checkpoints":
        for path in run.glob("checkpoint-*"):
            shutil.rmtree(path)
        (run / "latest").unlink()
    elif name == "bad-state":
        (latest / "training_state" / "state.json").write_text('{"step": 4, ')
    elif name == "bad-weights":
        weights = latest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif name == "bad-config":
        (run / "config.yaml").write_text("model: [tiny\n")
    elif name == "bad-status":
        (run / "status.json").write_text('{"status": "fini')


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_dir) -> Path:
    """A runs directory: a finished run, a failed one, damaged copies of the finished one and two strays."""
    root = tmp_path_factory.mktemp("runs-table")
    with contextlib.chdir(root):
        run_cli(*train_args(gpt2_dir, "done", 4, "--eval-every", 2, "--save-every", 2, "--sample-every", 2))
        # A learning rate this high makes the loss non-finite at once: training stops with an error. Saving and
        # sampling at the defaults (base_args sets its own cadences).
        fail_args = ("--lr", 1e8, "--warmup", 0, "--eval-every", 0, "--save-every", 500, "--sample-every", 200)
        failed = run_cli(*train_args(gpt2_dir, "failed", 20, *fail_args), expect=2)
        assert "the loss was not finite" in failed.output
    runs = root / "runs"
    for name in DAMAGED:
        damage(runs, name)
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("try a larger model\n")
    (runs / "README.txt").write_text("my runs\n")
    return runs


def listing(runs: Path) -> dict:
    result = run_cli("runs", "--runs-dir", runs, "--json")
    return {run["name"]: run for run in json.loads(result.stdout)["runs"]} | {
        "not_runs": json.loads(result.stdout)["not_runs"]
    }


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def assert_clean(result) -> None:
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output


def test_json_describes_finished_and_failed_runs(runs):
    found = listing(runs)
    done = found["done"]
    evals = [m for m in read_metrics(runs / "done") if "val_perplexity" in m]
    assert done["status"] == "finished" and done["problems"] == []
    assert (done["steps_done"], done["steps_planned"]) == (4, 4)
    assert done["model"].endswith("tiny-gpt2")
    assert done["validation"]["best"] == min(m["val_perplexity"] for m in evals)
    assert (done["validation"]["last"], done["validation"]["last_step"]) == (evals[-1]["val_perplexity"], 4)
    assert done["last_checkpoint"] == "checkpoint-000004"
    assert done["size_bytes"] == disk_bytes(runs / "done")
    assert done["started"] and done["ended"] and done["pid"] is None

    failed = found["failed"]
    assert failed["status"] == "failed" and "the loss was not finite" in failed["error"], failed
    assert failed["steps_planned"] == 20 and failed["steps_done"] < 20
    assert found["not_runs"] == [str(runs / "notes")]


def test_table_lists_every_run_and_marks_the_damaged_ones(runs):
    result = run_cli("runs", "--runs-dir", runs)
    assert_clean(result)
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "run",
        "model",
        "steps",
        "status",
        "best",
        "val",
        "ppl",
        "last",
        "val",
        "ppl",
        "last",
        "checkpoint",
        "size",
    ]
    rows = {
        line.split()[0]: line for line in lines[1:] if line.split() and line.split()[0] in {"done", "failed", *DAMAGED}
    }
    assert set(rows) == {"done", "failed", *DAMAGED}
    assert "4/4" in rows["done"] and "finished" in rows["done"] and "checkpoint-000004" in rows["done"]
    assert " failed " in rows["failed"]
    for name, problem in DAMAGED.items():
        marked = rows[name].split()[1] == "!"
        assert marked == (problem is not None), rows[name]
        if problem:
            notes = [line for line in lines if line.startswith(f"! {name}: ")]
            assert len(notes) == 1 and problem in notes[0], (name, lines)
    assert "-" in rows["no-checkpoints"].split()  # no last checkpoint
    assert f"ignored: {runs / 'notes'}" in result.output


def test_damaged_runs_are_listed_with_what_can_be_read(runs):
    found = listing(runs)
    done = found["done"]
    assert found["torn"]["validation"] == done["validation"] and found["torn"]["problems"] == []
    assert found["no-checkpoints"]["last_checkpoint"] is None and found["no-checkpoints"]["status"] == "finished"
    for name, problem in DAMAGED.items():
        run = found[name]
        assert [problem in p for p in run["problems"]] == ([True] if problem else []), (name, run["problems"])
    assert found["corrupt"]["validation"]["best"] is None  # the file is named rather than half-read
    assert found["bad-state"]["validation"] == done["validation"]  # the other columns are read as usual
    assert found["bad-config"]["model"] is None and found["bad-config"]["steps_planned"] == 4  # from status.json
    assert found["bad-status"]["status"] == "finished"  # as for a run from before status.json: it reached its end


def test_one_run_in_detail(runs):
    result = run_cli("runs", "done", "--runs-dir", runs)
    assert_clean(result)
    state = json.loads((runs / "done/checkpoint-000004/training_state/state.json").read_text())
    out = result.output
    assert f"command     {state['command']}\n" in out
    assert "status      finished at step 4 of 4\n" in out
    assert "train.steps" in out and "train.sample_every" in out
    assert "checkpoint-000002  step 2" in out and "latest" in out.split("checkpoint-000004")[1].splitlines()[0]
    assert str(runs / "done/samples/samples-000004.txt") in out

    detail = json.loads(run_cli("runs", "done", "--runs-dir", runs, "--json").stdout)
    assert detail["command"] == state["command"] and detail["command"].startswith("finetune train ")
    assert detail["config"] == yaml.safe_load((runs / "done/config.yaml").read_text())
    assert [(c["name"], c["step"], c["latest"]) for c in detail["checkpoints"]] == [
        ("checkpoint-000002", 2, False),
        ("checkpoint-000004", 4, True),
    ]
    assert detail["checkpoints"][1]["size_bytes"] == disk_bytes(runs / "done/checkpoint-000004")
    assert detail["samples"] == [str(runs / f"done/samples/samples-00000{s}.txt") for s in (2, 4)]


def test_a_failed_run_in_detail_says_why_and_how_it_was_started(runs):
    out = run_cli("runs", "failed", "--runs-dir", runs).output
    status = next(line for line in out.splitlines() if line.startswith("status "))
    assert "failed at step 1 of 20: the loss was not finite for 3 steps in a row" in status, out
    # No checkpoint holds its command: status.json does.
    assert "command     finetune train " in out and "--lr 100000000.0" in out, out
    assert "checkpoints: none yet" in out and "samples: none" in out


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_a_damaged_run_in_detail_names_its_problem_in_one_line(runs, name):
    result = run_cli("runs", name, "--runs-dir", runs)
    assert_clean(result)
    problems = [line for line in result.output.splitlines() if line.startswith("problem ")]
    if DAMAGED[name]:
        assert len(problems) == 1 and DAMAGED[name] in problems[0], result.output
    else:
        assert not problems, result.output
    if name == "no-checkpoints":
        assert "checkpoints: none yet" in result.output


def test_what_is_not_a_run_gets_one_error_line(runs, tmp_path):
    for args, fragment in [
        (["notes"], f"{runs / 'notes'} is not a run"),
        (["nothing"], "no run named 'nothing'; runs in"),
    ]:
        result = run_cli("runs", *args, "--runs-dir", runs, expect=2)
        assert_clean(result)
        assert result.output.count("error:") == 1 and fragment in result.output, result.output
    a_file = tmp_path / "runs-file"
    a_file.write_text("")
    result = run_cli("runs", "--runs-dir", a_file, expect=2)
    assert f"error: --runs-dir {a_file} is a file, not a directory" in result.output


def test_no_runs_yet_says_how_to_start_one(tmp_path):
    (tmp_path / "empty").mkdir()
    for runs in (tmp_path / "missing", tmp_path / "empty"):
        result = run_cli("runs", "--runs-dir", runs)
        assert result.output.startswith(f"no runs in {runs}/ yet; start one with `finetune train DATA`")
        assert json.loads(run_cli("runs", "--runs-dir", runs, "--json").stdout)["runs"] == []
    assert not (tmp_path / "missing").exists()


def test_a_run_from_before_status_files_reads_as_finished():
    runs = REPO / "tests/fixtures/golden_run/runs"
    found = listing(runs)
    assert found["golden"]["status"] == "finished" and found["golden"]["problems"] == []
    assert (found["golden"]["steps_done"], found["golden"]["steps_planned"]) == (8, 8)
    assert not (runs / "golden" / "status.json").exists()


def start_training(args: list, cwd: Path) -> subprocess.Popen:
    log = open(cwd / f"stderr-{time.monotonic_ns()}.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune", *map(str, args)], cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, text=True
    )
    proc.stderr_log = log
    return proc


def wait_for_steps(proc: subprocess.Popen, metrics: Path, steps: int) -> None:
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().count("\n") >= steps):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.stderr_log.seek(0)
            raise AssertionError(f"training ended or stalled:\n{proc.stderr_log.read()[-3000:]}")
        time.sleep(0.1)


def test_running_then_stopped_by_sigint_then_killed(workdir, gpt2_dir):
    args = train_args(gpt2_dir, "live", 100000, "--eval-every", 0, "--sample-every", 0, "--save-every", 100000)
    metrics = workdir / "runs" / "live" / "metrics.jsonl"

    proc = start_training(args, workdir)
    wait_for_steps(proc, metrics, 2)
    running = listing(workdir / "runs")["live"]
    assert running["status"] == "running" and running["pid"] == proc.pid, running
    assert running["steps_planned"] == 100000 and running["steps_done"] >= 2
    assert f"running (pid {proc.pid})" in run_cli("runs", "--runs-dir", workdir / "runs").output
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode == 130
    stopped = listing(workdir / "runs")["live"]
    assert stopped["status"] == "stopped" and stopped["signal"] == "SIGINT", stopped
    assert stopped["last_checkpoint"] == f"checkpoint-{stopped['steps_done']:06d}"
    detail = run_cli("runs", "live", "--runs-dir", workdir / "runs").output
    assert f"stopped by SIGINT at step {stopped['steps_done']} of 100000; run the same `finetune train`" in detail
    assert "stopped (SIGINT)" in run_cli("runs", "--runs-dir", workdir / "runs").output

    # Resumed, then killed outright: nothing records how it ended, and the lock is gone with the process.
    proc = start_training(args, workdir)
    wait_for_steps(proc, metrics, stopped["steps_done"] + 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed = listing(workdir / "runs")["live"]
    assert killed["status"] == "killed" and killed["problems"] == [], killed
    assert (
        "killed, out of memory, or the machine stopped"
        in run_cli("runs", "live", "--runs-dir", workdir / "runs").output
    )


def test_listing_runs_does_not_import_torch(runs):
    code = (
        "import sys\n"
        "from finetune.cli import main\n"
        f"try:\n    main(['runs', '--runs-dir', {str(runs)!r}])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False False", out
