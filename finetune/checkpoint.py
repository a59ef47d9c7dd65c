"""Checkpoints on disk: their names, the atomic save, the `latest` pointer, keep-last-K, verification.

    runs/<name>/
      config.yaml  metrics.jsonl  samples/  latest
      checkpoint-000200/   config.json model.safetensors tokenizer files generation_config.json
                           training_state/ (state.json, optimizer.pt, scheduler.pt, rng.pt)

A checkpoint is written into `.tmp-checkpoint-NNNNNN`, its files are fsynced, then the directory
is renamed into place; `latest` is replaced (also via rename) only after that. A crash at any
moment therefore leaves `latest` naming a complete checkpoint. What training_state/ holds, and how
a run resumes from it, is run_state.py's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from finetune.errors import FinetuneError
from finetune.files import fix_modes, fsync_dir, fsync_tree, read_json, write_atomic, write_problem

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


def latest_checkpoint(run_dir: Path, strict: bool = True) -> Optional[Path]:
    """The checkpoint named by `latest`, or the newest complete one if the pointer is missing.

    `latest` is only ever replaced whole (write_atomic), so one that names no checkpoint of this run
    was damaged or edited: `strict` refuses it rather than silently sampling or resuming from
    another checkpoint than the user expects.
    """
    from finetune import files

    pointer = run_dir / "latest"
    checkpoints = list_checkpoints(run_dir)
    newest = checkpoints[-1] if checkpoints else None
    if not pointer.exists() and not pointer.is_symlink():
        return newest
    fix = (
        f"delete it to use the newest checkpoint ({newest.name})" if newest else "delete it"
    ) + ", or pass --checkpoint DIR"
    try:
        name = files.read_text(pointer, "run file", fix).strip()
    except FinetuneError:
        if strict:
            raise
        return newest
    candidate = run_dir / name
    if CHECKPOINT_RE.match(name) and candidate.is_dir():
        return candidate
    if strict:
        shown = name if len(name) <= 40 and name.isprintable() else name[:40].encode("unicode_escape").decode() + "..."
        raise FinetuneError(
            f"run file {pointer} names {shown!r}, which is not a checkpoint directory of this run; {fix}"
        )
    return newest


def remove_leftovers(run_dir: Path) -> None:
    """Delete partial saves left by a crash (they were never named by `latest`)."""
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text, "run file")


def save_checkpoint(run_dir: Path, step: int, write_contents, keep: int) -> Path:
    """Write a checkpoint atomically; `write_contents(tmp_dir)` fills the directory.

    Disk-full and permission errors become a FinetuneError; the previous checkpoint stays intact.
    """
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f"{TMP_PREFIX}{final.name}"
    if final.is_dir():
        # Renamed directories are complete, and a step's weights never change, so an existing
        # checkpoint of this step (a resumed run stopped before training on) is already right.
        write_text_atomic(run_dir / "latest", final.name + "\n")
        return final
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pause_point("tmp-created", step)
        write_contents(tmp)
        fsync_tree(tmp)
        pause_point("fsynced", step)
        fix_modes(tmp)  # safetensors writes model.safetensors through a private (0600) temp file
        os.replace(tmp, final)
        fsync_dir(run_dir)
        pause_point("renamed", step)
        write_text_atomic(run_dir / "latest", final.name + "\n")
        pause_point("latest-written", step)
    except Exception as exc:
        problem = exc if isinstance(exc, FinetuneError) else write_problem(exc, tmp)
        if problem is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir, strict=False)
        kept = f"; the previous checkpoint {previous.name} is intact" if previous else ""
        cause = problem if isinstance(problem, FinetuneError) else (problem.strerror or problem)
        raise FinetuneError(
            f"could not write checkpoint {final.name} in {run_dir}: {cause}{kept}; "
            f"free disk space or make the run directory writable"
        ) from None
    prune_checkpoints(run_dir, keep)
    pause_point("pruned", step)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; never delete the one `latest` names."""
    latest = latest_checkpoint(run_dir, strict=False)
    checkpoints = list_checkpoints(run_dir)
    for path in checkpoints[: max(0, len(checkpoints) - keep)]:
        if path != latest:
            shutil.rmtree(path, ignore_errors=True)


