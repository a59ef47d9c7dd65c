"""The run directory: checkpoints written atomically, the `latest` pointer, keep-last-K.

    runs/<name>/
      config.yaml  metrics.jsonl  samples/  latest
      checkpoint-000200/   config.json model.safetensors tokenizer files generation_config.json
                           training_state/ (state.json, optimizer.pt, scheduler.pt, rng.pt)

A checkpoint is written into `.tmp-checkpoint-NNNNNN`, its files are fsynced, then the directory
is renamed into place; `latest` is replaced (also via rename) only after that. A crash at any
moment therefore leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from finetune.errors import FinetuneError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{6,})$")
TMP_PREFIX = ".tmp-"
STATE_DIR = "training_state"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint named by `latest`, or the newest complete one if the pointer is missing."""
    pointer = run_dir / "latest"
    if pointer.is_file():
        candidate = run_dir / pointer.read_text(encoding="utf-8").strip()
        if candidate.is_dir() and CHECKPOINT_RE.match(candidate.name):
            return candidate
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def remove_leftovers(run_dir: Path) -> None:
    """Delete partial saves left by a crash (they were never named by `latest`)."""
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(run_dir: Path, step: int, write_contents, keep: int) -> Path:
    """Write a checkpoint atomically; `write_contents(tmp_dir)` fills the directory.

    Disk-full and permission errors become a FinetuneError; the previous checkpoint stays intact.
    """
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f"{TMP_PREFIX}{final.name}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_contents(tmp)
        _fsync_tree(tmp)
        if final.exists():  # saving the same step again (e.g. the final save after a periodic one)
            old = run_dir / f"{TMP_PREFIX}old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
        write_text_atomic(run_dir / "latest", final.name + "\n")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"; the previous checkpoint {previous.name} is intact" if previous else ""
        raise FinetuneError(
            f"could not write checkpoint {final.name} in {run_dir}: {exc.strerror or exc}{kept}; "
            f"free disk space or make the run directory writable"
        ) from None
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; never delete the one `latest` names."""
    latest = latest_checkpoint(run_dir)
    checkpoints = list_checkpoints(run_dir)
    for path in checkpoints[: max(0, len(checkpoints) - keep)]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


def read_training_state(checkpoint: Path) -> dict:
    path = checkpoint / STATE_DIR / "state.json"
    if not path.is_file():
        raise FinetuneError(f"{checkpoint} has no {STATE_DIR}/state.json, so it cannot be resumed; it can still be used to generate")
    return json.loads(path.read_text())


def find_run(runs_dir: str, name: Optional[str]) -> Path:
    """A run by name, or the most recently updated run when no name is given."""
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
        raise FinetuneError(f"no trained runs in {root}/; train one with `finetune train DATA`, or pass --model")
    return max(runs, key=lambda p: (p / "latest").stat().st_mtime if (p / "latest").exists() else p.stat().st_mtime)


def checkpoint_for_run(run_dir: Path) -> Path:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FinetuneError(f"run '{run_dir.name}' has no checkpoint yet; let training reach --save-every steps, or finish")
    return checkpoint
