"""Documents -> token ids in a raw binary file, in batches, by several worker processes for large data.

Documents are joined with the tokenizer's real EOS id (and its BOS, where it has one of its own).
Text is streamed in and ids are streamed out, so memory stays flat however large the corpus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from finetune.data_files import data_bytes
from finetune.reading import Piece

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BATCH_PIECES = 2048  # pieces per tokenizer call
BATCH_CHARS = 2 << 20  # ... or this many characters, whichever comes first
PARALLEL_MIN_BYTES = 8 << 20  # below this, worker start-up costs more than it saves
PROGRESS_MIN_BYTES = 4 << 20  # data smaller than this is read in seconds: no progress bar


def is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("pre_tokenizer"))


def _piece_batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    """Pieces in batches for one tokenizer call each; never an empty batch."""
    batch: list[Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if len(batch) >= BATCH_PIECES or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker_tokenizer = None


def _worker_init(spec: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process; the pool is the parallelism
    from tokenizers import Tokenizer

    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_str(spec)


def _worker_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [
        np.asarray(e.ids, dtype=np.uint32) for e in _worker_tokenizer.encode_batch(texts, add_special_tokens=False)
    ]
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    return np.concatenate(encoded), lengths


def _encoded_batches(
    batches: Iterator[list[Piece]], tokenizer: PreTrainedTokenizerBase, workers: int
) -> Iterator[tuple[list[Piece], list]]:
    """(batch, ids per piece), in order. With workers > 1, a bounded window of batches is in flight
    in a process pool (the whole corpus is never queued in memory)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if workers <= 1 or backend is None:
        for batch in batches:
            yield (
                batch,
                tokenizer([p.text for p in batch], add_special_tokens=False, return_attention_mask=False)["input_ids"],
            )
        return
    import multiprocessing
    from collections import deque

    # spawn, not fork: the parent may hold torch/OpenMP threads, which do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_worker_init, initargs=(backend.to_str(),)) as pool:
        window: deque = deque()
        for batch in batches:
            window.append((batch, pool.apply_async(_worker_encode, ([p.text for p in batch],))))
            if len(window) >= 2 * workers:
                done, result = window.popleft()
                yield done, _split(*result.get())
        while window:
            done, result = window.popleft()
            yield done, _split(*result.get())


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1])


def default_workers(files: list[Path]) -> int:
    return min(os.cpu_count() or 1, 8) if data_bytes(files) >= PARALLEL_MIN_BYTES else 1


def progress_bar(total: Optional[int], desc: str, size: int, unit: str = "B"):
    """A tqdm bar on stderr for a step over `size` bytes of data; none when that takes only seconds."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        leave=False,
        dynamic_ncols=True,
        disable=size < PROGRESS_MIN_BYTES,
    )


def tokenize_to_file(
    pieces: Iterable[Piece], tokenizer: PreTrainedTokenizerBase, out_path: Path, dtype, workers: int = 1, size: int = 0
) -> tuple[int, int]:
    """Stream document pieces through the tokenizer into a raw binary file of ids; returns (documents, tokens).

    `size`, the data's bytes, sizes the progress bar (characters read stand in for bytes)."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    # Llama-style tokenizers expect a BOS at the start of each document; GPT-2's BOS is its EOS.
    prefix = [bos] if bos is not None and bos != eos else []
    n_docs = n_tokens = 0
    with open(out_path, "wb") as fh, progress_bar(size, "tokenizing", size) as bar:
        for batch, ids in _encoded_batches(_piece_batches(pieces), tokenizer, workers):
            bar.update(min(sum(len(p.text) for p in batch), bar.total - bar.n))
            parts = []
            for piece, piece_ids in zip(batch, ids):
                if piece.starts_document:
                    parts.append(np.asarray(prefix, dtype=dtype))
                    n_docs += 1
                parts.append(np.asarray(piece_ids, dtype=dtype))
                if piece.ends_document:
                    parts.append(np.asarray([eos], dtype=dtype))
            flat = np.concatenate(parts)
            fh.write(flat.tobytes())
            n_tokens += len(flat)
    return n_docs, n_tokens