def pause_point(stage: str, step: int) -> None:
    """Test hook: with FINETUNE_TEST_PAUSE_AT=<stage>@<step>, stop here so a test can kill the process.

    It lets the crash-safety tests (tests/test_resume.py) choose the exact moment of a SIGKILL during
    a save. The stages, in the order a save passes them: tmp-created, model-written, tokenizer-written
    (training.py), optimizer-written, rng-written, state-written (run_state.py), fsynced, renamed,
    latest-written, pruned (save_checkpoint, here).
    """
    wanted = os.environ.get("FINETUNE_TEST_PAUSE_AT")
    if wanted and wanted == f"{stage}@{step}":
        print(f"PAUSED {wanted}", flush=True)
        time.sleep(3600)


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a safetensors file is unusable (truncated, bad header), or None if it is whole.

    The format is an 8-byte header length, a JSON header with each tensor's byte range, then the
    data; a file shorter than the furthest range was cut off (a crash, a full disk, a bad copy).
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                return f"its header is cut off ({size} bytes)"
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        return f"its header is unreadable ({exc})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    if size != expected:
        return f"it has {size:,} bytes where its header promises {expected:,} (truncated)"
    return None


def verify_checkpoint(checkpoint: Path, for_resume: bool) -> None:
    """Fail with the name of the bad file when a checkpoint is incomplete or corrupt."""
    hint = (
        f"; resume from an earlier checkpoint with --resume {checkpoint.parent}/checkpoint-NNNNNN"
        if for_resume
        else "; use another checkpoint (--checkpoint DIR)"
    )
    config = checkpoint / "config.json"
    if not config.is_file():
        config = checkpoint / "adapter_config.json"  # a LoRA checkpoint: the adapter, not the base model
    if not config.is_file():
        from finetune.runs import misplaced_run_dir

        problem = misplaced_run_dir(checkpoint)
        raise FinetuneError(problem or f"checkpoint {checkpoint} has no config.json{hint}")
    read_json(config, "checkpoint file", hint[2:])
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        raise FinetuneError(f"checkpoint {checkpoint} has no weights file (model.safetensors){hint}")
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            raise FinetuneError(f"checkpoint file {path} is corrupt: {problem}{hint}")
    if for_resume:
        from finetune.run_state import STATE_FILE, TrainingState

        required = [STATE_FILE, "scheduler.pt", "rng.pt"]
        if TrainingState.read(checkpoint).optimizer_saved:
            required.append("optimizer.pt")
        for name in required:
            if not (checkpoint / STATE_DIR / name).is_file():
                raise FinetuneError(f"checkpoint {checkpoint} lacks {STATE_DIR}/{name}, so it cannot be resumed{hint}")
            # Checked now, before anything is loaded or printed: the files themselves are read much later.
            problem = _torch_file_problem(checkpoint / STATE_DIR / name) if name.endswith(".pt") else None
            if problem:
                raise FinetuneError(f"checkpoint file {checkpoint / STATE_DIR / name} is corrupt: {problem}{hint}")


def _torch_file_problem(path: Path) -> Optional[str]:
    """Why a torch.save file is unusable (empty, cut off, damaged), or None if its archive is whole.

    torch.save writes a zip archive whose entries carry CRCs: checking them reads the bytes but
    unpickles nothing.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"it is not a complete torch file ({exc})"
    return f"its entry {damaged} is damaged" if damaged else None


def save_torch_file(obj, path: Path) -> None:
    """torch.save that reports a failed write (e.g. a full disk) as OSError, like every other write."""
    import errno

    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as exc:  # torch's zip writer turns a short write into a RuntimeError
        if shutil.disk_usage(path.parent).free < (1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise OSError(errno.EIO, f"writing {path.name} failed ({str(exc).splitlines()[0]})") from None


def load_torch_file(path: Path):
    """torch.load restricted to tensors and plain containers (never arbitrary pickled objects)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise FinetuneError(
            f"checkpoint file {path} is corrupt ({str(exc).splitlines()[0][:120]}); "
            f"resume from an earlier checkpoint with --resume DIR"
        ) from None
