"""A token cache entry as it lies on disk (also the body of a `finetune prepare` directory), read back and checked.

meta.json says what the entry holds; every file is checked against it (a file cut short by a crash or
a full disk is an error, not blocks of garbage) and memory-mapped: packed text as TokenBlocks, supervised
examples as supervised.Examples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from finetune.errors import FinetuneError
from finetune.files import read_json, reading, require_regular_file
from finetune.supervised import Examples


@dataclass
class TokenBlocks:
    """Fixed-length blocks of a memory-mapped token stream (block i = tokens[i*B:(i+1)*B])."""

    tokens: np.ndarray  # 1-D memmap
    block_size: int
    indices: np.ndarray  # which blocks of the stream belong to this split

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.indices[i]) * self.block_size
        return np.asarray(self.tokens[start : start + self.block_size], dtype=np.int64)


Split = Union[TokenBlocks, Examples]  # one split of an entry: packed blocks or supervised examples


@dataclass
class PreparedData:
    """The data of a run, ready for batching: its train and validation splits and what they were built from."""

    train: Split
    val: Optional[Split]
    block_size: int
    cache_dir: Path
    from_cache: bool
    key: dict  # what the cache fingerprint was computed from (file digests, tokenizer, block size...)
    mode: str = "packed"  # "packed" blocks, or "supervised" examples with loss masks
    chat: bool = False  # chat data: the tokenizer carries a chat template


META_KEYS = ("mode", "dtype", "num_documents", "num_tokens", "block_size", "num_blocks", "key")
SUPERVISED_KEYS = ("learned_tokens", "truncated", "chat")
PACKED_KEYS = ("requested_block_size",)


def _read_meta(target: Path, what: str, fix: str) -> dict:
    path = target / "meta.json"
    meta = read_json(path, what, fix, required=META_KEYS)
    mode = meta["mode"]
    required = SUPERVISED_KEYS if mode == "supervised" else PACKED_KEYS
    missing = [k for k in required if k not in meta]
    counts = [meta[k] for k in ("num_documents", "num_tokens", "block_size", "num_blocks")]
    if (
        mode not in ("packed", "supervised")
        or missing
        or meta["dtype"] not in ("uint16", "uint32")
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
    ):
        raise FinetuneError(f"{what} {path} is damaged (bad or missing fields); {fix}")
    return meta


def _token_file(path: Path, dtype, count: int, what: str, fix: str) -> np.ndarray:
    """`count` items of `dtype`, memory-mapped; a file of another size (cut short by a crash or a full
    disk) is an error, not blocks of garbage."""
    with reading(path, what, fix):
        require_regular_file(path, what)
        size = path.stat().st_size
        if size != count * np.dtype(dtype).itemsize:
            raise FinetuneError(
                f"{what} {path} holds {size:,} bytes, expected {count * np.dtype(dtype).itemsize:,} (cut short?); {fix}"
            )
        return np.memmap(path, dtype=dtype, mode="r") if count else np.zeros(0, dtype=dtype)


def _index_file(path: Path, limit: int, what: str, fix: str) -> np.ndarray:
    """Block or example numbers, each below `limit`."""
    with reading(path, what, fix):
        require_regular_file(path, what)
        values = np.load(path, allow_pickle=False)
    if values.ndim != 1 or (
        values.size and (values.dtype.kind not in "iu" or values.min() < 0 or values.max() >= limit)
    ):
        raise FinetuneError(f"{what} {path} holds bad block numbers; {fix}")
    return values.astype(np.int64, copy=False)


def read_entry(target: Path, what: str, fix: str) -> tuple[dict, Split, Optional[Split]]:
    """(meta, train, val) of a cache entry or prepared directory, every file checked against meta.json."""
    meta = _read_meta(target, what, fix)
    dtype = np.dtype(meta["dtype"])
    tokens = _token_file(target / "tokens.bin", dtype, meta["num_tokens"], what, fix)
    if meta["mode"] == "supervised":
        masks = _token_file(target / "mask.bin", np.uint8, meta["num_tokens"], what, fix)
        with reading(target / "offsets.npy", what, fix):
            offsets = np.load(target / "offsets.npy", allow_pickle=False)
        if (
            offsets.shape != (meta["num_documents"] + 1,)
            or offsets[-1] != meta["num_tokens"]
            or np.any(np.diff(offsets) < 0)
        ):
            raise FinetuneError(f"{what} {target / 'offsets.npy'} does not match {target / 'meta.json'}; {fix}")
        n = meta["num_documents"]
        val_idx = _index_file(target / "val_index.npy", n, what, fix)
        train = Examples(tokens, masks, offsets, _index_file(target / "train_index.npy", n, what, fix))
        return meta, train, (Examples(tokens, masks, offsets, val_idx) if len(val_idx) else None)
    block = meta["block_size"]
    if block < 1 or meta["num_blocks"] * block > meta["num_tokens"]:
        raise FinetuneError(f"{what} {target / 'meta.json'} is damaged (block size and counts disagree); {fix}")
    train = TokenBlocks(tokens, block, _index_file(target / "train_index.npy", meta["num_blocks"], what, fix))
    if meta.get("val_num_tokens") is not None:
        val_tokens = _token_file(target / "val_tokens.bin", dtype, meta["val_num_tokens"], what, fix)
        n_val_blocks = len(val_tokens) // block
        return (
            meta,
            train,
            (TokenBlocks(val_tokens, block, np.arange(n_val_blocks, dtype=np.int64)) if n_val_blocks else None),
        )
    val_idx = _index_file(target / "val_index.npy", meta["num_blocks"], what, fix)
    return meta, train, (TokenBlocks(tokens, block, val_idx) if len(val_idx) else None)


def announce(
    target: Path, meta: dict, train: Split, val: Optional[Split], from_cache: bool, log: Callable[[str], None]
) -> PreparedData:
    """Warn about small corpora, say what the data is, and hand it over."""
    source = "cache" if from_cache else "tokenized"
    skipped = f"; {meta['bad_rows']} bad rows skipped" if meta.get("bad_rows") else ""
    if meta["mode"] == "supervised":
        log(
            f"data ({source}): {meta['num_documents']} examples ({'chat' if meta['chat'] else 'prompt/completion'}), "
            f"{meta['num_tokens']:,} tokens of which {meta['learned_tokens']:,} are learned; {len(train)} train"
            + (f", {len(val)} validation" if val else "")
            + f"; {meta['truncated']} truncated to {meta['block_size']} tokens"
            + (
                f", {meta['emptied']} left out because truncation removed every learned token (raise --block-size)"
                if meta.get("emptied")
                else ""
            )
            + skipped
        )
        return PreparedData(train, val, meta["block_size"], target, from_cache, meta["key"], "supervised", meta["chat"])
    block = meta["block_size"]
    if meta.get("val_num_tokens") is not None and val is None:
        warnings.warn("the validation file is shorter than one block; validation is skipped", stacklevel=1)
    if block < meta["requested_block_size"]:
        warnings.warn(
            f"the corpus has only {meta['num_tokens']} tokens, fewer than one block of "
            f"{meta['requested_block_size']}; training on a single block of {block} tokens "
            f"(add more text for a better model)",
            stacklevel=1,
        )
    if val is None and meta.get("val_num_tokens") is None and meta["num_blocks"] < 2:
        warnings.warn("the corpus is too small for a validation split; validation is skipped", stacklevel=1)
    log(
        f"data ({source}): {meta['num_documents']} documents, {meta['num_tokens']:,} tokens, "
        f"{len(train)} train blocks"
        + (f", {len(val)} validation blocks" if val else "")
        + f" of {block} tokens"
        + skipped
    )
    return PreparedData(train, val, block, target, from_cache, meta["key"])
