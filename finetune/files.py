"""Reading and writing files so that every failure is one line naming the file, the cause and the fix.

Every file the project reads goes through `read_text` / `read_json` / `read_jsonl`, or runs a
third-party reader (safetensors, tokenizers, ONNX Runtime, torch.load) inside `reading(...)`;
every file it writes goes through `write_atomic`, or runs a third-party writer inside
`writing(...)`. Both turn OSError (ENOSPC, EACCES, EROFS, ENAMETOOLONG, ENOTDIR, EISDIR...),
decoding and parsing errors into a FinetuneError, so no caller needs its own `try`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

from finetune.errors import FinetuneError

# errno -> (what went wrong, what to do about it when reading, ... when writing)
_OS_ERRORS = {
    errno.ENOENT: ("does not exist", "check the path", "check the path"),
    errno.EACCES: (
        "permission denied",
        "make it readable (chmod) or run as its owner",
        "make the directory writable or choose another location",
    ),
    errno.EPERM: (
        "operation not permitted",
        "check its permissions",
        "make the directory writable or choose another location",
    ),
    errno.EISDIR: ("is a directory, not a file", "point at a file", "remove the directory or choose another name"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "check the path", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long for the file system", "use a shorter name", "use a shorter name"),
    errno.ENOSPC: ("the disk is full", "free disk space", "free disk space or choose another location"),
    errno.EDQUOT: ("the disk quota is exceeded", "free disk space", "free disk space or choose another location"),
    errno.EROFS: ("the file system is read-only", "copy it somewhere readable", "choose a writable location"),
    errno.ELOOP: ("the path loops through symbolic links", "fix the links", "fix the links"),
    errno.EIO: ("an input/output error occurred", "check the disk", "check the disk"),
    errno.ENXIO: (
        "is a device or pipe with nothing on the other end",
        "point at a regular file",
        "point at a regular file",
    ),
}


def short(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, for quoting inside a one-line error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def os_error_reason(exc: OSError, writing: bool = False) -> tuple[str, str]:
    """(cause, fix) for an OSError, in words."""
    known = _OS_ERRORS.get(exc.errno or -1)
    if known:
        return known[0], known[2 if writing else 1]
    return (exc.strerror or short(exc)).lower(), "check the file and its directory"


def os_error(path: Union[str, Path, None], exc: OSError, what: str = "file", writing: bool = False) -> FinetuneError:
    """One line for a failed read or write: the file (as the OS reported it), the cause and the fix."""
    cause, fix = os_error_reason(exc, writing)
    # A write names the file the caller meant (not the temporary file it went through); a read names
    # the file the OS failed on, which may lie inside the directory a library was asked to load.
    where = path if (writing and path is not None) or exc.filename is None else exc.filename
    verb = "cannot write" if writing else "cannot read"
    return FinetuneError(f"{verb} {what} {where}: {cause}; {fix}")


def require_regular_file(path: Path, what: str = "file") -> None:
    """A regular file that can be opened; a FIFO, device, directory or missing path is named as such."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise os_error(path, exc, what) from None
    if stat.S_ISDIR(mode):
        raise FinetuneError(f"{what} {path} is a directory, not a file; point at a file")
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device or socket"
        raise FinetuneError(f"{what} {path} is {kind}, not a regular file; point at a regular file")
    if not os.access(path, os.R_OK):
        raise os_error(path, PermissionError(errno.EACCES, "Permission denied", str(path)), what)


@contextmanager
def reading(path: Union[str, Path], what: str, fix: str) -> Iterator[None]:
    """Run a reader (ours or a library's) so that any failure becomes one line naming `path`.

    `what` names the file for a user ("checkpoint weights", "tokenizer file"); `fix` says what to do
    when the contents are bad (a missing or unreadable file gets the OS error's own fix).
    """
    try:
        yield
    except FinetuneError:
        raise
    except OSError as exc:
        if exc.errno is None:  # libraries raise bare OSError for bad contents too
            raise FinetuneError(f"{what} {path} is unreadable ({short(exc)}); {fix}") from None
        raise os_error(path, exc, what) from None
    except MemoryError:
        raise FinetuneError(f"{what} {path} is too large to load in this machine's memory; {fix}") from None
    except Exception as exc:  # a parser's complaint: the contents are not what they should be
        raise FinetuneError(f"{what} {path} is corrupt or not in the expected format ({short(exc)}); {fix}") from None


