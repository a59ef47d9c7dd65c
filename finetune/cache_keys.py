"""What names a token cache entry (and a learned tokenizer): digests of the data and the tokenizer, and the keys.

An entry's directory is named by the fingerprint of its key, so a key must hold everything that decides
the tokens, and nothing else: copies of the same data share an entry, and a changed input never reuses
old tokens. The names of run_state.DATA_KEY_NAMES keep their meaning, so a run resumes across versions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from finetune.documents import hub_sources
from finetune.reading import RULES_VERSION as READING_RULES
from finetune.reading import check_encoding
from finetune.records import file_formats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from finetune.config import DataConfig

CACHE_VERSION = 3  # bump when the cache layout or the tokenization rules change (3: keyed by format and encoding too)


def files_digest(files: list[Path]) -> str:
    """sha256 over file contents (not names or dates), so copies of the same data share a cache."""
    digest = hashlib.sha256()
    expanded = [f for p in files for f in (sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])]
    for path in expanded:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\x00file-end\x00")
    return digest.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    else:  # a slow tokenizer: its vocabulary stands in for its rules
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.eos_token_id, tokenizer.bos_token_id, type(tokenizer).__name__])
    return hashlib.sha256((spec + extra).encode()).hexdigest()


def documents_key(files: list[Path], data: DataConfig) -> dict:
    """Everything that decides the documents read from the data (so also a tokenizer learned from them).

    The format is the one each file is read as, not only --format: the same bytes named .txt and
    .jsonl are different documents. The encoding is the codec's canonical name ('UTF8' = 'utf-8').
    """
    encoding = check_encoding(data.encoding)  # first: a typo fails at once, before the data is hashed
    formats = file_formats(files, data.format)
    return {
        "train": files_digest(files),
        "formats": formats,
        "encoding": encoding,
        "text_field": data.text_field,
        "eos_string": data.eos_string,
        "line_by_line": data.line_by_line,
        "hub": [list(h) for h in hub_sources(data)],
        "reading": READING_RULES,
    }


def cache_key(
    files: list[Path],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    data: DataConfig,
    val_files: Optional[list[Path]] = None,
) -> dict:
    """What the token cache entry is named by: the documents, the tokenizer and the way they are cut."""
    return {
        "version": CACHE_VERSION,
        **documents_key(files, data),
        "val": files_digest(val_files) if val_files else None,
        "val_formats": file_formats(val_files, data.format) if val_files else None,
        "tokenizer": tokenizer_digest(tokenizer),
        "block_size": block_size,
        "val_fraction": None if val_files else data.val_fraction,
        "skip_bad_rows": data.skip_bad_rows,
    }


def fingerprint(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
