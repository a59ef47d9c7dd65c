"""Data a user can get wrong, and disks that fail: one line naming the file and the fix, exit 2, nothing left
half-written."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, make_read_only, make_writable, run_cli


def fails(*args, message: str):
    """`finetune ARGS` exits 2 with one line holding `message`, and no traceback."""
    result = run_cli(*args, expect=2)
    assert message in result.output, result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output
    return result


def train(*data, message: str):
    return fails("train", *data, "--model", "tiny", "--steps", 1, "--sample-every", 0, message=message)


@pytest.fixture
def text(workdir):
    (workdir / "a.txt").write_text(SAMPLE.read_text()[:4000])
    return workdir / "a.txt"


# ---------------------------------------------------------------------------------------------
# Files that exist but cannot be read as data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d: "a.txt/inside.txt",
            "cannot read data file a.txt/inside.txt: a part of the path is a file, not a directory",
        ),
        (lambda d: "x" * 300 + ".txt", "the name is too long for the file system; use a shorter name"),
        (
            lambda d: os.mkfifo(d / "pipe.txt") or "pipe.txt",
            "pipe.txt is a named pipe (FIFO), not a regular file; point at a regular file",
        ),
        (lambda d: "/dev/null", "data file /dev/null is a device or socket, not a regular file"),
        (
            lambda d: (d / "docs").mkdir() or os.mkfifo(d / "docs" / "live.txt") or "docs",
            "docs/live.txt is a named pipe (FIFO)",
        ),
        (
            lambda d: shutil.copy(d / "a.txt", d / "a.parquet") and "a.parquet",
            "a.parquet is not a Parquet file (it looks like text); rename it",
        ),
        (
            lambda d: shutil.copy(d / "a.txt", d / "a.arrow") and "a.arrow",
            "a.arrow is not an Arrow file (it looks like text)",
        ),
    ],
    ids=[
        "path-through-a-file",
        "name-too-long",
        "fifo",
        "device",
        "fifo-in-a-directory",
        "text-as-parquet",
        "text-as-arrow",
    ],
)
def test_unreadable_data_files_are_named(text, make, message):
    name = make(text.parent)
    train(name, message=message)
    assert not (text.parent / "runs").exists()


def test_text_given_as_format_arrow_is_named(text):
    train("a.txt", "--format", "arrow", message="a.txt is not an Arrow file (it looks like text)")


def test_an_unreadable_file_is_named(text, monkeypatch):
    """Tests run as root, which reads anything: the permission check is os.access, so fake its answer."""
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: False if Path(path).name == "a.txt" else real_access(path, mode, **kw)
    )
    train(
        "a.txt", message="cannot read data file a.txt: permission denied; make it readable (chmod) or run as its owner"
    )
    (text.parent / "docs").mkdir()
    shutil.copy(text, text.parent / "docs" / "a.txt")
    train("docs", message="docs/a.txt: permission denied")


def test_an_unreadable_file_as_another_user(text):
    """The same, for real: a user without the rights to the file."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root to switch to another user")
    text.chmod(0o600)
    text.parent.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "FINETUNE_CACHE": "/tmp/finetune-nobody-cache", "HOME": "/tmp"}
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "finetune",
            "train",
            str(text),
            "--model",
            "tiny",
            "--steps",
            "1",
            "--dry-run",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if "Permission denied" in result.stderr and "finetune" not in result.stderr:
        pytest.skip("the interpreter itself is not readable by another user here")
    assert result.returncode == 2, result.stderr
    assert f"cannot read data file {text}: permission denied" in result.stderr


# ---------------------------------------------------------------------------------------------
# Directories of data: say what was taken
# ---------------------------------------------------------------------------------------------


def test_a_directory_reports_the_files_it_took(workdir, gpt2_dir):
    docs = workdir / "docs"
    (docs / "more").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "more/c.txt"):
        (docs / name).write_text(SAMPLE.read_text()[:3000])
    (docs / "README.md").write_text("# About these files\nDo not train on me.\n")
    (docs / "notes.png").write_bytes(b"\x89PNG")
    result = run_cli("prepare", "docs", "--model", gpt2_dir, "--output", "out", "--block-size", 32)
    assert f"data: 4 files in docs{os.sep} (.txt 3, .md 1): README.md, a.txt, b.txt, more/c.txt" in result.output, (
        result.output
    )


