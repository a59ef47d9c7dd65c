"""Documents -> token blocks, cached on disk and memory-mapped.

The token stream is written once to a cache directory named by a fingerprint of everything that
decides it (cache_keys.py), so a second run on the same data tokenizes nothing. Packed text is cut
into fixed blocks; supervised examples stay one row each (supervised.py). An entry is written into a
temporary directory and renamed into place, so it exists whole or not at all.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from finetune import supervised
from finetune.cache_entry import PreparedData, announce, read_entry
from finetune.cache_keys import cache_key, fingerprint
from finetune.config import MAX_DEFAULT_BLOCK, cache_root
from finetune.data_files import DATA_FILE, data_bytes, describe_files
from finetune.documents import DocumentRules, data_mode, data_sources, file_sources, pieces
from finetune.errors import FinetuneError
from finetune.files import fsync_tree, os_error, os_error_reason
from finetune.records import BadRows, Source
from finetune.tokenizing import default_workers, is_byte_level, progress_bar, tokenize_to_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from finetune.config import DataConfig

CACHE_FILE = "token cache file"


def block_size_for(requested: Optional[int], context: int) -> int:
    """The block size of a run: --block-size, else the model's context up to MAX_DEFAULT_BLOCK."""
    return requested or min(MAX_DEFAULT_BLOCK, context)


@dataclass(frozen=True)
class EntryInputs:
    """What one cache entry is built from (all of it is in the entry's key)."""

    files: list[Path]
    val_files: Optional[list[Path]]
    data: DataConfig
    rules: DocumentRules  # derived from `data` once, with the encoding's canonical name
    block_size: int
    dtype: type  # np.uint16, or np.uint32 for vocabularies beyond 65,536 tokens


def prepare_data(
    files: list[Path],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    data: DataConfig,
    *,
    val_files: Optional[list[Path]] = None,
    log: Callable[[str], None] = print,
) -> PreparedData:
    """Tokenize (or load from the cache) and split into train/validation blocks."""
    if tokenizer.eos_token_id is None:
        raise FinetuneError(
            "the tokenizer has no EOS token, so documents cannot be separated; use a tokenizer with one"
        )
    summary = describe_files(files)
    if summary:
        log(summary)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    key = cache_key(files, tokenizer, block_size, data, val_files)
    inputs = EntryInputs(files, val_files, data, DocumentRules.of(data), block_size, dtype)
    root = cache_root(data.cache_dir) / "data"
    target = root / fingerprint(key)

    def fill(out: Path) -> None:
        meta = _build_cache(inputs, tokenizer, out)
        (out / "meta.json").write_text(json.dumps({**meta, "key": key}, indent=1))

    try:
        entry = _cached_entry(target, key, log)
        from_cache = entry is not None
        if not from_cache:
            write_entry(target, fill)
            entry = read_entry(target, CACHE_FILE, "delete it; the next run rebuilds it")
    except OSError as exc:
        if exc.filename is not None and not str(exc.filename).startswith(str(root)):
            raise os_error(exc.filename, exc, DATA_FILE) from None  # reading the data, not the cache
        raise write_error(root, exc, "the token cache", "--cache-dir") from None
    prepared = announce(target, *entry, from_cache=from_cache, log=log)
    if prepared.chat:
        supervised.ensure_chat_template(tokenizer)  # also on a cache hit: checkpoints must carry the template
    return prepared


def _cached_entry(target: Path, key: dict, log: Callable[[str], None]) -> Optional[tuple]:
    """The entry named `target` when it is whole and holds `key`; a damaged one is removed (and rebuilt)."""
    if not os.path.lexists(target):
        return None
    try:
        entry = read_entry(target, CACHE_FILE, "it is rebuilt")
        if entry[0].get("key") != key:
            raise FinetuneError(f"{CACHE_FILE} {target / 'meta.json'} was written for other data")
    except FinetuneError as exc:
        log(f"warning: {str(exc).split('; ')[0]}; rebuilding it")
        discard(target)
        return None
    return entry


