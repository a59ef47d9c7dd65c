"""The tokenization pipeline: documents, EOS joins, packing, splits and the cache."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.config import DataConfig
from finetune.data_files import resolve_files
from finetune.modeling import finish_tokenizer
from finetune.token_cache import _val_block_indices, prepare_data


def split_documents(text: str, eos_string: str, line_by_line: bool) -> list[str]:
    """The document rule, written plainly: the streaming reader must agree with it."""
    parts = text.split(eos_string)
    if line_by_line:
        parts = [line for part in parts for line in part.splitlines()]
    return [p.strip() for p in parts if p.strip()]


@pytest.fixture(scope="module")
def tokenizer(gpt2_dir):
    from transformers import AutoTokenizer

    return finish_tokenizer(AutoTokenizer.from_pretrained(gpt2_dir))


def test_documents_split_on_eos_string_and_lines(tmp_path):
    from finetune.reading import iter_pieces

    path = tmp_path / "d.txt"
    path.write_text("first doc\nline two<|endoftext|>\n\nsecond doc\n<|endoftext|>  \n")

    def texts(lines):
        return [p.text for p in iter_pieces([path], "<|endoftext|>", lines, "utf-8")]

    assert texts(False) == ["first doc\nline two", "second doc"]
    assert texts(True) == ["first doc", "line two", "second doc"]


def test_documents_are_joined_with_the_real_eos_id(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("hello world<|endoftext|>goodbye")
    prepared = prepare_data(
        resolve_files([str(tmp_path / "a.txt")]),
        tokenizer,
        4,
        DataConfig(val_fraction=0, cache_dir=str(tmp_path / "c")),
        log=lambda _m: None,
    )
    tokens = np.asarray(prepared.train.tokens).tolist()
    hello = tokenizer("hello world", add_special_tokens=False).input_ids
    bye = tokenizer("goodbye", add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    assert tokens == hello + [eos] + bye + [eos]
    # the EOS string never appears as its sub-word pieces
    assert tokenizer.convert_tokens_to_ids("<") not in tokens or "<" in "hello world goodbye"


def test_blocks_cover_the_stream_and_validation_is_spread(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text(" ".join(f"word{i}" for i in range(3000)))
    prepared = prepare_data(
        resolve_files([str(tmp_path / "a.txt")]),
        tokenizer,
        16,
        DataConfig(val_fraction=0.1, cache_dir=str(tmp_path / "c")),
        log=lambda _m: None,
    )
    n_blocks = len(prepared.train) + len(prepared.val)
    assert len(prepared.val) == round(n_blocks * 0.1)
    assert set(prepared.train.indices).isdisjoint(prepared.val.indices)
    assert prepared.val.indices.min() < n_blocks / 4 and prepared.val.indices.max() > 3 * n_blocks / 4
    block = prepared.train[0]
    assert block.dtype == np.int64 and block.shape == (16,)


def test_val_indices_edge_cases():
    assert len(_val_block_indices(1, 0.05)) == 0
    assert len(_val_block_indices(2, 0.9)) == 1
    assert len(_val_block_indices(100, 0)) == 0


def test_files_are_ordered_and_deduplicated(tmp_path):
    for name in ("b.txt", "a.txt", "c.md", "skip.bin"):
        (tmp_path / name).write_text("x")
    files = resolve_files([str(tmp_path), str(tmp_path / "a.txt")])
    assert [f.name for f in files] == ["a.txt", "b.txt", "c.md"]


def test_cache_key_depends_on_content_not_name(tmp_path, tokenizer):
    (tmp_path / "one.txt").write_text("same words here " * 50)
    (tmp_path / "two.txt").write_text("same words here " * 50)
    options = DataConfig(val_fraction=0.05, cache_dir=str(tmp_path / "c"))
    kw = dict(log=lambda _m: None)
    first = prepare_data(resolve_files([str(tmp_path / "one.txt")]), tokenizer, 8, options, **kw)
    second = prepare_data(resolve_files([str(tmp_path / "two.txt")]), tokenizer, 8, options, **kw)
    assert not first.from_cache and second.from_cache and first.cache_dir == second.cache_dir
    (tmp_path / "two.txt").write_text("other words here " * 50)
    third = prepare_data(resolve_files([str(tmp_path / "two.txt")]), tokenizer, 8, options, **kw)
    assert not third.from_cache


def _ids_via_pipeline(tmp_path, tokenizer, files, workers, name):
    from finetune.reading import iter_pieces
    from finetune.tokenizing import tokenize_to_file

    out = tmp_path / f"{name}.bin"
    pieces = iter_pieces(files, "<|endoftext|>", False, "utf-8", split_long=True)
    docs, _ = tokenize_to_file(pieces, tokenizer, out, np.uint32, workers=workers)
    return docs, np.fromfile(out, dtype=np.uint32).tolist()


def test_streamed_pieces_and_workers_give_the_exact_tokens_of_whole_documents(tmp_path, tokenizer, monkeypatch):
    """Tiny read chunks and pieces force every boundary case: an EOS string, a multi-byte character
    and a long document all split across reads; 2 worker processes change nothing either."""
    import finetune.reading as reading

    text = (
        "Crème brûlée, naïve café — 12 × 3.\nSecond line here.\n  indented line\n" * 40
        + "<|endoftext|>"
        + "short doc"
        + "<|endoftext|>"
        + "Ünïcödé tail " * 30
    )
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    eos = tokenizer.eos_token_id
    expected = []
    for doc in split_documents(text, "<|endoftext|>", False):
        expected += tokenizer(doc, add_special_tokens=False).input_ids + [eos]
    monkeypatch.setattr(reading, "CHUNK_BYTES", 37)
    monkeypatch.setattr(reading, "PIECE_CHARS", 150)
    pieces = list(reading.iter_pieces([path], "<|endoftext|>", False, "utf-8", split_long=True))
    assert len(pieces) > 10 and sum(p.ends_document for p in pieces) == 3
    docs, ids = _ids_via_pipeline(tmp_path, tokenizer, [path], 1, "one")
    assert docs == 3 and ids == expected
    monkeypatch.setattr(reading, "CHUNK_BYTES", 4 << 20)
    assert _ids_via_pipeline(tmp_path, tokenizer, [path, path], 2, "two")[1] == expected * 2


def test_non_utf8_error_names_the_offset_across_chunks(tmp_path, monkeypatch):
    import finetune.reading as reading
    from finetune.errors import FinetuneError

    path = tmp_path / "x.txt"
    path.write_bytes(b"a" * 100 + "é".encode("cp1252") + b"b" * 10)
    monkeypatch.setattr(reading, "CHUNK_BYTES", 16)
    with pytest.raises(FinetuneError, match="byte 0xe9 at offset 100.*--encoding cp1252"):
        list(reading.iter_pieces([path], "<|endoftext|>", False, "utf-8"))


def test_an_unknown_format_is_named(tmp_path, tokenizer):
    """prepare_data takes a DataConfig that config.validate_run_config has not seen: a format no reader
    knows is named, not read as nothing."""
    from finetune.errors import FinetuneError

    (tmp_path / "a.xml").write_text("<doc>hello</doc>")
    with pytest.raises(FinetuneError, match="unknown format 'xml'; use one of text, csv, tsv, jsonl, json, parquet"):
        prepare_data(
            resolve_files([str(tmp_path / "a.xml")]),
            tokenizer,
            8,
            DataConfig(format="xml", cache_dir=str(tmp_path / "c")),
            log=lambda _m: None,
        )
