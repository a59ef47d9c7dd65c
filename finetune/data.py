"""Documents -> token blocks, cached on disk and memory-mapped.

Documents (see reading.py) are tokenized in batches by several worker processes and joined with
the tokenizer's real EOS id, then cut into fixed blocks. The token stream is written once to a
cache directory named by a fingerprint of everything that decides it (file contents, tokenizer,
block size, mode), so a second run on the same data tokenizes nothing; memory stays flat because
text is streamed in and ids are streamed out.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import stat
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from finetune import examples as sft
from finetune.errors import FinetuneError
from finetune.files import fsync_tree, os_error, os_error_reason, read_json, reading, require_regular_file
from finetune.reading import RULES_VERSION as READING_RULES
from finetune.reading import Piece, check_encoding, iter_pieces
from finetune.records import (
    SUFFIX_FORMATS,
    BadRows,
    Source,
    check_signature,
    detect_format,
    is_saved_dataset,
    iter_rows,
    record_kind,
    validate_messages,
)

PREPARED_MANIFEST = "finetune_prepared.json"  # marks a `finetune prepare` output directory
CACHE_VERSION = 3  # bump when the cache layout or the tokenization rules change (3: keyed by format and encoding too)
BATCH_PIECES = 2048  # pieces per tokenizer call
BATCH_CHARS = 2 << 20  # ... or this many characters, whichever comes first
PARALLEL_MIN_BYTES = 8 << 20  # below this, worker start-up costs more than it saves
PROGRESS_MIN_BYTES = 4 << 20  # data smaller than this is read in seconds: no progress bar


PREPARED_CONTENTS = ("meta.json", "tokens.bin", "train_index.npy")  # what `finetune prepare` writes beside its manifest


def is_prepared_dir(path: Path) -> bool:
    """A `finetune prepare` output, whole or damaged (its manifest lost): never read as a folder of data files."""
    if not path.is_dir():
        return False
    manifest = path / PREPARED_MANIFEST
    return manifest.exists() or manifest.is_symlink() or all((path / name).exists() for name in PREPARED_CONTENTS)


def cache_root(configured: Optional[str]) -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("FINETUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "finetune"


# ---------------------------------------------------------------------------------------------
# Files and documents
# ---------------------------------------------------------------------------------------------


DATA_FILE = "data file"


def resolve_files(paths: Iterable[str]) -> list[Path]:
    """Expand files, directories (recursively, data files only) and globs, in a stable order.

    Every file is checked here, before any work: a missing, unreadable or special file (a FIFO, a
    device, a directory where a file should be) is one error naming it.
    """
    files = [file for raw in paths for file in _expand(raw)]
    unique = list(dict.fromkeys(p.resolve() for p in files))
    for path in unique:
        if path.is_file() and path.stat().st_size == 0:
            raise FinetuneError(f"data file '{path}' is empty; add text to it or leave it out")
    prepared = [p for p in unique if is_prepared_dir(p)]
    if prepared and len(unique) > 1:
        raise FinetuneError(
            f"{prepared[0]} is a `finetune prepare` directory: train on it alone, or prepare all the data together"
        )
    return unique


def _expand(raw: str) -> list[Path]:
    path = Path(raw).expanduser()
    if any(ch in raw for ch in "*?["):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        matches = [m for m in matches if not m.is_dir()]
        if not matches:
            raise FinetuneError(f"no files match '{raw}'; check the pattern (quote it so the shell does not expand it)")
        for match in matches:
            require_regular_file(match, DATA_FILE)
        return matches
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FinetuneError(f"data file '{raw}' does not exist; check the path") from None
    except OSError as exc:  # a name too long, a path through a file, a directory we may not enter
        raise os_error(raw, exc, DATA_FILE) from None
    if not stat.S_ISDIR(mode):
        require_regular_file(path, DATA_FILE)  # a FIFO or a device is named as such, not read forever
        return [path]
    if not os.access(path, os.R_OK | os.X_OK):
        raise os_error(raw, PermissionError(errno.EACCES, "Permission denied", raw), "data directory")
    if is_prepared_dir(path):
        check_prepared(path)
        return [path]
    from finetune.runs import is_checkpoint_dir, is_run_dir

    if is_run_dir(path) or is_checkpoint_dir(path):
        kind = "a run directory" if is_run_dir(path) else "a checkpoint"
        raise FinetuneError(
            f"'{raw}' is {kind}, not training data; point at your data files (a run continues "
            f"by running its `finetune train` command again, or with --resume)"
        )
    if is_saved_dataset(path):
        return [path]  # a datasets.save_to_disk directory is one input
    return _data_files_in(path, raw)


def _data_files_in(directory: Path, raw: str) -> list[Path]:
    """The files under `directory` whose suffix names a data format, sorted; links followed once."""

    def fail(exc: OSError):
        raise os_error(exc.filename, exc, "data directory")

    found, seen = [], set()
    for root, dirs, names in os.walk(directory, onerror=fail, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(root, name) for name in names if Path(name).suffix.lower() in SUFFIX_FORMATS]
    if not found:
        raise FinetuneError(
            f"directory '{raw}' holds no data files ({', '.join(sorted(SUFFIX_FORMATS))}); point at your files"
        )
    found.sort()
    for path in found:
        require_regular_file(path, DATA_FILE)
    return found


def describe_files(files: list[Path], limit: int = 6) -> Optional[str]:
    """'data: 12 files in docs/ (.txt 10, .md 2)', naming them when few; None for a single input.

    A directory is read whole (every file with a data suffix, a README.md included), so say what was taken.
    """
    if len(files) < 2:
        return None
    common = Path(os.path.commonpath([str(f) for f in files]))
    try:
        shown = common.relative_to(Path.cwd())
    except ValueError:
        shown = common
    suffixes = Counter(f.suffix.lower() or "(none)" for f in files)
    counts = ", ".join(f"{suffix} {n}" for suffix, n in suffixes.most_common())
    line = f"data: {len(files)} files in {shown}{os.sep} ({counts})"
    if len(files) <= limit:
        line += ": " + ", ".join(str(f.relative_to(common)) for f in files)
    return line


def file_formats(files: list[Path], data_format: Optional[str]) -> list[str]:
    """The format each file is read as (--format, else its suffix), checked against its first bytes."""
    formats = [detect_format(p, data_format) for p in files]
    for path, fmt in zip(files, formats):
        check_signature(path, fmt)
    return formats


# ---------------------------------------------------------------------------------------------
# Fingerprints and the token cache
# ---------------------------------------------------------------------------------------------


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
    mode: str = "packed"  # "packed" blocks, or "supervised" examples with loss masks
    chat: bool = False  # chat data: the tokenizer carries a chat template


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and '"ByteLevel"' in json.dumps(json.loads(backend.to_str()).get("pre_tokenizer"))


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
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
    return (np.concatenate(encoded) if encoded else np.zeros(0, np.uint32)), lengths


def _encoded_batches(batches: Iterator[list[Piece]], tokenizer, workers: int) -> Iterator[tuple[list[Piece], list]]:
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
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def data_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files if p.is_file())


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
    pieces: Iterable[Piece], tokenizer, out_path: Path, dtype, workers: int = 1, size: int = 0
) -> tuple[int, int]:
    """Stream document pieces through the tokenizer into a raw binary file of ids; returns (documents, tokens).

    `size`, the data's bytes, sizes the progress bar (characters read stand in for bytes)."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    # Llama-style tokenizers expect a BOS at the start of each document; GPT-2's BOS is its EOS.
    prefix = [bos] if bos is not None and bos != eos else []
    n_docs = n_tokens = 0
    with open(out_path, "wb") as fh, progress_bar(size, "tokenizing", size) as bar:
        for batch, ids in _encoded_batches(_batches(pieces), tokenizer, workers):
            bar.update(min(sum(len(p.text) for p in batch), bar.total - bar.n))
            parts = []
            for piece, piece_ids in zip(batch, ids):
                if piece.starts_document:
                    parts.append(np.asarray(prefix, dtype=dtype))
                    n_docs += 1
                parts.append(np.asarray(piece_ids, dtype=dtype))
                if piece.ends_document:
                    parts.append(np.asarray([eos], dtype=dtype))
            flat = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
            fh.write(flat.tobytes())
            n_tokens += len(flat)
    return n_docs, n_tokens


