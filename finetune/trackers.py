"""Experiment trackers (`--report-to`): TensorBoard, W&B, MLflow and trackio, all through accelerate.

accelerate does the writing: `Accelerator(log_with=..., project_dir=run_dir)`, `init_trackers`,
`accelerator.log` and `end_training` (training.finish). This module decides what they are given:

- which trackers: `--report-to none|all|NAME[,NAME...]`; `all` means those of the four that are installed;
  a named tracker whose package is missing stops the run before anything loads, naming its extra;
- where: TensorBoard event files in runs/<run>/tb/, MLflow's file store in runs/<run>/mlruns/ (unless
  MLFLOW_TRACKING_URI is set), W&B's files in runs/<run>/wandb/ (online or offline as WANDB_MODE says);
- how a resumed run continues the same tracker run: the W&B and MLflow run ids are kept in
  runs/<run>/trackers.json, and TensorBoard purges the steps after the checkpoint (as metrics.jsonl does);
- what: the metrics.jsonl records (train/loss, train/lr, train/tokens_per_s, train/mfu, val/loss,
  val/perplexity, ...) at their step, and the resolved config, flattened, as hyperparameters.

Only the main process starts and logs (accelerate's trackers run on the main process only).
Light at import: the tracker packages are imported only when a run asks for them.
"""

from __future__ import annotations

import importlib
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune import files
from finetune.errors import FinetuneError, install_hint

if TYPE_CHECKING:
    from accelerate import Accelerator

# --report-to name -> (module to import, extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
CHOICES = ("none", "all", *TRACKERS)
PROJECT = "finetune"  # the W&B / trackio project and the MLflow experiment (WANDB_PROJECT overrides)
TB_DIR = "tb"
MLFLOW_DIR = "mlruns"
IDS_FILE = "trackers.json"  # the W&B and MLflow run ids a resume continues


def parse(report_to: str) -> tuple[str, ...]:
    """The names in `--report-to` ("none", "all" or a comma list), checked; "all" is kept as is."""
    names = tuple(dict.fromkeys(part.strip().lower() for part in report_to.split(",") if part.strip()))
    unknown = [name for name in names if name not in CHOICES]
    if unknown or not names:
        raise FinetuneError(
            f"train.report_to (--report-to) {report_to!r} is not one of {', '.join(CHOICES)} "
            f"(or a comma-separated list such as tensorboard,mlflow)"
        )
    if len(names) > 1 and ("none" in names or "all" in names):
        raise FinetuneError("--report-to none and all stand alone; drop the other names")
    return () if names == ("none",) else names


def _importable(name: str) -> bool:
    try:
        importlib.import_module(TRACKERS[name][0])
    except ImportError:
        return False
    return True


def resolve(report_to: str) -> tuple[str, ...]:
    """The trackers to start: each one importable, or one line naming the extra that installs it.

    `all` is the installed ones among the four, and an error when there are none.
    """
    names = parse(report_to)
    if names == ("all",):
        found = tuple(name for name in TRACKERS if _importable(name))
        if not found:
            raise FinetuneError(
                "--report-to all found no tracker installed; install one, e.g. "
                f"{install_hint('tensorboard')} (or the wandb, mlflow or trackio extra)"
            )
        return found
    for name in names:
        if not _importable(name):
            raise FinetuneError(
                f"--report-to {name} needs the {TRACKERS[name][0]} package; install it with: "
                f"{install_hint(TRACKERS[name][1])} (or drop --report-to {name})"
            )
    return names


