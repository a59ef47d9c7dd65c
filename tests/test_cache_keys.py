"""Every cache is named by everything that changes its contents: a changed input never reuses old tokens."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SAMPLE, run_cli

RECIPES = [r.strip() for r in SAMPLE.read_text().split("<|endoftext|>")][:40]


@pytest.fixture(scope="module")
def tokenizer(gpt2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_dir)


@pytest.fixture
def data(workdir):
    (workdir / "a.txt").write_text("Title: Toast\nServes: 1\n<|endoftext|>\nTitle: Tea\n" * 20)
    (workdir / "b.txt").write_text("other words entirely " * 30)
    (workdir / "same-as-a.jsonl").write_bytes((workdir / "a.txt").read_bytes())
    return workdir


def _key(data, default_tokenizer, **changes):
    """The fingerprint for a.txt with block size 64 and the default data options, but for `changes`
    (DataConfig fields, or files, tokenizer, block_size, val_files)."""
    from finetune.cache_keys import cache_key, fingerprint
    from finetune.config import DataConfig

    kw = dict(files=[data / "a.txt"], tokenizer=default_tokenizer, block_size=64, val_files=None)
    kw.update(changes)
    files, tok, block, val_files = kw.pop("files"), kw.pop("tokenizer"), kw.pop("block_size"), kw.pop("val_files")
    return fingerprint(cache_key(files, tok, block, DataConfig(**kw), val_files))


def _other_tokenizer(tokenizer):
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<extra>"])
    return other


@pytest.mark.parametrize(
    "change",
    [
        lambda d, t: dict(files=[d / "same-as-a.jsonl"]),  # the same bytes, read as JSON Lines
        lambda d, t: dict(format="csv"),
        lambda d, t: dict(encoding="latin-1"),
        lambda d, t: dict(encoding="cp1252"),
        lambda d, t: dict(text_field="body"),
        lambda d, t: dict(line_by_line=True),
        lambda d, t: dict(eos_string="###"),
        lambda d, t: dict(skip_bad_rows=True),
        lambda d, t: dict(val_files=[d / "b.txt"]),
        lambda d, t: dict(val_fraction=0.2),
        lambda d, t: dict(block_size=32),
        lambda d, t: dict(tokenizer=_other_tokenizer(t)),
        lambda d, t: dict(datasets=["someone/data"]),
        lambda d, t: dict(files=[d / "b.txt"]),
    ],
    ids=[
        "format-per-file",
        "format-flag",
        "latin-1",
        "cp1252",
        "text-field",
        "line-by-line",
        "eos-string",
        "skip-bad-rows",
        "val-file",
        "val-fraction",
        "block-size",
        "tokenizer",
        "hub",
        "contents",
    ],
)
def test_each_input_changes_the_cache_key(data, tokenizer, change):
    assert _key(data, tokenizer, **change(data, tokenizer)) != _key(data, tokenizer)


def test_the_reading_rules_version_changes_the_cache_key(data, tokenizer, monkeypatch):
    import finetune.cache_keys

    before = _key(data, tokenizer)
    monkeypatch.setattr(finetune.cache_keys, "READING_RULES", finetune.cache_keys.READING_RULES + 1)
    assert _key(data, tokenizer) != before


def test_unchanged_inputs_keep_their_key(data, tokenizer):
    """Same contents under another name, and another spelling of the same codec, share an entry;
    CACHE_VERSION 3 (from 2) renamed every entry once, because v2 keys lacked the format and encoding."""
    from finetune.cache_keys import CACHE_VERSION

    (data / "copy.txt").write_bytes((data / "a.txt").read_bytes())
    assert CACHE_VERSION == 3
    assert (
        _key(data, tokenizer)
        == _key(data, tokenizer, files=[data / "copy.txt"])
        == _key(data, tokenizer, encoding="UTF8")
    )


def prepare(*args, expect=0):
    return run_cli("prepare", *args, "--cache-dir", "cache", expect=expect)


def test_same_bytes_as_jsonl_are_not_the_cached_text(data, gpt2_dir):
    (data / "t.txt").write_text("".join(json.dumps({"text": r}) + "\n" for r in RECIPES))
    first = prepare("t.txt", "--model", gpt2_dir, "--output", "p1", "--block-size", 32)
    assert "1 documents" in first.output  # the whole file is one document of raw JSON text
    shutil.copy(data / "t.txt", data / "t.jsonl")
    second = prepare("t.jsonl", "--model", gpt2_dir, "--output", "p2", "--block-size", 32)
    assert "data (tokenized): 40 documents" in second.output, second.output


def test_another_encoding_decodes_again(data, gpt2_dir):
    (data / "euro.txt").write_bytes("Price: 5 \u20ac, caf\u00e9 \u2013 good.\n".encode("cp1252") * 30)
    prepare("euro.txt", "--model", gpt2_dir, "--output", "latin", "--encoding", "latin-1", "--block-size", 16)
    result = prepare("euro.txt", "--model", gpt2_dir, "--output", "cp", "--encoding", "cp1252", "--block-size", 16)
    assert "data (tokenized)" in result.output, result.output
    import numpy as np
    from transformers import AutoTokenizer

    tokens = np.fromfile(data / "cp" / "tokens.bin", dtype=np.uint16).tolist()
    assert "\u20ac" in AutoTokenizer.from_pretrained(gpt2_dir).decode(tokens)  # not latin-1's control character


@pytest.mark.parametrize(
    "rename, extra, message",
    [
        ("a.parquet", [], "data file {}/a.parquet is not a Parquet file (it looks like text); rename it"),
        ("a.arrow", [], "data file {}/a.arrow is not an Arrow file (it looks like text)"),
        ("a.txt", ["--encoding", "no-such-codec"], "unknown text encoding 'no-such-codec' (--encoding)"),
        ("a.txt", ["--encoding", "base64"], "unknown text encoding 'base64'"),
    ],
)
def test_a_cached_text_file_under_a_wrong_name_or_codec_fails(data, gpt2_dir, rename, extra, message):
    """The bytes are already in the cache: the error must still come, and nothing train."""
    prepare("a.txt", "--model", gpt2_dir, "--output", "first", "--block-size", 16)
    if rename != "a.txt":
        shutil.copy(data / "a.txt", data / rename)
    result = run_cli(
        "train",
        rename,
        *extra,
        "--model",
        gpt2_dir,
        "--cache-dir",
        "cache",
        "--steps",
        1,
        "--block-size",
        16,
        "--sample-every",
        0,
        expect=2,
    )
    assert message.format(data) in result.output, result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output
    assert not (data / "runs").exists()


def test_the_learned_tokenizer_is_keyed_by_format_and_encoding(data):
    """--model tiny learns its tokenizer from the data: the same bytes read otherwise learn another."""
    (data / "t.txt").write_text("".join(json.dumps({"text": r}) + "\n" for r in RECIPES))
    shutil.copy(data / "t.txt", data / "t.jsonl")

    def learned():
        return sorted(p.name for p in (data / "cache" / "tokenizers").iterdir())

    run_cli("train", "t.txt", "--model", "tiny", "--cache-dir", "cache", "--dry-run")
    first = learned()
    run_cli("train", "t.txt", "--model", "tiny", "--cache-dir", "cache", "--dry-run")
    assert learned() == first and len(first) == 1  # unchanged inputs: the cached one
    run_cli("train", "t.jsonl", "--model", "tiny", "--cache-dir", "cache", "--dry-run")
    run_cli("train", "t.txt", "--model", "tiny", "--cache-dir", "cache", "--dry-run", "--encoding", "latin-1")
    run_cli("train", "t.txt", "--model", "tiny", "--cache-dir", "cache", "--dry-run", "--line-by-line")
    assert len(learned()) == 4