def _val_block_indices(n_blocks: int, val_fraction: float) -> np.ndarray:
    """Evenly spaced blocks, so validation covers the whole corpus and does not depend on a seed."""
    if val_fraction <= 0 or n_blocks < 2:
        return np.zeros(0, dtype=np.int64)
    n_val = min(n_blocks - 1, max(1, round(n_blocks * val_fraction)))
    stride = n_blocks / n_val
    return np.floor((np.arange(n_val) + 0.5) * stride).astype(np.int64)


def documents_key(
    files: list[Path],
    hub,
    data_format: Optional[str],
    text_field: str,
    eos_string: str,
    line_by_line: bool,
    encoding: str,
) -> dict:
    """Everything that decides the documents read from the data (so also a tokenizer learned from them).

    The format is the one each file is read as, not only --format: the same bytes named .txt and
    .jsonl are different documents. The encoding is the codec's canonical name ('UTF8' = 'utf-8').
    """
    encoding = check_encoding(encoding)  # first: a typo fails at once, before the data is hashed
    formats = file_formats(files, data_format)
    return {
        "train": files_digest(files),
        "formats": formats,
        "encoding": encoding,
        "text_field": text_field,
        "eos_string": eos_string,
        "line_by_line": line_by_line,
        "hub": [list(h) for h in hub],
        "reading": READING_RULES,
    }