def write_entry(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary directory beside `target` with `fill(tmp)`, then rename it into place: a cache
    entry exists whole or not at all, whatever fails (a full disk, Ctrl-C, a bad row)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        fsync_tree(tmp)  # on disk before the rename: after a power cut an entry is whole or absent
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # else another process finished the same entry first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def discard(path: Path) -> None:
    """Remove a damaged cache entry: renamed aside first, so no reader ever sees it half-deleted."""
    aside = path.with_name(f".discard-{path.name}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def write_error(path: Path, exc: OSError, what: str, option: str) -> FinetuneError:
    """One line for a failed write into a directory the user chose with `option` (--cache-dir, --output)."""
    cause, _ = os_error_reason(exc, writing=True)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free disk space or choose another {option}"
    else:
        fix = f"make it writable or choose another {option}"
    return FinetuneError(f"cannot write {what} {path}: {cause}; {fix}")


def _build_cache(inputs: EntryInputs, tokenizer: PreTrainedTokenizerBase, out: Path) -> dict:
    """Fill `out` with the entry's token files; returns its meta.json (without the key)."""
    sources = data_sources(inputs.files, inputs.data)
    mode, has_chat = data_mode(sources, inputs.rules)
    bad = BadRows(inputs.data.skip_bad_rows)
    if has_chat:
        supervised.ensure_chat_template(tokenizer)
    if mode == "supervised":
        meta = _build_supervised(inputs, sources, tokenizer, out, bad)
        meta.update(dtype=np.dtype(inputs.dtype).name, chat=has_chat, bad_rows=bad.count)
        return meta
    return _build_packed(inputs, sources, tokenizer, out, bad)


def _build_packed(
    inputs: EntryInputs, sources: list[Source], tokenizer: PreTrainedTokenizerBase, out: Path, bad: BadRows
) -> dict:
    block_size, dtype = inputs.block_size, inputs.dtype
    split_long = is_byte_level(tokenizer)
    n_docs, n_tokens = tokenize_to_file(
        pieces(sources, inputs.rules, split_long, bad),
        tokenizer,
        out / "tokens.bin",
        dtype,
        workers=default_workers(inputs.files),
        size=data_bytes(inputs.files),
    )
    if n_tokens < 2:
        raise FinetuneError("the training data holds fewer than 2 tokens; add more text")
    effective_block = block_size
    if n_tokens < block_size:
        effective_block = n_tokens
    n_blocks = n_tokens // effective_block
    meta = {
        "mode": "packed",
        "chat": False,
        "bad_rows": bad.count,
        "dtype": np.dtype(dtype).name,
        "num_documents": n_docs,
        "num_tokens": n_tokens,
        "block_size": effective_block,
        "requested_block_size": block_size,
        "num_blocks": n_blocks,
    }
    if inputs.val_files:
        val_sources = file_sources(inputs.val_files, inputs.data.format)
        _, n_val_tokens = tokenize_to_file(
            pieces(val_sources, inputs.rules, split_long, bad), tokenizer, out / "val_tokens.bin", dtype
        )
        val_idx = np.zeros(0, dtype=np.int64)
        meta["val_num_tokens"] = n_val_tokens
        train_idx = np.arange(n_blocks, dtype=np.int64)
    else:
        val_idx = _val_block_indices(n_blocks, inputs.data.val_fraction)
        train_idx = np.setdiff1d(np.arange(n_blocks, dtype=np.int64), val_idx)
    np.save(out / "train_index.npy", train_idx)
    np.save(out / "val_index.npy", val_idx)
    return meta


def _build_supervised(
    inputs: EntryInputs, sources: list[Source], tokenizer: PreTrainedTokenizerBase, out: Path, bad: BadRows
) -> dict:
    block_size, dtype = inputs.block_size, inputs.dtype
    offsets, truncated, emptied, n_tokens, n_learned = [0], 0, 0, 0, 0
    size = data_bytes([Path(s.path) for s in sources])
    with (
        open(out / "tokens.bin", "wb") as tokens,
        open(out / "mask.bin", "wb") as masks,
        progress_bar(None, "tokenizing", size, unit=" examples") as bar,
    ):
        for ids, mask in supervised.examples(sources, inputs.rules, tokenizer, bad):
            bar.update()
            if len(ids) > block_size:  # never dropped silently: counted and reported
                ids, mask = ids[:block_size], mask[:block_size]
                truncated += 1
            if not any(mask):
                emptied += 1  # truncation cut away everything to learn: reported, not silently lost
                continue
            tokens.write(np.asarray(ids, dtype=dtype).tobytes())
            masks.write(np.asarray(mask, dtype=np.uint8).tobytes())
            n_tokens += len(ids)
            n_learned += int(sum(mask))
            offsets.append(n_tokens)
    n_examples = len(offsets) - 1
    if n_examples == 0 and emptied:
        raise FinetuneError(
            f"truncation at --block-size {block_size} removed every learned token of all {emptied} examples; "
            f"raise --block-size"
        )
    if n_examples == 0:
        raise FinetuneError("the data holds no usable examples; check the prompt/completion or messages fields")
    np.save(out / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    val_idx = _val_block_indices(n_examples, inputs.data.val_fraction)
    np.save(out / "val_index.npy", val_idx)
    np.save(out / "train_index.npy", np.setdiff1d(np.arange(n_examples, dtype=np.int64), val_idx))
    return {
        "mode": "supervised",
        "num_documents": n_examples,
        "num_tokens": n_tokens,
        "learned_tokens": n_learned,
        "truncated": truncated,
        "emptied": emptied,
        "block_size": block_size,
        "requested_block_size": block_size,
        "num_blocks": n_examples,
    }


def _val_block_indices(n_blocks: int, val_fraction: float) -> np.ndarray:
    """Evenly spaced blocks, so validation covers the whole corpus and does not depend on a seed."""
    if val_fraction <= 0 or n_blocks < 2:
        return np.zeros(0, dtype=np.int64)
    n_val = min(n_blocks - 1, max(1, round(n_blocks * val_fraction)))
    stride = n_blocks / n_val
    return np.floor((np.arange(n_val) + 0.5) * stride).astype(np.int64)