@contextmanager
def writing(path: Union[str, Path], what: str = "file") -> Iterator[None]:
    """Run a writer (ours or a library's) so that a failed write becomes one line naming `path`."""
    try:
        yield
    except FinetuneError:
        raise
    except Exception as exc:
        problem = write_problem(exc, Path(path))
        if problem is None:
            raise
        raise os_error(path, problem, what, writing=True) from None


def write_problem(exc: BaseException, path: Path) -> Optional[OSError]:
    """The OSError behind a failed write, or None when `exc` is not one.

    safetensors' SafetensorError and torch's zip writer report a short write as their own error.
    """
    if isinstance(exc, OSError):
        return exc
    if "No space left" in str(exc) or _disk_nearly_full(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if "ermission denied" in str(exc):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    return None


def _disk_nearly_full(path: Path) -> bool:
    import shutil

    existing = first_existing_parent(path)
    try:
        return existing is not None and shutil.disk_usage(existing).free < (1 << 20)
    except OSError:
        return False


def read_text(
    path: Union[str, Path], what: str = "file", fix: str = "fix or replace it", encoding: str = "utf-8"
) -> str:
    path = Path(path)
    with reading(path, what, fix):
        require_regular_file(path, what)
        try:
            return path.read_text(encoding=encoding)
        except UnicodeDecodeError:
            raise FinetuneError(f"{what} {path} is not {encoding} text; {fix}") from None


def read_json(
    path: Union[str, Path],
    what: str = "file",
    fix: str = "fix or replace it",
    expect: type = dict,
    required: tuple[str, ...] = (),
) -> Any:
    """Parsed JSON of the expected type (dict by default) holding the `required` keys."""
    text = read_text(path, what, fix)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise FinetuneError(f"{what} {path} is not valid JSON ({short(exc)}); {fix}") from None
    if expect is not None and not isinstance(value, expect):
        raise FinetuneError(f"{what} {path} holds a JSON {type(value).__name__}, expected {_json_type(expect)}; {fix}")
    missing = [key for key in required if key not in value]
    if missing:
        raise FinetuneError(f"{what} {path} lacks {', '.join(repr(k) for k in missing)}; {fix}")
    return value


def _json_type(tp: type) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(tp, tp.__name__)


def read_jsonl(path: Union[str, Path], what: str = "file", fix: str = "fix or replace it") -> list[dict]:
    """The objects of a JSON Lines file. A torn last line (a crash mid-write) is dropped, not an error."""
    lines = read_text(path, what, fix).splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # only the last line can be cut short by a crash
                break
            raise FinetuneError(f"{what} {path}:{number} is not valid JSON; {fix}") from None
        if not isinstance(record, dict):
            raise FinetuneError(
                f"{what} {path}:{number} holds a JSON {type(record).__name__}, expected an object; {fix}"
            )
        records.append(record)
    return records


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plain open() would give a new file (0644 under the usual umask)."""
    return 0o666 & ~_umask()


def write_atomic(path: Union[str, Path], data: Union[str, bytes], what: str = "file", durable: bool = True) -> None:
    """Write `path` whole or not at all: a temporary file beside it, fsynced, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with writing(path, what):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        if durable:
            fsync_dir(path.parent)


def append_line(path: Union[str, Path], line: str, what: str = "file") -> None:
    with writing(path, what):
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under `root`, then `root` itself, on disk (before a rename makes them visible)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(root)


def fix_modes(root: Path) -> None:
    """Give files written by libraries through private temp files (mode 0600) the mode open() gives.

    A server running as another user must be able to read an exported model.
    """
    mode = default_file_mode()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            file = os.path.join(dirpath, name)
            if not os.path.islink(file) and stat.S_IMODE(os.stat(file).st_mode) != mode:
                os.chmod(file, mode)


def first_existing_parent(path: Path) -> Optional[Path]:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None
