"""Run directories: what a run is named, where it lives, how commands find it, and its lock.

    runs/<name>/   config.yaml  metrics.jsonl  samples/  latest  checkpoint-NNNNNN/ ...

A run is named after its first data file unless --run-name says otherwise; generate and export
find a run by name (or take the most recently updated one) and use the checkpoint `latest` names.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from finetune.checkpoint import CHECKPOINT_RE, STATE_DIR, latest_checkpoint, list_checkpoints
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from finetune.config import RunConfig

PLAIN_TEXT_SUFFIXES = {".txt", ".md", ""}
MAX_DEFAULT_RUN_NAME = 80  # a file name may be longer than a directory name (plus its lock file) can be


def default_run_name(paths: list[str]) -> str:
    """Named after the first data file: 'stories.txt' -> 'stories', 'notes.csv' -> 'notes-csv'.

    Plain text keeps its stem, like a user would name it; other formats add their extension, so
    notes.csv and notes.jsonl beside each other are two runs, not one run whose data "changed".
    """
    first = Path(paths[0].rstrip("/"))
    suffix = first.suffix.lower()
    stem = first.stem if suffix in PLAIN_TEXT_SUFFIXES else f"{first.stem}-{suffix.lstrip('.')}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.")
    return name[:MAX_DEFAULT_RUN_NAME].rstrip("-.") or "run1"


def run_dir_for(cfg: RunConfig) -> Path:
    t = cfg.train
    run_name = t.run_name or default_run_name(cfg.data.paths or [name.split("/")[-1] for name in cfg.data.datasets])
    return Path(t.runs_dir) / run_name


# Set by `finetune train --num-processes N` for the processes it launches: the launcher holds the
# run's lock for them (the value is the run directory it locked).
LOCK_HELD_ENV = "FINETUNE_RUN_LOCK_HELD_BY_LAUNCHER"


def run_lock(run_dir: Path):
    """The run's lock, for the whole training process; taken before anything in the run is read or touched.

    Under several processes the ranks share one run: rank 0 holds the lock for all of them (the
    others must not ask for it, they would find it taken). When `finetune train --num-processes`
    launched us, the launcher already holds it.
    """
    from finetune import locking

    if os.environ.get("RANK", "0") != "0":
        return nullcontext()
    if os.environ.get(LOCK_HELD_ENV) == str(run_dir.resolve()) and locking.holder_pid(run_dir) is not None:
        return nullcontext()
    return locking.exclusive(run_dir, f"run '{run_dir.name}'", "use another --run-name")


@contextmanager
def launcher_lock(cfg: RunConfig):
    """Hold the run's lock while `finetune train --num-processes N` runs its processes."""
    run_dir = run_dir_for(cfg)
    with run_lock(run_dir):
        previous = os.environ.get(LOCK_HELD_ENV)
        os.environ[LOCK_HELD_ENV] = str(run_dir.resolve())
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(LOCK_HELD_ENV, None)
            else:
                os.environ[LOCK_HELD_ENV] = previous


def is_run_dir(path: Path) -> bool:
    """A run directory: config.yaml with checkpoints, a `latest` pointer or metrics beside it."""
    return (path / "config.yaml").is_file() and (
        (path / "latest").is_file() or (path / "metrics.jsonl").is_file() or bool(list_checkpoints(path))
    )


def is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint: it holds training_state/, or is a checkpoint-NNNNNN directory of a run."""
    return (path / STATE_DIR).is_dir() or (CHECKPOINT_RE.match(path.name) is not None and is_run_dir(path.parent))


def is_runs_root(path: Path) -> bool:
    """A directory holding runs (`runs/`)."""
    try:
        return path.is_dir() and any(is_run_dir(child) for child in path.iterdir() if child.is_dir())
    except OSError:
        return False


def misplaced_run_dir(path: Path) -> Optional[str]:
    """Why `path`, passed where a model or checkpoint directory is expected, is a run or runs directory."""
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        if is_run_dir(path):
            latest = latest_checkpoint(path, strict=False)
            inside = f", or --checkpoint {latest} for its latest checkpoint" if latest else ""
            return (
                f"{path} is a run directory, not a model or checkpoint; pass --run {path.name} "
                f"--runs-dir {path.parent}{inside}"
            )
        if is_runs_root(path):
            return f"{path} holds runs, it is not a model or checkpoint; pass --runs-dir {path} --run NAME"
    return None


def find_run(runs_dir: str, name: Optional[str], other_sources: str = "pass --checkpoint DIR") -> Path:
    """A run by name, or the most recently updated run when no name is given.

    other_sources: what else the command accepts, for the hint when there is no run.
    """
    root = Path(runs_dir)
    if name:
        run_dir = root / name
        if not run_dir.is_dir():
            available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            listing = f"; runs in {root}/: {', '.join(available)}" if available else f"; {root}/ has no runs yet"
            raise FinetuneError(f"no run named '{name}'{listing}")
        return run_dir
    runs = [p for p in root.iterdir() if p.is_dir() and list_checkpoints(p)] if root.is_dir() else []
    if not runs:
        raise FinetuneError(
            f"no trained runs in {root}/; train one with `finetune train DATA`, point --runs-dir at "
            f"the directory holding your runs, or {other_sources}"
        )
    return max(runs, key=lambda p: (p / "latest").stat().st_mtime if (p / "latest").exists() else p.stat().st_mtime)


def checkpoint_for_run(run_dir: Path) -> Path:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FinetuneError(
            f"run '{run_dir.name}' has no checkpoint yet; let training reach --save-every steps, or finish"
        )
    return checkpoint
