"""A run's inputs -> documents: its sources (files and hub datasets) and the rules that cut them into documents.

The same rules decide the documents packed into token blocks, the mode of the data (packed text or
supervised examples) and the texts a from-scratch tokenizer learns from, so all three read them here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from finetune.reading import Piece, check_encoding, iter_pieces
from finetune.records import BadRows, Source, detect_format, iter_rows, record_kind

if TYPE_CHECKING:
    from finetune.config import DataConfig


@dataclass(frozen=True)
class DocumentRules:
    """How text files and records become documents (the options of DataConfig that decide them)."""

    eos_string: str  # this string in a text file also separates documents
    line_by_line: bool  # each non-empty line of a text file is a document
    encoding: str  # the codec's canonical name (check_encoding): 'UTF16' and 'utf-16' read alike
    text_field: str  # the field holding the text of plain records

    @classmethod
    def of(cls, data: DataConfig) -> DocumentRules:
        return cls(data.eos_string, data.line_by_line, check_encoding(data.encoding), data.text_field)


def hub_sources(data: DataConfig) -> list[tuple[str, str]]:
    """(dataset id, split) of each hub dataset of the run."""
    return [(name, data.split) for name in data.datasets]


def file_sources(files: list[Path], data_format: Optional[str]) -> list[Source]:
    """Each file as the format it is read as (--format, else its suffix)."""
    return [Source(str(p), detect_format(p, data_format)) for p in files]


def data_sources(files: list[Path], data: DataConfig) -> list[Source]:
    """The run's files, then its hub datasets."""
    return file_sources(files, data.format) + [Source(name, "hub", split) for name, split in hub_sources(data)]


def data_mode(sources: list[Source], rules: DocumentRules) -> tuple[str, bool]:
    """("packed" | "supervised", has_chat) from the first record of each structured source."""
    kinds = set()
    for source in sources:
        if source.format == "text":
            kinds.add("text")
            continue
        for where, record in iter_rows(source, rules.encoding, BadRows(skip=True)):
            kinds.add(record_kind(record, rules.text_field, where))
            break
    return ("supervised" if kinds - {"text"} else "packed"), "chat" in kinds


def pieces(sources: list[Source], rules: DocumentRules, split_long: bool, bad: BadRows) -> Iterator[Piece]:
    """Documents for packing: text files, and the text field of structured records."""
    for source in sources:
        if source.format == "text":
            yield from iter_pieces(
                [Path(source.path)], rules.eos_string, rules.line_by_line, rules.encoding, split_long
            )
            continue
        for where, record in iter_rows(source, rules.encoding, bad):
            record_kind(record, rules.text_field, where)
            text = record[rules.text_field]
            if not isinstance(text, str):
                bad(f"{where}: field '{rules.text_field}' is {type(text).__name__}, not text")
            elif text.strip():
                yield Piece(text.strip(), True, True)


def training_texts(files: list[Path], data: DataConfig) -> Iterator[str]:
    """The words in the data (text, prompts, completions, messages), e.g. to learn a tokenizer from."""
    rules = DocumentRules.of(data)
    for source in data_sources(files, data):
        if source.format == "text":
            for piece in iter_pieces(
                [Path(source.path)], rules.eos_string, rules.line_by_line, rules.encoding, split_long=True
            ):
                yield piece.text
            continue
        for _, record in iter_rows(source, rules.encoding, BadRows(skip=True)):
            for key in (rules.text_field, "prompt", "completion"):
                if isinstance(record.get(key), str):
                    yield record[key]
            for message in record.get("messages") or []:
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    yield message["content"]