# ---------------------------------------------------------------------------------------------
# Damaged prepared directories and cache entries
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, gpt2_dir):
    root = tmp_path_factory.mktemp("prepared")
    (root / "a.txt").write_text(SAMPLE.read_text())
    run_cli(
        "prepare",
        root / "a.txt",
        "--model",
        gpt2_dir,
        "--output",
        root / "prep",
        "--block-size",
        32,
        "--cache-dir",
        root / "cache",
    )
    return root / "prep"


def _garbage(path: Path) -> None:
    path.write_text("{not json")


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
    "damage, name, message",
    [
        (_garbage, "finetune_prepared.json", "is not valid JSON"),
        (lambda p: p.write_text("[1, 2]"), "finetune_prepared.json", "holds a JSON list, expected an object"),
        (lambda p: p.write_text('{"model": "x"}'), "finetune_prepared.json", "lacks 'tokenizer', 'block_size'"),
        (
            lambda p: p.write_text('{"model": "x", "tokenizer": "t", "block_size": "big"}'),
            "finetune_prepared.json",
            "is damaged",
        ),
        (_garbage, "meta.json", "is not valid JSON"),
        (lambda p: p.unlink() or p.mkdir(), "meta.json", "is a directory, not a file"),
        (_truncate, "tokens.bin", "(cut short?)"),
        (_garbage, "train_index.npy", "is corrupt or not in the expected format"),
        (_garbage, "tokenizer/tokenizer.json", "is corrupt or not in the expected format"),
        (_garbage, "tokenizer/tokenizer_config.json", "is not valid JSON"),
    ],
)
def test_a_damaged_prepared_directory_is_named(workdir, prepared, gpt2_dir, damage, name, message):
    copy = workdir / "prep"
    shutil.copytree(prepared, copy)
    damage(copy / name)
    for model in (gpt2_dir, "tiny"):
        result = fails("train", "prep", "--model", model, "--steps", 1, "--sample-every", 0, message=message)
        assert f"prep/{name}" in result.output
        assert "prepare the data again with `finetune prepare`" in result.output or "is a directory" in message


def test_a_prepared_directory_goes_alone(workdir, prepared, gpt2_dir):
    shutil.copytree(prepared, workdir / "prep")
    (workdir / "b.txt").write_text("more words " * 20)
    fails(
        "train",
        "prep",
        "b.txt",
        "--model",
        gpt2_dir,
        "--steps",
        1,
        message="is a `finetune prepare` directory: train on it alone",
    )
    fails("prepare", "prep", "--model", gpt2_dir, "--output", "again", message="is already prepared; train on it with")


@pytest.mark.parametrize(
    "damage, name",
    [
        (_garbage, "meta.json"),
        (_truncate, "tokens.bin"),
        (_garbage, "val_index.npy"),
        (lambda p: p.unlink(), "train_index.npy"),
    ],
)
def test_a_damaged_cache_entry_is_rebuilt(text, gpt2_dir, damage, name):
    args = ("prepare", "a.txt", "--model", gpt2_dir, "--cache-dir", "cache", "--block-size", 16)
    first = run_cli(*args, "--output", "one")
    assert "data (tokenized)" in first.output
    (entry,) = (text.parent / "cache" / "data").iterdir()
    damage(entry / name)
    second = run_cli(*args, "--output", "two")
    assert f"token cache file {Path('cache', 'data', entry.name, name)}" in second.output, second.output
    assert "rebuilding it" in second.output
    assert "data (tokenized)" in second.output
    assert (text.parent / "one" / "tokens.bin").read_bytes() == (text.parent / "two" / "tokens.bin").read_bytes()
    assert "data (cache)" in run_cli(*args, "--output", "three").output


def test_a_damaged_learned_tokenizer_is_learned_again(text):
    args = ("train", "a.txt", "--model", "tiny", "--cache-dir", "cache", "--dry-run")
    run_cli(*args)
    (entry,) = (text.parent / "cache" / "tokenizers").iterdir()
    _garbage(entry / "tokenizer.json")
    result = run_cli(*args)
    assert f"the cached tokenizer {Path('cache', 'tokenizers', entry.name)} is unreadable" in result.output
    assert "learning it again" in result.output
    assert "learning it again" not in run_cli(*args).output  # whole again


# ---------------------------------------------------------------------------------------------
# Full disks and unwritable directories
# ---------------------------------------------------------------------------------------------


