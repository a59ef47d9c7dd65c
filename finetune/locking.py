"""One process at a time per run directory or output directory.

A lock is `fcntl.flock` on a small file beside the directory (`runs/.recipes.lock` for
`runs/recipes`), holding the owner's pid. The kernel releases it when the process ends, even by
kill -9, so a crash never leaves a run locked; the file itself is removed on a normal exit. It lies
beside the directory, not inside, because `--overwrite` deletes the directory it guards.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from finetune.errors import FinetuneError
from finetune.files import os_error


def lock_path(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.lock"


def holder_pid(directory: Path) -> Optional[int]:
    """The pid of the process holding `directory`'s lock, or None when nobody holds it."""
    path = lock_path(directory)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def exclusive(directory: Path, what: str, hint: str) -> Iterator[None]:
    """Hold `directory`'s lock for the block; if another process holds it, fail naming its pid.

    `what` names the directory for the user ("run 'recipes'"); `hint` says what to do instead.
    """
    directory = Path(directory)
    created_parent = not directory.parent.exists()
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(directory.parent, exc, "directory", writing=True) from None
    try:
        fd = _acquire(lock_path(directory), what, hint)
    except BaseException:
        _remove_if_created(directory.parent, created_parent)
        raise
    if fd is None:  # a file system without locks: go on unguarded
        try:
            yield
        finally:
            _remove_if_created(directory.parent, created_parent)
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock_path(directory))
        except OSError:
            pass
        os.close(fd)  # closing releases the lock, after the file is gone
        _remove_if_created(directory.parent, created_parent)


def _remove_if_created(parent: Path, created: bool) -> None:
    if created:
        try:
            parent.rmdir()  # only if nothing else was written there
        except OSError:
            pass


def _acquire(path: Path, what: str, hint: str) -> Optional[int]:
    """An open descriptor holding the lock on `path`, or None where the file system has no locks."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise os_error(path, exc, "lock file", writing=True) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f"pid {text}" if text.isdigit() else "another process"
            raise FinetuneError(
                f"{what} is in use by another finetune process ({pid}); wait for it to finish or stop it, or {hint}"
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
                return None
            raise
        # The file may have been removed by its previous holder between our open and our lock:
        # then the lock guards nothing, so start again on the file now at `path`.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
