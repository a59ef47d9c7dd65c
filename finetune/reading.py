"""Text files -> documents, streamed: memory stays flat however large the corpus.

Files are read and decoded a few MB at a time. A document is a file, or the text between EOS
strings (`<|endoftext|>`), or with `line_by_line` a non-empty line. A document longer than
PIECE_CHARS may be handed on in pieces, cut only after a newline that is followed by a non-space
character: for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) no token ever spans such a cut, so
tokenizing the pieces gives exactly the tokens of the whole document.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError

# Bump when the rules that turn files into documents change: every cache keyed by them is rebuilt.
RULES_VERSION = 1
CHUNK_BYTES = 4 << 20  # read this much at a time
PIECE_CHARS = 1 << 20  # longer documents are tokenized in pieces (when the tokenizer allows it)
SAFE_CUT = re.compile(r"\n(?=\S)")
# A tokenizer learner sees runs of non-space (or of space) at most this long. BPE training time
# grows worse than quadratically with a word's length (a 128 KB run without whitespace: 50 s; 20 MB:
# hours), and no useful token is longer: base64 blobs and hashes are cut, ordinary words are not.
LEARN_RUN_CHARS = 64


def _long_runs(limit: int) -> re.Pattern:
    """Runs of non-space, or of space, longer than `limit` characters."""
    return re.compile(rf"\S{{{limit + 1},}}|\s{{{limit + 1},}}")


_LONG_RUN = _long_runs(LEARN_RUN_CHARS)


@dataclass
class Piece:
    text: str
    starts_document: bool
    ends_document: bool


def check_encoding(encoding: str) -> str:
    """The codec's canonical name ('UTF8' -> 'utf-8'); an unknown or non-text codec is an error.

    Checked before any cache is consulted, so a typo fails even when the data is already cached.
    """
    try:
        info = codecs.lookup(encoding)
    except (LookupError, TypeError, ValueError):
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):  # base64, zlib... turn bytes into bytes
        raise FinetuneError(
            f"unknown text encoding '{encoding}' (--encoding); use a Python codec name such as utf-8, cp1252 or latin-1"
        )
    return info.name


def bounded_runs(texts: Iterable[str], limit: int = LEARN_RUN_CHARS) -> Iterator[str]:
    """The texts for a tokenizer learner, runs longer than `limit` cut into separate texts of `limit`.

    Each piece reaches the learner as its own text, so no word spans a cut and nothing is invented.
    """
    pattern = _LONG_RUN if limit == LEARN_RUN_CHARS else _long_runs(limit)
    for text in texts:
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                yield text[start : match.start()]
            run = match.group()
            yield from (run[i : i + limit] for i in range(0, len(run), limit))
            start = match.end()
        if start == 0:
            yield text
        elif start < len(text):
            yield text[start:]


def _guess_encoding(raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    try:
        raw.decode("cp1252")
        return "cp1252"
    except UnicodeDecodeError:
        return "latin-1"


def decoded_chunks(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """The file's text a chunk at a time; binary files and undecodable bytes are errors.

    Undecodable bytes are not silently replaced: a model trained on mojibake learns mojibake. The
    message names the likely encoding so the fix is one flag. `encoding` has passed check_encoding.
    """
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset = 0
    with open(path, "rb") as fh:
        while True:
            raw = fh.read(CHUNK_BYTES)
            if offset == 0:
                is_utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff")) or encoding.lower().startswith("utf-16")
                if b"\x00" in raw[:8192] and not is_utf16:
                    raise FinetuneError(
                        f"data file '{path}' looks binary (it contains NUL bytes); pass text files only"
                    )
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as exc:
                position = max(0, offset + exc.start)
                guess = _guess_encoding(raw)
                raise FinetuneError(
                    f"data file '{path}' is not valid {encoding} "
                    f"(byte 0x{exc.object[exc.start]:02x} at offset {position}); "
                    f"it looks like {guess}: pass --encoding {guess} or convert it to UTF-8"
                ) from None
            if offset == 0:
                text = text.lstrip("\ufeff")
            offset += len(raw)
            if text:
                yield text
            if not raw:
                return


def _file_pieces(path: Path, eos_string: str, line_by_line: bool, encoding: str, split_long: bool) -> Iterator[Piece]:
    delimiters = [re.escape(eos_string)] if eos_string else []
    if line_by_line:
        delimiters.append(r"\r?\n")
    splitter = re.compile("|".join(delimiters)) if delimiters else None
    pending, in_document, seen_text = "", False, False
    for chunk in decoded_chunks(path, encoding):
        pending += chunk
        parts = splitter.split(pending) if splitter else [pending]
        pending = parts.pop()  # text after the last delimiter: maybe incomplete
        for i, part in enumerate(parts):
            if i == 0 and in_document:  # the end of a document already begun
                yield Piece(part.rstrip(), False, True)
                in_document = False
            elif part.strip():
                seen_text = True
                yield Piece(part.strip(), True, True)
        cut = (
            _last_safe_cut(pending, len(pending) - len(eos_string)) if split_long and len(pending) > PIECE_CHARS else -1
        )
        if cut > 0:
            head, pending = pending[:cut], pending[cut:]
            if in_document or head.strip():
                seen_text = seen_text or bool(head.strip())
                yield Piece(head if in_document else head.lstrip(), not in_document, False)
                in_document = True
    if in_document:
        yield Piece(pending.rstrip(), False, True)
    elif pending.strip():
        seen_text = True
        yield Piece(pending.strip(), True, True)
    if not seen_text:
        raise FinetuneError(f"data file '{path}' holds only whitespace; add text to it or leave it out")


def _last_safe_cut(text: str, end: int) -> int:
    """Index just after the last newline before `end` that is followed by a non-space, or -1."""
    newline = text.rfind("\n", 0, end)
    while newline != -1 and not SAFE_CUT.match(text, newline):
        newline = text.rfind("\n", 0, newline)
    return newline + 1 if newline != -1 else -1


def iter_pieces(
    files: list[Path], eos_string: str, line_by_line: bool, encoding: str, split_long: bool = False
) -> Iterator[Piece]:
    for path in files:
        yield from _file_pieces(path, eos_string, line_by_line, encoding, split_long)