def _disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _left_behind(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


def test_a_full_disk_under_the_token_cache(text, gpt2_dir, monkeypatch):
    import numpy

    monkeypatch.setattr(numpy, "save", _disk_full)
    result = fails(
        "prepare",
        "a.txt",
        "--model",
        gpt2_dir,
        "--cache-dir",
        "cache",
        "--output",
        "out",
        message="the disk is full; free disk space or choose another --cache-dir",
    )
    assert f"cannot write the token cache {Path('cache') / 'data'}" in result.output
    assert _left_behind(text.parent / "cache" / "data") == []
    assert not (text.parent / "out").exists() and not (text.parent / ".tmp-out").exists()


def test_a_full_disk_under_the_learned_tokenizer(text, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", _disk_full)
    fails(
        "train",
        "a.txt",
        "--model",
        "tiny",
        "--cache-dir",
        "cache",
        "--dry-run",
        message="cannot write the tokenizer cache cache/tokenizers: the disk is full; "
        "free disk space or choose another --cache-dir",
    )
    assert _left_behind(text.parent / "cache" / "tokenizers") == []


def test_a_full_disk_under_the_prepare_output(text, gpt2_dir, monkeypatch):
    import finetune.prepared

    def half_written(prepared, tokenizer, tmp, model_name):
        (tmp / "tokens.bin").write_bytes(b"\x00" * 10)
        _disk_full()

    monkeypatch.setattr(finetune.prepared, "write_prepared", half_written)
    fails(
        "prepare",
        "a.txt",
        "--model",
        gpt2_dir,
        "--cache-dir",
        "cache",
        "--output",
        "out/prep",
        message="cannot write prepared data out/prep: the disk is full; free disk space or choose another --output",
    )
    assert _left_behind(text.parent / "out") == []


def test_a_read_only_cache_directory(text, gpt2_dir):
    cache = text.parent / "cache"
    cache.mkdir()
    if not make_read_only(cache):
        pytest.skip("cannot make a directory read-only here")
    try:
        fails(
            "prepare",
            "a.txt",
            "--model",
            gpt2_dir,
            "--cache-dir",
            "cache",
            "--output",
            "out",
            message="cannot write the token cache cache/data",
        )
        fails(
            "train",
            "a.txt",
            "--model",
            "tiny",
            "--cache-dir",
            "cache",
            "--dry-run",
            message="cannot write the tokenizer cache cache/tokenizers",
        )
    finally:
        make_writable(cache)
    assert _left_behind(cache) == [] and not (text.parent / "out").exists()


# ---------------------------------------------------------------------------------------------
# Long lines and concurrent prepares
# ---------------------------------------------------------------------------------------------


def test_a_long_line_without_whitespace_learns_a_tokenizer_in_seconds(workdir):
    """BPE learning slows worse than quadratically with a word's length (a 128 KB word took 50 s,
    20 MB over ten minutes); long runs are cut before the learner sees them."""
    import random
    import string

    random.seed(0)
    (workdir / "blob.txt").write_text("".join(random.choices(string.ascii_letters, k=2 << 20)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "FINETUNE_CACHE": str(workdir / "cache")}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "finetune", "train", "blob.txt", "--model", "tiny", "--dry-run"],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=150,
            cwd=workdir,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("learning a tokenizer from a 2 MB line took over 150 s")
    assert result.returncode == 0, result.stderr


def test_slow_steps_show_progress(text, monkeypatch):
    import finetune.tokenizing

    monkeypatch.setattr(finetune.tokenizing, "PROGRESS_MIN_BYTES", 0)  # as if the data were large
    result = run_cli("train", "a.txt", "--model", "tiny", "--cache-dir", "cache", "--steps", 1, "--sample-every", 0)
    assert "learning the tokenizer" in result.output and "tokenizing" in result.output, result.output


def test_two_prepares_into_one_output(text, gpt2_dir):
    from finetune.locking import exclusive

    with exclusive(text.parent / "out", "output directory out", "choose another --output"):
        fails(
            "prepare",
            "a.txt",
            "--model",
            gpt2_dir,
            "--output",
            "out",
            message=f"output directory out is in use by another finetune process (pid {os.getpid()})",
        )
    assert not (text.parent / "out").exists()
    run_cli("prepare", "a.txt", "--model", gpt2_dir, "--output", "out")
    assert not (text.parent / ".out.lock").exists()


def test_a_failed_prepare_leaves_nothing(text, gpt2_dir):
    fails(
        "prepare",
        "a.txt",
        "--model",
        gpt2_dir,
        "--output",
        "out/prep",
        "--encoding",
        "nope",
        message="unknown text encoding 'nope' (--encoding)",
    )
    fails(
        "prepare",
        "a.txt",
        "--model",
        gpt2_dir,
        "--output",
        "out/prep",
        "--text-field",
        "x",
        "--format",
        "jsonl",
        message="a.txt:1: not valid JSON",
    )
    assert not (text.parent / "out").exists()
