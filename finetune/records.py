"""Structured data -> records: CSV/TSV, JSONL, JSON, Parquet, `save_to_disk` directories, hub datasets.

Every source yields (where, record) pairs, `where` being "file:line" for error messages. A record
is then one of three kinds, told apart by its fields:
    {"text": ...}                       plain text (field chosen with --text-field / --text-column)
    {"prompt": ..., "completion": ...}  loss on the completion only
    {"messages": [{"role", "content"}]} chat; loss on the assistant turns only
"""

from __future__ import annotations

import codecs
import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from finetune.errors import FinetuneError
from finetune.files import reading

if TYPE_CHECKING:
    from datasets import Dataset

FORMATS = ("text", "csv", "tsv", "jsonl", "json", "parquet", "arrow")  # --format; config.py and cli.py read it here
SUFFIX_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
# The first bytes of the binary formats: a text file given one of their names is caught up front.
SIGNATURES = {"parquet": (b"PAR1",), "arrow": (b"ARROW1", b"\xff\xff\xff\xff")}  # Arrow file, Arrow stream
FORMAT_NAMES = {"parquet": "a Parquet", "arrow": "an Arrow"}
ARROW_FIX = "pass a directory written by datasets' save_to_disk (or an .arrow file from one)"


@dataclass
class Source:
    """One input: a path (file or save_to_disk directory) or a hub dataset id, and its format."""

    path: str
    format: str
    split: Optional[str] = None  # hub datasets only


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file())


def detect_format(path: Path, override: Optional[str]) -> str:
    if override:
        return override
    if is_saved_dataset(path):
        return "arrow"
    return SUFFIX_FORMATS.get(path.suffix.lower(), "text")


def file_formats(files: list[Path], data_format: Optional[str]) -> list[str]:
    """The format each file is read as (--format, else its suffix), checked against its first bytes."""
    formats = [detect_format(p, data_format) for p in files]
    for path, fmt in zip(files, formats):
        check_signature(path, fmt)
    return formats


def check_signature(path: Path, data_format: str) -> None:
    """A Parquet or Arrow file must start with its format's signature; name a mislabelled file."""
    signatures = SIGNATURES.get(data_format)
    if signatures is None or path.is_dir():
        return
    with reading(path, "data file", "check the file"), open(path, "rb") as fh:
        head = fh.read(8)
    if not head.startswith(signatures):
        kind = "text" if _looks_like_text(head) else "some other format"
        raise FinetuneError(
            f"data file {path} is not {FORMAT_NAMES[data_format]} file (it looks like {kind}); rename it to match its "
            f"contents (.txt, .jsonl, .csv...) or pass --format"
        )


def _looks_like_text(head: bytes) -> bool:
    try:  # incremental: the first bytes may end inside a character
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