def cache_key(
    files: list[Path],
    tokenizer,
    block_size: int,
    *,
    line_by_line: bool = False,
    val_fraction: float = 0.05,
    val_files: Optional[list[Path]] = None,
    eos_string: str = "<|endoftext|>",
    encoding: str = "utf-8",
    text_field: str = "text",
    data_format: Optional[str] = None,
    skip_bad_rows: bool = False,
    hub: tuple = (),
) -> dict:
    """What the token cache entry is named by: the documents, the tokenizer and the way they are cut.

    The names of checkpoint.DATA_KEY_NAMES keep their meaning, so a run resumes across versions.
    """
    return {
        "version": CACHE_VERSION,
        **documents_key(files, hub, data_format, text_field, eos_string, line_by_line, encoding),
        "val": files_digest(val_files) if val_files else None,
        "val_formats": file_formats(val_files, data_format) if val_files else None,
        "tokenizer": tokenizer_digest(tokenizer),
        "block_size": block_size,
        "val_fraction": None if val_files else val_fraction,
        "skip_bad_rows": skip_bad_rows,
    }


def fingerprint(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def write_error(path: Path, exc: OSError, what: str, option: str) -> FinetuneError:
    """One line for a failed write into a directory the user chose with `option` (--cache-dir, --output)."""
    cause, _ = os_error_reason(exc, writing=True)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free disk space or choose another {option}"
    else:
        fix = f"make it writable or choose another {option}"
    return FinetuneError(f"cannot write {what} {path}: {cause}; {fix}")


def discard(path: Path) -> None:
    """Remove a damaged cache entry: renamed aside first, so no reader ever sees it half-deleted."""
    aside = path.with_name(f".discard-{path.name}-{os.getpid()}")
    try:
        os.replace(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


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
    text_field: str = "text",
    data_format: Optional[str] = None,
    skip_bad_rows: bool = False,
    hub: tuple = (),
    log=print,
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
    key = cache_key(
        files,
        tokenizer,
        block_size,
        line_by_line=line_by_line,
        val_fraction=val_fraction,
        val_files=val_files,
        eos_string=eos_string,
        encoding=encoding,
        text_field=text_field,
        data_format=data_format,
        skip_bad_rows=skip_bad_rows,
        hub=hub,
    )
    encoding = key["encoding"]
    root = cache_root(cache_dir) / "data"
    target = root / fingerprint(key)

    def fill(out: Path) -> None:
        meta = _build_cache(
            files,
            val_files,
            tokenizer,
            block_size,
            line_by_line,
            val_fraction,
            eos_string,
            encoding,
            dtype,
            out,
            text_field,
            data_format,
            skip_bad_rows,
            hub,
        )
        (out / "meta.json").write_text(json.dumps({**meta, "key": key}, indent=1))

    try:
        entry = _cached_entry(target, key, log)
        from_cache = entry is not None
        if not from_cache:
            write_entry(target, fill)
            entry = _read_entry(target, CACHE_FILE, "delete it; the next run rebuilds it")
    except OSError as exc:
        if exc.filename is not None and not str(exc.filename).startswith(str(root)):
            raise os_error(exc.filename, exc, DATA_FILE) from None  # reading the data, not the cache
        raise write_error(root, exc, "the token cache", "--cache-dir") from None
    prepared = _announce(target, *entry, from_cache=from_cache, log=log)
    if prepared.chat:
        sft.ensure_chat_template(tokenizer)  # also on a cache hit: checkpoints must carry the template
    return prepared


def _cached_entry(target: Path, key: dict, log):
    """The entry named `target` when it is whole and holds `key`; a damaged one is removed (and rebuilt)."""
    if not os.path.lexists(target):
        return None
    try:
        entry = _read_entry(target, CACHE_FILE, "it is rebuilt")
        if entry[0].get("key") != key:
            raise FinetuneError(f"{CACHE_FILE} {target / 'meta.json'} was written for other data")
    except FinetuneError as exc:
        log(f"warning: {str(exc).split('; ')[0]}; rebuilding it")
        discard(target)
        return None
    return entry


def write_entry(target: Path, fill) -> None:
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


def _sources(files: list[Path], hub: list[tuple[str, str]], data_format: Optional[str]) -> list[Source]:
    return [Source(str(p), detect_format(p, data_format)) for p in files] + [
        Source(name, "hub", split) for name, split in hub
    ]


def data_mode(sources: list[Source], text_field: str, encoding: str) -> tuple[str, bool]:
    """("packed" | "supervised", has_chat) from the first record of each structured source."""
    kinds = set()
    for source in sources:
        if source.format == "text":
            kinds.add("text")
            continue
        for where, record in iter_rows(source, encoding, BadRows(skip=True)):
            kinds.add(record_kind(record, text_field, where))
            break
    return ("supervised" if kinds - {"text"} else "packed"), "chat" in kinds


def _pieces(sources: list[Source], opts: dict, split_long: bool, bad: BadRows) -> Iterator[Piece]:
    """Documents for packing: text files, and the text field of structured records."""
    for source in sources:
        if source.format == "text":
            yield from iter_pieces(
                [Path(source.path)], opts["eos_string"], opts["line_by_line"], opts["encoding"], split_long
            )
            continue
        for where, record in iter_rows(source, opts["encoding"], bad):
            record_kind(record, opts["text_field"], where)
            text = record[opts["text_field"]]
            if not isinstance(text, str):
                bad(f"{where}: field '{opts['text_field']}' is {type(text).__name__}, not text")
            elif text.strip():
                yield Piece(text.strip(), True, True)


def _examples(sources: list[Source], opts: dict, tokenizer, bad: BadRows) -> Iterator[tuple[list[int], list[int]]]:
    """Supervised examples: prompt/completion and chat records, and plain documents (all tokens learned)."""
    for source in sources:
        if source.format == "text":
            for piece in iter_pieces([Path(source.path)], opts["eos_string"], opts["line_by_line"], opts["encoding"]):
                yield sft.text_example(tokenizer, piece.text)
            continue
        for where, record in iter_rows(source, opts["encoding"], bad):
            kind = record_kind(record, opts["text_field"], where)
            if kind == "chat":
                yield sft.chat_example(tokenizer, validate_messages(record["messages"], where))
            elif kind == "prompt_completion":
                prompt, completion = record["prompt"], record["completion"]
                if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
                    bad(f"{where}: 'prompt' and 'completion' must be text and the completion non-empty")
                    continue
                yield sft.prompt_completion_example(tokenizer, prompt, completion)
            elif isinstance(record[opts["text_field"]], str) and record[opts["text_field"]].strip():
                yield sft.text_example(tokenizer, record[opts["text_field"]].strip())


def training_texts(
    files: list[Path],
    hub: list[tuple[str, str]],
    data_format: Optional[str],
    text_field: str,
    eos_string: str,
    line_by_line: bool,
    encoding: str,
) -> Iterator[str]:
    """The words in the data (text, prompts, completions, messages), e.g. to learn a tokenizer from."""
    for source in _sources(files, hub, data_format):
        if source.format == "text":
            for piece in iter_pieces([Path(source.path)], eos_string, line_by_line, encoding, split_long=True):
                yield piece.text
            continue
        for _, record in iter_rows(source, encoding, BadRows(skip=True)):
            for key in (text_field, "prompt", "completion"):
                if isinstance(record.get(key), str):
                    yield record[key]
            for message in record.get("messages") or []:
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    yield message["content"]


def _build_supervised(sources, opts, tokenizer, block_size, val_fraction, dtype, out: Path, bad: BadRows) -> dict:
    offsets, truncated, emptied, n_tokens, n_learned = [0], 0, 0, 0, 0
    size = data_bytes([Path(s.path) for s in sources])
    with (
        open(out / "tokens.bin", "wb") as tokens,
        open(out / "mask.bin", "wb") as masks,
        progress_bar(None, "tokenizing", size, unit=" examples") as bar,
    ):
        for ids, mask in _examples(sources, opts, tokenizer, bad):
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
            f"truncation at --block-size {block_size} removed every learned token of all {emptied} examples; raise --block-size"
        )
    if n_examples == 0:
        raise FinetuneError("the data holds no usable examples; check the prompt/completion or messages fields")
    np.save(out / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    val_idx = _val_block_indices(n_examples, val_fraction)
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


def _build_cache(
    files,
    val_files,
    tokenizer,
    block_size,
    line_by_line,
    val_fraction,
    eos_string,
    encoding,
    dtype,
    out: Path,
    text_field: str = "text",
    data_format: Optional[str] = None,
    skip_bad_rows: bool = False,
    hub: tuple = (),
) -> dict:
    opts = dict(eos_string=eos_string, line_by_line=line_by_line, encoding=encoding, text_field=text_field)
    sources = _sources(files, list(hub), data_format)
    mode, has_chat = data_mode(sources, text_field, encoding)
    bad = BadRows(skip_bad_rows)
    if has_chat:
        sft.ensure_chat_template(tokenizer)
    if mode == "supervised":
        meta = _build_supervised(sources, opts, tokenizer, block_size, val_fraction, dtype, out, bad)
        meta.update(dtype=np.dtype(dtype).name, chat=has_chat, bad_rows=bad.count)
        return meta
    split_long = _is_byte_level(tokenizer)
    n_docs, n_tokens = tokenize_to_file(
        _pieces(sources, opts, split_long, bad),
        tokenizer,
        out / "tokens.bin",
        dtype,
        workers=default_workers(files),
        size=data_bytes(files),
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
    if val_files:
        val_sources = _sources(val_files, [], data_format)
        _, n_val_tokens = tokenize_to_file(
            _pieces(val_sources, opts, split_long, bad), tokenizer, out / "val_tokens.bin", dtype
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


# ---------------------------------------------------------------------------------------------
# Reading an entry back: our cache, or a `finetune prepare` directory
# ---------------------------------------------------------------------------------------------

CACHE_FILE = "token cache file"
PREPARED_FILE = "prepared data file"
PREPARED_FIX = "prepare the data again with `finetune prepare`"
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


def _read_entry(target: Path, what: str, fix: str) -> tuple[dict, object, object]:
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
        train = sft.Examples(tokens, masks, offsets, _index_file(target / "train_index.npy", n, what, fix))
        return meta, train, (sft.Examples(tokens, masks, offsets, val_idx) if len(val_idx) else None)
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


def _announce(target: Path, meta: dict, train, val, from_cache: bool, log) -> PreparedData:
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
        return PreparedData(
            train,
            val,
            meta["block_size"],
            meta["num_documents"],
            target,
            from_cache,
            meta["key"],
            "supervised",
            meta["chat"],
        )
    block = meta["block_size"]
    if meta.get("val_num_tokens") is not None and val is None:
        warnings.warn("the validation file is shorter than one block; validation is skipped")
    if block < meta["requested_block_size"]:
        warnings.warn(
            f"the corpus has only {meta['num_tokens']} tokens, fewer than one block of "
            f"{meta['requested_block_size']}; training on a single block of {block} tokens (add more text for a better model)"
        )
    if val is None and meta.get("val_num_tokens") is None and meta["num_blocks"] < 2:
        warnings.warn("the corpus is too small for a validation split; validation is skipped")
    log(
        f"data ({source}): {meta['num_documents']} documents, {meta['num_tokens']:,} tokens, "
        f"{len(train)} train blocks"
        + (f", {len(val)} validation blocks" if val else "")
        + f" of {block} tokens"
        + skipped
    )
    return PreparedData(train, val, block, meta["num_documents"], target, from_cache, meta["key"])


def write_prepared(prepared: PreparedData, tokenizer, tmp: Path, model_name: str) -> None:
    """Fill `tmp` (from checkpoint.start_output_dir) with the cache and tokenizer `finetune train DIR` reads."""
    shutil.copytree(prepared.cache_dir, tmp, dirs_exist_ok=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    manifest = {"model": model_name, "tokenizer": tokenizer_digest(tokenizer), "block_size": prepared.block_size}
    (tmp / PREPARED_MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(directory: Path) -> dict:
    """A prepared directory's manifest: the model it was tokenized for, the tokenizer's digest, the block size."""
    path = directory / PREPARED_MANIFEST
    if not path.exists() and not path.is_symlink():
        raise FinetuneError(
            f"{directory} holds prepared data ({', '.join(PREPARED_CONTENTS)}) but not its manifest "
            f"{path.name}; {PREPARED_FIX}"
        )
    manifest = read_json(path, PREPARED_FILE, PREPARED_FIX, required=("model", "tokenizer", "block_size"))
    block = manifest["block_size"]
    if not (isinstance(block, int) and not isinstance(block, bool) and block > 0) or not isinstance(
        manifest["tokenizer"], str
    ):
        raise FinetuneError(f"{PREPARED_FILE} {path} is damaged (bad block_size or tokenizer); {PREPARED_FIX}")
    return manifest


def check_prepared(directory: Path) -> None:
    """Every file of a prepared directory is whole, so a damaged one is named before training starts."""
    read_manifest(directory)
    _read_entry(directory, PREPARED_FILE, PREPARED_FIX)
    tokenizer_dir = directory / "tokenizer"
    config = tokenizer_dir / "tokenizer_config.json"
    read_json(config, PREPARED_FILE, PREPARED_FIX)
    spec = tokenizer_dir / "tokenizer.json"
    if spec.exists():
        from tokenizers import Tokenizer

        with reading(spec, PREPARED_FILE, PREPARED_FIX):
            require_regular_file(spec, PREPARED_FILE)
            Tokenizer.from_file(str(spec))


def load_prepared(directory: Path, tokenizer, block_size: Optional[int], log=print) -> PreparedData:
    """A `finetune prepare` directory, checked against the tokenizer and block size of this run."""
    manifest = read_manifest(directory)
    if tokenizer_digest(tokenizer) != manifest["tokenizer"]:
        raise FinetuneError(
            f"{directory} was prepared with the tokenizer of '{manifest['model']}', not this model's; "
            f"train with --model {manifest['model']} or prepare the data again with --model"
        )
    if block_size is not None and block_size != manifest["block_size"]:
        raise FinetuneError(
            f"{directory} was prepared with --block-size {manifest['block_size']}; use that, or prepare again"
        )
    meta, train, val = _read_entry(directory, PREPARED_FILE, PREPARED_FIX)
    _require_known_ids(directory, meta, len(tokenizer))
    prepared = _announce(directory, meta, train, val, from_cache=True, log=log)
    if prepared.chat:
        sft.ensure_chat_template(tokenizer)
    return prepared


def _require_known_ids(directory: Path, meta: dict, vocab_size: int) -> None:
    """Every token id is one the tokenizer has: damaged ids would fail deep inside the model, mid-training."""
    for name in ("tokens.bin", "val_tokens.bin"):
        path = directory / name
        if path.is_file() and path.stat().st_size:
            largest = int(np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r").max())
            if largest >= vocab_size:
                raise FinetuneError(
                    f"{PREPARED_FILE} {path} is damaged: it holds token id {largest}, beyond the "
                    f"tokenizer's {vocab_size} tokens; {PREPARED_FIX}"
                )


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


class EpochShuffleSampler:
    """A permutation of the blocks per epoch, drawn from (seed, epoch) alone.

    Because the order is a pure function of seed and epoch, a resumed run can rebuild it and skip
    to its position without storing sampler state.
    """

    def __init__(
        self, num_items: int, seed: int, shuffle: bool = True, lengths: Optional[np.ndarray] = None, group_size: int = 0
    ):
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        # Variable-length examples: within each group of `group_size` shuffled items, longest first,
        # so a batch holds similar lengths and little of it is padding (HF's group_by_length idea).
        self.lengths = lengths
        self.group_size = group_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_items))
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_items)
        if self.lengths is not None and self.group_size:
            groups = [order[i : i + self.group_size] for i in range(0, len(order), self.group_size)]
            order = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups])
        return iter(order.tolist())


def collate_blocks(blocks: list[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack(blocks))


def make_dataloader(blocks, batch_size: int, seed: int, shuffle: bool, pad_id: int = 0):
    """Batches of fixed blocks (a tensor), or of padded examples (a dict with labels and attention mask)."""
    import torch
    from torch.utils.data import DataLoader

    if isinstance(blocks, sft.Examples):
        sampler = EpochShuffleSampler(len(blocks), seed, shuffle, lengths=blocks.lengths(), group_size=batch_size * 50)
        collate = sft.collate_examples(pad_id)
    else:
        sampler = EpochShuffleSampler(len(blocks), seed, shuffle)
        collate = collate_blocks
    return DataLoader(
        blocks,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
        # Its own generator: otherwise each new iterator draws a seed from the global torch RNG,
        # and a resumed run (which starts an iterator mid-epoch) would see different dropout.
        generator=torch.Generator().manual_seed(seed),
    )
