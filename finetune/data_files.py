"""The paths a run is given -> the data files it reads: globs and directories expanded, every file checked up front.

A missing, unreadable or special file, a run directory passed as data, or a `finetune prepare` directory
mixed with other data is one error naming it, before any work starts.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from finetune.errors import FinetuneError
from finetune.files import os_error, require_regular_file
from finetune.prepared import check_prepared, is_prepared_dir
from finetune.records import SUFFIX_FORMATS, is_saved_dataset

DATA_FILE = "data file"


def resolve_files(paths: Iterable[str]) -> list[Path]:
    """Expand files, directories (recursively, data files only) and globs, in a stable order.

    Every file is checked here, before any work: a missing, unreadable or special file (a FIFO, a
    device, a directory where a file should be) is one error naming it.
    """
    files = [file for raw in paths for file in _expand(raw)]
    unique = list(dict.fromkeys(p.resolve() for p in files))
    for path in unique:
        if path.is_file() and path.stat().st_size == 0:
            raise FinetuneError(f"data file '{path}' is empty; add text to it or leave it out")
    prepared = [p for p in unique if is_prepared_dir(p)]
    if prepared and len(unique) > 1:
        raise FinetuneError(
            f"{prepared[0]} is a `finetune prepare` directory: train on it alone, or prepare all the data together"
        )
    return unique


def _expand(raw: str) -> list[Path]:
    path = Path(raw).expanduser()
    if any(ch in raw for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        matches = [m for m in matches if not m.is_dir()]
        if not matches:
            raise FinetuneError(f"no files match '{raw}'; check the pattern (quote it so the shell does not expand it)")
        for match in matches:
            require_regular_file(match, DATA_FILE)
        return matches
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FinetuneError(f"data file '{raw}' does not exist; check the path") from None
    except OSError as exc:  # a name too long, a path through a file, a directory we may not enter
        raise os_error(raw, exc, DATA_FILE) from None
    if not stat.S_ISDIR(mode):
        require_regular_file(path, DATA_FILE)  # a FIFO or a device is named as such, not read forever
        return [path]
    if not os.access(path, os.R_OK | os.X_OK):
        raise os_error(raw, PermissionError(errno.EACCES, "Permission denied", raw), "data directory")
    if is_prepared_dir(path):
        check_prepared(path)
        return [path]
    from finetune.runs import is_checkpoint_dir, is_run_dir

    if is_run_dir(path) or is_checkpoint_dir(path):
        kind = "a run directory" if is_run_dir(path) else "a checkpoint"
        raise FinetuneError(
            f"'{raw}' is {kind}, not training data; point at your data files (a run continues "
            f"by running its `finetune train` command again, or with --resume)"
        )
    if is_saved_dataset(path):
        return [path]  # a datasets.save_to_disk directory is one input
    return _data_files_in(path, raw)


def _data_files_in(directory: Path, raw: str) -> list[Path]:
    """The files under `directory` whose suffix names a data format, sorted; links followed once."""

    def fail(exc: OSError):
        raise os_error(exc.filename, exc, "data directory")

    found, seen = [], set()
    for root, dirs, names in os.walk(directory, onerror=fail, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(root, name) for name in names if Path(name).suffix.lower() in SUFFIX_FORMATS]
    if not found:
        raise FinetuneError(
            f"directory '{raw}' holds no data files ({', '.join(sorted(SUFFIX_FORMATS))}); point at your files"
        )
    found.sort()
    for path in found:
        require_regular_file(path, DATA_FILE)
    return found


def describe_files(files: list[Path], limit: int = 6) -> Optional[str]:
    """'data: 12 files in docs/ (.txt 10, .md 2)', naming them when few; None for a single input.

    A directory is read whole (every file with a data suffix, a README.md included), so say what was taken.
    """
    if len(files) < 2:
        return None
    common = Path(os.path.commonpath([str(f) for f in files]))
    try:
        shown = common.relative_to(Path.cwd())
    except ValueError:
        shown = common
    suffixes = Counter(f.suffix.lower() or "(none)" for f in files)
    counts = ", ".join(f"{suffix} {n}" for suffix, n in suffixes.most_common())
    line = f"data: {len(files)} files in {shown}{os.sep} ({counts})"
    if len(files) <= limit:
        line += ": " + ", ".join(str(f.relative_to(common)) for f in files)
    return line


def data_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files if p.is_file())
