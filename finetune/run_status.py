"""How a run ended: status.json in the run directory, written by training and read by `finetune runs`.

    runs/<name>/status.json   {"status": "finished", "step": 200, "total_steps": 200, "pid": 4242,
                               "started": "2026-11-28T09:30:05Z", "ended": "2026-11-28T09:41:17Z",
                               "command": "finetune train stories.txt --steps 200", ...}

Training writes "running" once its checks have passed and the run directory is set up, then, on its
way out, "finished", "stopped" (by a signal: "signal" says SIGINT or SIGTERM) or "failed" (with the
"error" line the user saw). Each write is atomic, so a reader never sees half a file. A run whose file
still says "running" while nobody holds its lock ended without a word: killed (kill -9, out of
memory, the machine stopped). Only the main process writes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from finetune import files
from finetune.errors import FinetuneError

FILE_NAME = "status.json"
RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"
_WHAT = "run status file"
_FIX = "delete it (training writes it again on its next start)"


@dataclass
class RunStatus:
    """status.json, field for field."""

    status: str  # RUNNING, FINISHED, STOPPED or FAILED
    step: int  # optimizer steps done when it was written
    total_steps: int  # the steps the run was started to reach
    pid: Optional[int] = None  # the training process (rank 0)
    started: Optional[str] = None  # UTC, ISO 8601
    ended: Optional[str] = None
    signal: Optional[str] = None  # "SIGINT" / "SIGTERM" when stopped by one
    error: Optional[str] = None  # the error line of a failed run
    command: Optional[str] = None  # the command line that started this session of the run


class Steps(Protocol):
    """What recording() reads from training's Progress on the way out."""

    step: int
    stopped_by: Optional[str]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write(run_dir: Path, status: RunStatus) -> None:
    files.write_atomic(run_dir / FILE_NAME, json.dumps(dataclasses.asdict(status), indent=1) + "\n", _WHAT)


def read(run_dir: Path) -> Optional[RunStatus]:
    """The run's status, or None for a run written before status.json existed (or not started yet)."""
    path = run_dir / FILE_NAME
    if not path.exists() and not path.is_symlink():
        return None
    values = files.read_json(path, _WHAT, _FIX, required=("status", "step", "total_steps"))
    names = {field.name for field in dataclasses.fields(RunStatus)}
    status = RunStatus(**{key: value for key, value in values.items() if key in names})
    if status.status not in (RUNNING, FINISHED, STOPPED, FAILED) or not all(
        isinstance(value, int) and not isinstance(value, bool) for value in (status.step, status.total_steps)
    ):
        raise FinetuneError(f"{_WHAT} {path} holds an unknown status or a non-integer step; {_FIX}")
    return status


def error_line(exc: BaseException) -> str:
    """The one line a user saw for a failure: a FinetuneError's message, else the exception's type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, FinetuneError) else f"{type(exc).__name__}: {text}".rstrip(": ")


@contextmanager
def recording(run_dir: Path, progress: Steps, total_steps: int, command: str) -> Iterator[None]:
    """Around training's loop and finish: "running" now, then how it ended.

    A second Ctrl-C aborts with KeyboardInterrupt: that is a stop by SIGINT, not a failure. Every
    record is best effort (_record): a status file that cannot be written is one warning.
    """
    started = RunStatus(RUNNING, progress.step, total_steps, pid=os.getpid(), started=now(), command=command)
    _record(run_dir, started)
    try:
        yield
    except KeyboardInterrupt:
        _record(run_dir, dataclasses.replace(started, status=STOPPED, signal="SIGINT", step=progress.step, ended=now()))
        raise
    except BaseException as exc:
        failed = dataclasses.replace(started, status=FAILED, error=error_line(exc), step=progress.step, ended=now())
        _record(run_dir, failed)
        raise
    ended = STOPPED if progress.stopped_by else FINISHED
    _record(
        run_dir, dataclasses.replace(started, status=ended, signal=progress.stopped_by, step=progress.step, ended=now())
    )


def _record(run_dir: Path, status: RunStatus) -> None:
    """Best effort: status.json only informs `finetune runs`, so a run never fails (or hides its own error) for it."""
    import warnings

    try:
        write(run_dir, status)
    except FinetuneError as exc:
        warnings.warn(f"{exc}; `finetune runs` will not know how this run ended", UserWarning, stacklevel=2)