def accelerator_options(names: tuple[str, ...], run_dir: Path) -> dict[str, Any]:
    """Accelerator(...)'s tracker arguments; TensorBoard as accelerate's own tracker, so its
    directory is runs/<run>/tb/ (by name accelerate would put it under a project subdirectory)."""
    if not names:
        return {}
    from accelerate.tracking import TensorBoardTracker

    log_with: list[Any] = [TensorBoardTracker(TB_DIR, run_dir) if name == "tensorboard" else name for name in names]
    return {"log_with": log_with, "project_dir": str(run_dir)}


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """The resolved config as hyperparameters: `train.lr` -> 0.002; lists joined by commas, None as "None"."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def values(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker values: `val_loss` -> `val/loss`, `loss` -> `train/loss`."""
    return {
        (f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"): value
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _read_ids(run_dir: Path) -> dict:
    path = run_dir / IDS_FILE
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged ids file only costs continuity: the trackers start new runs
    return ids if isinstance(ids, dict) else {}


def _init_kwargs(names: tuple[str, ...], run_dir: Path, ids: dict) -> dict[str, dict]:
    name = run_dir.name
    kwargs: dict[str, dict] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"name": name, "id": ids["wandb"], "resume": "allow", "dir": str(run_dir)}
    if "mlflow" in names:
        kwargs["mlflow"] = {"run_name": name, "run_id": ids.get("mlflow")}
    if "trackio" in names:
        kwargs["trackio"] = {"name": name, "resume": "allow"}
    return kwargs


def start(
    accelerator: Accelerator, names: tuple[str, ...], run_dir: Path, config: dict, step: int, resumed: bool
) -> list[str]:
    """Start the trackers (main process) at `step`; returns one line per tracker saying where it writes.

    A resumed run continues the tracker runs its trackers.json names; a fresh start begins new ones.
    """
    if not accelerator.is_main_process or not names:
        return []
    ids = _read_ids(run_dir) if resumed else {}
    if "wandb" in names:
        ids.setdefault("wandb", uuid.uuid4().hex[:8])  # chosen here, so a resume can name it to W&B
    if "tensorboard" in names:
        # A resume trains the steps after the checkpoint again: TensorBoard forgets its events from there on.
        (tb,) = [t for t in accelerator.log_with if getattr(t, "name", None) == "tensorboard"]
        tb.init_kwargs["purge_step"] = step + 1
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        store = (run_dir / MLFLOW_DIR).resolve().as_uri()
        # MLflow 3 keeps the file store (all mlflow-skinny can write) behind this switch; a database or
        # server is MLFLOW_TRACKING_URI's to name.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)  # MLflow 3's default registry is a SQLite file that mlflow-skinny cannot open
    try:
        accelerator.init_trackers(
            os.environ.get("WANDB_PROJECT") or PROJECT, init_kwargs=_init_kwargs(names, run_dir, ids)
        )
    except Exception as exc:  # a tracker's own failure (no W&B login, an unreachable MLflow server...)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinetuneError(
            f"--report-to {','.join(names)}: a tracker could not start: {message} "
            f"(for W&B without a login set WANDB_MODE=offline)"
        ) from None
    if "mlflow" in names:
        ids["mlflow"] = accelerator.get_tracker("mlflow").tracker.info.run_id
    files.write_atomic(run_dir / IDS_FILE, json.dumps(ids, indent=1) + "\n", "tracker ids", durable=False)
    _store_config(accelerator, flatten(config))
    return [_where(name, run_dir, ids) for name in names]


def _store_config(accelerator: Accelerator, hyperparameters: dict[str, Any]) -> None:
    """The config as each tracker's hyperparameters. MLflow refuses to change a parameter of a run, so
    a resumed MLflow run keeps its first values (config.yaml and state.json hold the current ones)."""
    for tracker in accelerator.trackers:
        given = hyperparameters
        if tracker.name == "mlflow":  # its active run, as read from the store when it started
            held = tracker.tracker.data.params
            given = {key: value for key, value in hyperparameters.items() if key not in held}
        if given:
            tracker.store_init_configuration(given)


def _where(name: str, run_dir: Path, ids: dict) -> str:
    if name == "tensorboard":
        return f"tensorboard: {run_dir / TB_DIR} (tensorboard --logdir {run_dir.parent})"
    if name == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / MLFLOW_DIR).resolve().as_uri()
        return f"mlflow: run {ids['mlflow']} in {uri} (mlflow ui --backend-store-uri {uri})"
    if name == "wandb":
        mode = os.environ.get("WANDB_MODE", "online")
        return f"wandb: run {ids['wandb']} in project {os.environ.get('WANDB_PROJECT') or PROJECT} ({mode})"
    return f"trackio: project {os.environ.get('WANDB_PROJECT') or PROJECT}, run {run_dir.name} (trackio show)"


def log(accelerator: Accelerator, record: dict) -> None:
    """One metrics.jsonl record to every started tracker, at its step (a no-op without trackers)."""
    if accelerator.trackers:
        accelerator.log(values(record), step=record["step"])
