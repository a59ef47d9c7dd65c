"""Output directories that exports and prepared data are written into: built beside the target, renamed into place.

An output never goes over, into or around a checkpoint, a run or the runs directory
(refuse_training_output): --overwrite would delete what it points at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from finetune.checkpoint import STATE_DIR, TMP_PREFIX
from finetune.errors import FinetuneError
from finetune.files import fix_modes, writing
from finetune.runs import is_checkpoint_dir, is_run_dir


def start_output_dir(output: Path, overwrite: bool = False, offer_overwrite: bool = True) -> Path:
    """A fresh temporary directory beside `output` (renamed into place by finish_output_dir).

    An existing non-empty `output` is never touched unless `overwrite`; until the rename, a crash
    leaves only the temporary directory behind.
    """
    if output.exists() and not output.is_dir():  # a user's file: --overwrite must not replace it with a directory
        raise FinetuneError(f"--output {output} is a file, not a directory; choose a directory path for --output")
    occupied = output.is_dir() and any(output.iterdir())
    if occupied and not overwrite:
        hint = " or pass --overwrite" if offer_overwrite else ""
        raise FinetuneError(f"output directory {output} already exists and is not empty; choose another --output{hint}")
    tmp = output.with_name(f"{TMP_PREFIX}{output.name}")
    with writing(output, "output directory"):
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    return tmp


def finish_output_dir(tmp: Path, output: Path) -> None:
    """Move a finished `tmp` into place; a replaced `output` is kept aside until the move succeeded."""
    fix_modes(tmp)  # safetensors writes through a private (0600) temp file: a server user could not read it
    old = output.with_name(f"{TMP_PREFIX}old-{output.name}")
    with writing(output, "output directory"):
        shutil.rmtree(old, ignore_errors=True)
        if output.exists():
            os.replace(output, old)
        try:
            os.replace(tmp, output)
        except BaseException:
            if old.exists():
                os.replace(old, output)
            raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def refuse_training_output(
    output: Path,
    source: Optional[Path] = None,
    run_dir: Optional[Path] = None,
    runs_dir: Optional[Path] = None,
    writer: str = "an export",
) -> None:
    """An output (export, prepared data) never goes over, into or around a checkpoint, a run or the runs directory.

    --overwrite deletes the output directory first: pointed at a checkpoint, it would delete the
    weights and training state being exported; inside one, pruning old checkpoints deletes it.
    """
    out = output.resolve()
    guarded = [("checkpoint", source.resolve())] if source is not None else []
    if run_dir is not None:
        guarded.append(("run directory", run_dir.resolve()))
    if runs_dir is not None and runs_dir.is_dir():
        guarded.append(("runs directory", runs_dir.resolve()))
    for parent in (out, *out.parents):  # any other run or checkpoint the output would sit in
        if is_checkpoint_dir(parent):
            guarded.append(("checkpoint", parent))
        elif is_run_dir(parent):
            guarded.append(("run directory", parent))
    inside = _training_dir_inside(out)
    if inside is not None:
        guarded.append(("checkpoint" if is_checkpoint_dir(inside) else "run directory", inside))
    for kind, path in guarded:
        relation = (
            "is"
            if out == path
            else "lies inside"
            if path in out.parents
            else "contains"
            if out in path.parents
            else None
        )
        if relation:
            raise FinetuneError(
                f"--output {output} {relation} the {kind} {path}, which {writer} must not write over; "
                f"choose an output outside your runs, e.g. --output exports/NAME"
            )


def _training_dir_inside(root: Path, depth: int = 3) -> Optional[Path]:
    """A checkpoint or run directory within `depth` levels under `root` (which --overwrite would delete)."""
    if not root.is_dir():
        return None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if STATE_DIR in dirnames or ("config.yaml" in filenames and is_run_dir(here)):
            return here
        if len(here.relative_to(root).parts) >= depth:
            dirnames[:] = []
    return None
