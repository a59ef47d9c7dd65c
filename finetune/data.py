"""Text files -> documents -> token blocks, cached on disk and memory-mapped.

A document is a file (or, with `line_by_line`, a non-empty line); the EOS string written in the
text (`<|endoftext|>`) also ends a document. Documents are tokenized with the tokenizer's fast
batched path and joined with the tokenizer's real EOS id, then cut into fixed blocks. The token
stream is written once to a cache directory named by a fingerprint of everything that decides it
(file contents, tokenizer, block size, mode), so a second run on the same data tokenizes nothing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from finetune.errors import FinetuneError

CACHE_VERSION = 1  # bump when the cache layout or the tokenization rules change
TEXT_SUFFIXES = (".txt", ".text", ".md")
TOKENIZE_BATCH_DOCS = 512  # documents per batched tokenizer call (the fast tokenizer threads them)


def cache_root(configured: Optional[str]) -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("FINETUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "finetune"


# ---------------------------------------------------------------------------------------------
# Files and documents
# ---------------------------------------------------------------------------------------------


def resolve_files(paths: Iterable[str]) -> list[Path]:
    """Expand files, directories (recursively, text files only) and globs, in a stable order."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if any(ch in raw for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise FinetuneError(f"no files match '{raw}'; check the pattern (quote it so the shell does not expand it)")
            files.extend(matches)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise FinetuneError(f"directory '{raw}' holds no text files ({', '.join(TEXT_SUFFIXES)}); point at your .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FinetuneError(f"data file '{raw}' does not exist; check the path")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    for path in unique:
        if path.stat().st_size == 0:
            raise FinetuneError(f"data file '{path}' is empty; add text to it or leave it out")
    return unique


def _guess_encoding(raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    try:
        raw.decode("cp1252")
        return "cp1252"
    except UnicodeDecodeError:
        return "latin-1"


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """Read a text file, refusing binary files and text in an unexpected encoding.

    Undecodable bytes are an error rather than silently replaced: a model trained on mojibake
    learns mojibake. The message names the likely encoding so the fix is one flag.
    """
    raw = path.read_bytes()
    is_utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff")) or encoding.lower().startswith("utf-16")
    if b"\x00" in raw[:8192] and not is_utf16:
        raise FinetuneError(f"data file '{path}' looks binary (it contains NUL bytes); pass text files only")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        guess = _guess_encoding(raw)
        raise FinetuneError(
            f"data file '{path}' is not valid {encoding} (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            f"it looks like {guess}: pass --encoding {guess} or convert it to UTF-8"
        ) from None
    except LookupError:
        raise FinetuneError(f"unknown encoding '{encoding}'; use a Python codec name such as utf-8 or cp1252") from None
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise FinetuneError(f"data file '{path}' holds only whitespace; add text to it or leave it out")
    return text


def split_documents(text: str, eos_string: str, line_by_line: bool) -> list[str]:
    """Cut one file's text into documents at the EOS string (and at newlines in line mode)."""
    parts = text.split(eos_string) if eos_string else [text]
    if line_by_line:
        parts = [line for part in parts for line in part.splitlines()]
    return [p.strip() for p in parts if p.strip()]


def iter_documents(files: list[Path], eos_string: str, line_by_line: bool, encoding: str) -> Iterator[str]:
    for path in files:
        yield from split_documents(read_text(path, encoding), eos_string, line_by_line)


# ---------------------------------------------------------------------------------------------
# Fingerprints and the token cache
# ---------------------------------------------------------------------------------------------


def files_digest(files: list[Path]) -> str:
    """sha256 over file contents (not names or dates), so copies of the same data share a cache."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\x00file-end\x00")
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    else:  # a slow tokenizer: its vocabulary stands in for its rules
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.eos_token_id, tokenizer.bos_token_id, type(tokenizer).__name__])
    return hashlib.sha256((spec + extra).encode()).hexdigest()


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

    @property
    def num_tokens(self) -> int:
        return len(self) * self.block_size


@dataclass
class PreparedData:
    train: TokenBlocks
    val: Optional[TokenBlocks]
    block_size: int
    num_documents: int
    cache_dir: Path
    from_cache: bool
    key: dict  # what the cache fingerprint was computed from (file digests, tokenizer, block size...)


def _tokenize_to_file(docs: Iterable[str], tokenizer, out_path: Path, dtype) -> tuple[int, int]:
    """Tokenize documents in batches and append the ids, EOS-joined, to a raw binary file."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    # Llama-style tokenizers expect a BOS at the start of each document; GPT-2's BOS is its EOS.
    prefix = [bos] if bos is not None and bos != eos else []
    n_docs = n_tokens = 0
    with open(out_path, "wb") as fh:
        batch: list[str] = []

        def flush() -> int:
            ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            flat = np.fromiter(
                (t for doc in ids for t in (*prefix, *doc, eos)), dtype=dtype,
                count=sum(len(d) + len(prefix) + 1 for d in ids),
            )
            fh.write(flat.tobytes())
            return len(flat)

        for doc in docs:
            batch.append(doc)
            n_docs += 1
            if len(batch) == TOKENIZE_BATCH_DOCS:
                n_tokens += flush()
                batch = []
        if batch:
            n_tokens += flush()
    return n_docs, n_tokens


def _val_block_indices(n_blocks: int, val_fraction: float) -> np.ndarray:
    """Evenly spaced blocks, so validation covers the whole corpus and does not depend on a seed."""
    if val_fraction <= 0 or n_blocks < 2:
        return np.zeros(0, dtype=np.int64)
    n_val = min(n_blocks - 1, max(1, round(n_blocks * val_fraction)))
    stride = n_blocks / n_val
    return np.floor((np.arange(n_val) + 0.5) * stride).astype(np.int64)


def prepare_data(
    files: list[Path],
    tokenizer,
    block_size: int,
    *,
    line_by_line: bool = False,
    val_fraction: float = 0.05,
    val_files: Optional[list[Path]] = None,
    eos_string: str = "<|endoftext|>",
    encoding: str = "utf-8",
    cache_dir: Optional[str] = None,
    log=print,
) -> PreparedData:
    """Tokenize (or load from the cache) and split into train/validation blocks."""
    if tokenizer.eos_token_id is None:
        raise FinetuneError("the tokenizer has no EOS token, so documents cannot be separated; use a tokenizer with one")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    key = {
        "version": CACHE_VERSION,
        "train": files_digest(files),
        "val": files_digest(val_files) if val_files else None,
        "tokenizer": tokenizer_digest(tokenizer),
        "block_size": block_size,
        "line_by_line": line_by_line,
        "val_fraction": None if val_files else val_fraction,
        "eos_string": eos_string,
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    root = cache_root(cache_dir) / "data"
    target = root / fingerprint
    from_cache = (target / "meta.json").is_file()
    if not from_cache:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{fingerprint}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            meta = _build_cache(files, val_files, tokenizer, block_size, line_by_line, val_fraction, eos_string, encoding, dtype, tmp)
            meta["key"] = key
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished the same cache first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _load_cache(target, from_cache, log)


def _build_cache(files, val_files, tokenizer, block_size, line_by_line, val_fraction, eos_string, encoding, dtype, out: Path) -> dict:
    n_docs, n_tokens = _tokenize_to_file(
        iter_documents(files, eos_string, line_by_line, encoding), tokenizer, out / "tokens.bin", dtype
    )
    if n_tokens < 2:
        raise FinetuneError("the training data holds fewer than 2 tokens; add more text")
    effective_block = block_size
    if n_tokens < block_size:
        effective_block = n_tokens
    n_blocks = n_tokens // effective_block
    meta = {
        "dtype": np.dtype(dtype).name,
        "num_documents": n_docs,
        "num_tokens": n_tokens,
        "block_size": effective_block,
        "requested_block_size": block_size,
        "num_blocks": n_blocks,
    }
    if val_files:
        _, n_val_tokens = _tokenize_to_file(
            iter_documents(val_files, eos_string, line_by_line, encoding), tokenizer, out / "val_tokens.bin", dtype
        )
        val_idx = np.zeros(0, dtype=np.int64)
        meta["val_num_tokens"] = n_val_tokens
        train_idx = np.arange(n_blocks, dtype=np.int64)
    else:
        val_idx = _val_block_indices(n_blocks, val_fraction)
        train_idx = np.setdiff1d(np.arange(n_blocks, dtype=np.int64), val_idx)
    np.save(out / "train_index.npy", train_idx)
    np.save(out / "val_index.npy", val_idx)
    return meta


def _load_cache(target: Path, from_cache: bool, log) -> PreparedData:
    meta = json.loads((target / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    block = meta["block_size"]
    tokens = np.memmap(target / "tokens.bin", dtype=dtype, mode="r")
    train = TokenBlocks(tokens, block, np.load(target / "train_index.npy"))
    val: Optional[TokenBlocks] = None
    if (target / "val_tokens.bin").is_file():
        val_tokens = np.memmap(target / "val_tokens.bin", dtype=dtype, mode="r")
        n_val_blocks = len(val_tokens) // block
        if n_val_blocks == 0:
            warnings.warn("the validation file is shorter than one block; validation is skipped")
        else:
            val = TokenBlocks(val_tokens, block, np.arange(n_val_blocks, dtype=np.int64))
    else:
        val_idx = np.load(target / "val_index.npy")
        if len(val_idx):
            val = TokenBlocks(tokens, block, val_idx)
    if block < meta["requested_block_size"]:
        warnings.warn(
            f"the corpus has only {meta['num_tokens']} tokens, fewer than one block of "
            f"{meta['requested_block_size']}; training on a single block of {block} tokens (add more text for a better model)"
        )
    if val is None and meta.get("val_num_tokens") is None and meta["num_blocks"] < 2:
        warnings.warn("the corpus is too small for a validation split; validation is skipped")
    source = "cache" if from_cache else "tokenized"
    log(
        f"data ({source}): {meta['num_documents']} documents, {meta['num_tokens']:,} tokens, "
        f"{len(train)} train blocks" + (f", {len(val)} validation blocks" if val else "") + f" of {block} tokens"
    )
    return PreparedData(train, val, block, meta["num_documents"], target, from_cache, meta["key"])


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


class EpochShuffleSampler:
    """A permutation of the blocks per epoch, drawn from (seed, epoch) alone.

    Because the order is a pure function of seed and epoch, a resumed run can rebuild it and skip
    to its position without storing sampler state.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True):
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_items))
        rng = np.random.default_rng([self.seed, self.epoch])
        return iter(rng.permutation(self.num_items).tolist())


def collate_blocks(blocks: list[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack(blocks))


def make_dataloader(blocks: TokenBlocks, batch_size: int, seed: int, shuffle: bool):
    import torch
    from torch.utils.data import DataLoader

    sampler = EpochShuffleSampler(len(blocks), seed, shuffle)
    return DataLoader(
        blocks,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_blocks,
        # Its own generator: otherwise each new iterator draws a seed from the global torch RNG,
        # and a resumed run (which starts an iterator mid-epoch) would see different dropout.
        generator=torch.Generator().manual_seed(seed),
    )
