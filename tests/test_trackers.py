"""`finetune train --report-to`: TensorBoard, MLflow and W&B (offline) receive metrics.jsonl's numbers through
accelerate, a resume continues the same tracker runs, and a missing tracker package is one line."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SAMPLE, read_metrics, run_cli
from short_runs import base_args

from finetune import trackers


def train_args(model_dir: Path, run: str, steps: int, *extra) -> list:
    return base_args(model_dir, run, steps, 2, "--runs-dir", "runs", *extra)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard reads from runs/<run>/tb/, as (step, value) in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


BEFORE_TRAINING = {"val_loss": "initial_val_loss", "val_perplexity": "initial_val_perplexity"}


def expected(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """metrics.jsonl's values of `key`, by step; trackers get the step-0 validation as the first val/* point."""
    rows = []
    for m in read_metrics(run_dir):
        found = key if key in m else BEFORE_TRAINING.get(key)
        if found in m:
            rows.append((m["step"], m[found]))
    return rows


def assert_same(logged: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [step for step, _ in logged] == [step for step, _ in want]
    assert [value for _, value in logged] == pytest.approx([value for _, value in want], rel=1e-6)


def test_tensorboard_and_mlflow_receive_the_metrics_and_config_and_a_resume_continues_them(
    workdir, gpt2_dir, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_cli(*train_args(gpt2_dir, "tracked", 4, "--report-to", "tensorboard,mlflow"))
    run_dir = workdir / "runs" / "tracked"
    assert (run_dir / "loss.png").is_file()
    tb = scalars(run_dir)
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/tokens_per_s", "tokens_per_s")]:
        assert_same(tb[tag], expected(run_dir, key))
    assert_same(tb["val/loss"], expected(run_dir, "val_loss"))
    assert_same(tb["val/perplexity"], expected(run_dir, "val_perplexity"))
    assert [step for step, _ in tb["val/loss"]] == [0, 2, 4]  # 0: before training

    from mlflow.tracking import MlflowClient

    uri = (run_dir / "mlruns").resolve().as_uri()
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=uri)
    params = client.get_run(run_id).data.params
    assert params["train.run_name"] == "tracked" and params["train.steps"] == "4"
    assert params["data.block_size"] == "32" and params["train.report_to"] == "tensorboard,mlflow"

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    assert_same(history("train/loss"), expected(run_dir, "loss"))
    assert_same(history("val/perplexity"), expected(run_dir, "val_perplexity"))

    # Continue the run (with a changed --lr, which MLflow cannot take as a parameter): the same MLflow run.
    result = run_cli(*train_args(gpt2_dir, "tracked", 6, "--report-to", "tensorboard,mlflow", "--lr", "2e-4"))
    assert f"reporting to mlflow: run {run_id}" in result.output
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"] == run_id
    assert_same(history("train/loss"), expected(run_dir, "loss"))
    assert [step for step, _ in history("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert client.get_run(run_id).data.params["train.steps"] == "4", "MLflow keeps a run's first parameters"
    assert_same(scalars(run_dir)["train/loss"], expected(run_dir, "loss"))


def wandb_history(run_file: str) -> tuple[str, list[dict]]:
    """The run id and history rows of a W&B offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, run_id, rows = Path(run_file).read_bytes(), "", []
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the rest of a block is padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return run_id, rows


@pytest.fixture
def wandb_offline(workdir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(workdir / "wandb-home"))


def test_resume_from_an_earlier_checkpoint_continues_tensorboard_and_wandb_without_duplicate_steps(
    workdir, gpt2_dir, wandb_offline
):
    run_cli(*train_args(gpt2_dir, "resumed", 4, "--report-to", "tensorboard,wandb"))
    run_dir = workdir / "runs" / "resumed"
    wandb_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    (first,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{wandb_id}.wandb"))
    run_id, rows = wandb_history(first)
    assert run_id == wandb_id
    assert [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r] == expected(run_dir, "loss")
    assert [(r["_step"], r["val/loss"]) for r in rows if "val/loss" in r] == expected(run_dir, "val_loss")

    # Steps 3-4 are trained again from checkpoint 2: TensorBoard forgets its first steps 3-4, W&B continues its run.
    run_cli(
        *train_args(
            gpt2_dir, "resumed", 6, "--report-to", "tensorboard,wandb", "--resume", "runs/resumed/checkpoint-000002"
        )
    )
    tb = scalars(run_dir)
    assert [step for step, _ in tb["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert_same(tb["train/loss"], expected(run_dir, "loss"))
    assert_same(tb["val/loss"], expected(run_dir, "val_loss"))
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"] == wandb_id
    files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{wandb_id}.wandb") for f in files)
    second = [f for f in files if f != first][0]
    run_id, rows = wandb_history(second)
    assert run_id == wandb_id
    assert [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r] == expected(run_dir, "loss")[2:]


def blocked_import_run(args: list, blocked: tuple[str, ...], cwd: Path) -> subprocess.CompletedProcess:
    """`finetune ARGS` in a process where importing the `blocked` packages fails, as if not installed."""
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "from finetune.cli import main\n"
        "main()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_missing_tracker_package_is_one_line_naming_its_extra(workdir, gpt2_dir):
    args = train_args(gpt2_dir, "untracked", 2, "--report-to", "tensorboard")
    result = blocked_import_run(args, ("tensorboard",), workdir)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--report-to tensorboard needs the tensorboard package" in lines[0] and "[tensorboard]" in lines[0]
    assert not (workdir / "runs" / "untracked").exists()

    args = train_args(gpt2_dir, "untracked", 2, "--report-to", "all")
    result = blocked_import_run(args, tuple(module for module, _ in trackers.TRACKERS.values()), workdir)
    assert result.returncode == 2 and "--report-to all found no tracker installed" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "value, words",
    [("tensorbord", "is not one of none, all, tensorboard"), ("none,wandb", "stand alone"), (",", "is not one of")],
)
def test_a_bad_report_to_is_refused_before_anything_runs(workdir, value, words):
    result = run_cli("train", SAMPLE, "--model", "tiny", "--report-to", value, expect=2)
    assert words in result.output and len(result.output.strip().splitlines()) == 1
    assert not (workdir / "runs").exists()


def test_report_to_all_means_the_installed_trackers():
    assert trackers.resolve("all") == tuple(trackers.TRACKERS)  # the test extra installs all four
    assert trackers.resolve("none") == ()
    assert trackers.resolve("MLflow, tensorboard,mlflow") == ("mlflow", "tensorboard")


def test_config_flattens_into_hyperparameters_and_old_runs_default_to_none(tmp_path):
    flat = trackers.flatten({"model": {"name": "tiny", "lora_targets": ["a", "b"]}, "train": {"steps": None}})
    assert flat == {"model.name": "tiny", "model.lora_targets": "a,b", "train.steps": "None"}
    assert trackers.values({"step": 3, "loss": 1.5, "val_loss": 2.0, "val_perplexity": 7.4}) == {
        "train/loss": 1.5,
        "val/loss": 2.0,
        "val/perplexity": 7.4,
    }
    from finetune.config import resolve_run_config

    config = tmp_path / "old.yaml"  # a config file without train.report_to, as runs before it wrote them
    config.write_text(yaml.safe_dump({"model": {"name": "tiny"}, "train": {"steps": 3}}))
    assert resolve_run_config(str(config), {"data": {"paths": ["x.txt"]}}).train.report_to == "none"


@pytest.mark.slow  # trackio's finish waits for its sender thread: most of a minute on a busy machine
def test_trackio_receives_the_metrics(workdir, gpt2_dir):
    """trackio reads TRACKIO_DIR once, at import: a process of its own writes into this test's directory."""
    import sqlite3

    env = dict(os.environ, PYTHONPATH=str(REPO), TRACKIO_DIR=str(workdir / "trackio"))
    args = train_args(gpt2_dir, "tracked", 2, "--report-to", "trackio")
    result = subprocess.run(
        [sys.executable, "-m", "finetune", *map(str, args)], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = workdir / "runs" / "tracked"
    with sqlite3.connect(workdir / "trackio" / f"{trackers.PROJECT}.db") as db:
        rows = db.execute("select run_name, step, metrics from metrics order by id").fetchall()
        (config,) = db.execute("select config from configs").fetchone()
    logged = [(step, json.loads(values)) for name, step, values in rows if name == "tracked"]
    assert [(step, m["train/loss"]) for step, m in logged if "train/loss" in m] == expected(run_dir, "loss")
    assert [(step, m["val/loss"]) for step, m in logged if "val/loss" in m] == expected(run_dir, "val_loss")
    assert json.loads(config)["train.report_to"] == "trackio"