class BadRows:
    """Counts skipped rows with --skip-bad-rows, or stops at the first one."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0

    def __call__(self, message: str) -> None:
        if not self.skip:
            raise FinetuneError(f"{message}; fix it, or pass --skip-bad-rows to skip such rows")
        self.count += 1


def _csv_rows(path: Path, delimiter: str, encoding: str, bad: BadRows) -> Iterator[tuple[str, dict]]:
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, newline="", encoding=encoding) as fh:  # newline="": quoted fields may hold newlines
            reader = csv.reader(fh, delimiter=delimiter, strict=True)  # strict: a broken quote is an error, not data
            try:
                header = next(reader)
            except StopIteration:
                raise FinetuneError(f"{path} is empty; it needs a header row naming the columns") from None
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    bad(f"{path}:{reader.line_num}: malformed row ({exc})")
                    continue
                if not row:
                    continue
                if len(row) != len(header):
                    bad(f"{path}:{reader.line_num}: row has {len(row)} fields, the header has {len(header)}")
                    continue
                yield f"{path}:{reader.line_num}", dict(zip(header, row))
    except UnicodeDecodeError:
        raise FinetuneError(f"{path} is not valid {encoding}; pass --encoding or convert it to UTF-8") from None


def _jsonl_rows(path: Path, encoding: str, bad: BadRows) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, encoding=encoding) as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    bad(f"{path}:{number}: not valid JSON ({exc.msg})")
                    continue
                if not isinstance(record, dict):
                    bad(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                    continue
                yield f"{path}:{number}", record
    except UnicodeDecodeError:
        raise FinetuneError(f"{path} is not valid {encoding}; pass --encoding or convert it to UTF-8") from None


def _json_rows(path: Path, encoding: str) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding=encoding))
    except json.JSONDecodeError as exc:
        raise FinetuneError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); for one object per line use a .jsonl file"
        ) from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise FinetuneError(f'{path} must hold a list of JSON objects such as {{"text": "..."}}')
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise FinetuneError(
                f"{path}: item {i} is {type(record).__name__}, expected a JSON object; write records "
                f'such as {{"text": "..."}} (or prompt/completion, or messages)'
            )
        yield f"{path}[{i}]", record


def _dataset_rows(dataset: Dataset, where: str) -> Iterator[tuple[str, dict]]:
    for i, record in enumerate(dataset):
        yield f"{where}[{i}]", record


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    # pyarrow's own error types, on opening or on a damaged batch deep in the file
    with reading(path, "Parquet data file", "write it again, or convert it to .jsonl"):
        table = pq.ParquetFile(path)
        row = 0
        for batch in table.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield f"{path}[row {row}]", record
                row += 1


def _load_arrow(path: Path, split: Optional[str]) -> Dataset:
    """A save_to_disk directory (a Dataset or a DatasetDict's split), or one .arrow file of one."""
    import datasets

    with reading(path, "Arrow data", ARROW_FIX):
        loaded = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_file(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise FinetuneError(f"{path} has no split '{name}'; choose one of {', '.join(loaded)} with --split")
        loaded = loaded[name]
    return loaded


def iter_rows(source: Source, encoding: str, bad: BadRows) -> Iterator[tuple[str, dict]]:
    path = Path(source.path)
    if source.format == "csv":
        yield from _csv_rows(path, ",", encoding, bad)
    elif source.format == "tsv":
        yield from _csv_rows(path, "\t", encoding, bad)
    elif source.format == "jsonl":
        yield from _jsonl_rows(path, encoding, bad)
    elif source.format == "json":
        yield from _json_rows(path, encoding)
    elif source.format == "parquet":
        yield from _parquet_rows(path)
    elif source.format == "arrow":
        yield from _dataset_rows(_load_arrow(path, source.split), str(path))
    elif source.format == "hub":
        yield from _dataset_rows(load_hub_dataset(source.path, source.split or "train"), source.path)
    else:
        raise FinetuneError(f"unknown format '{source.format}'; use one of {', '.join(FORMATS)}")


def load_hub_dataset(name: str, split: str) -> Dataset:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types for "not reachable / not found"
        raise FinetuneError(
            f"could not load dataset '{name}' (split {split}) from the Hugging Face Hub "
            f"({str(exc).splitlines()[0][:120]}); "
            f"download it where there is network and pass the saved directory or files instead"
        ) from None


def record_kind(record: dict, text_field: str, where: str) -> str:
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if text_field in record:
        return "text"
    present = ", ".join(sorted(map(str, record))) or "none"
    raise FinetuneError(
        f"{where}: no '{text_field}' field (nor prompt/completion or messages); fields present: {present}; "
        f"choose one with --text-field NAME"
    )


def validate_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise FinetuneError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise FinetuneError(f"{where}: message {i} needs 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise FinetuneError(f"{where}: message {i} has role {message['role']!r}; use system, user or assistant")
    if not any(m["role"] == "assistant" for m in messages):
        raise FinetuneError(f"{where}: the conversation has no assistant message to learn from")
    return messages
