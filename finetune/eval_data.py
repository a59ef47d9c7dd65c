"""What `finetune eval` scores: the data read exactly as training reads it, and the windows it is cut into.

The files go through training's own pipeline (data_files -> documents -> token_cache.prepare_data, or a
`finetune prepare` directory), with no validation split held out: plain text becomes one token stream,
prompt/completion and chat records stay one example each with their loss masks. The stream is scored in
windows of up to --block-size tokens moved by --stride (Hugging Face's sliding-window perplexity): each
token is scored once, with as much context as the window gives it.

No torch and no transformers here: the ONNX path (onnx_evaluation.py) reads its data through this module
with a bare `tokenizers.Tokenizer` (BareTokenizer).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from finetune.config import DataConfig
    from finetune.supervised import Examples

# The DataConfig fields that decide how files become tokens: a run's values are read from its config.yaml.
READING_FIELDS = ("format", "text_field", "skip_bad_rows", "line_by_line", "eos_string", "encoding", "cache_dir")


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of the stream go through the model; positions `first`.. of the window are scored
    (position j is the next-token prediction of token begin + j from the tokens before it)."""

    begin: int
    end: int
    first: int  # >= 1: the window's first token has no context inside it

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def scored(self) -> int:
        return self.length - self.first


def windows(n_tokens: int, block_size: int, stride: int) -> list[Window]:
    """Hugging Face's sliding windows: start every `stride` tokens, score only what earlier windows did not.

    stride == block_size: non-overlapping blocks, the first token of each unscored (as training's blocks).
    stride < block_size: every token after the first is scored once, with at least block_size - stride
    tokens of context (except at the start).
    """
    if not 1 <= stride <= block_size:
        raise FinetuneError(f"--stride {stride} must be between 1 and the block size ({block_size})")
    found, begin, scored_until = [], 0, 0
    while begin < n_tokens:
        end = min(begin + block_size, n_tokens)
        window = Window(begin, end, max(scored_until - begin, 1))
        if window.scored > 0:
            found.append(window)
        scored_until = end
        if end == n_tokens:
            break
        begin += stride
    return found


def window_ids(stream: np.ndarray, batch: list[Window]) -> np.ndarray:
    """The token ids of a batch of equal-length windows, as an int64 (batch, length) array."""
    return np.stack([np.asarray(stream[w.begin : w.end], dtype=np.int64) for w in batch])


def batches_of_windows(found: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Windows of one length batched together (only the last window is shorter)."""
    batch: list[Window] = []
    for window in found:
        if batch and (len(batch) == batch_size or window.length != batch[0].length):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


@dataclass
class EvalData:
    """The data to score: a token stream (plain text) or supervised examples, and where it came from."""

    files: list[Path]
    stream: Optional[np.ndarray] = None  # the token ids of all documents, joined as training joins them
    examples: Optional[Examples] = None  # prompt/completion or chat examples, each with its loss mask

    @property
    def supervised(self) -> bool:
        return self.examples is not None

    def describe(self) -> str:
        names = ", ".join(p.name for p in self.files[:3]) + (
            f" and {len(self.files) - 3} more" if len(self.files) > 3 else ""
        )
        if self.examples is not None:
            return f"{names}: {len(self.examples)} examples"
        return f"{names}: {len(self.stream):,} tokens"


def data_config(run_dir: Optional[Path], overrides: dict[str, Any]) -> DataConfig:
    """How the files are read: the run's own settings (its config.yaml) where there is a run, then the flags."""
    from finetune.config import DataConfig, load_yaml

    settings: dict[str, Any] = {}
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        section = load_yaml(run_dir / "config.yaml").get("data")
        if isinstance(section, dict):
            settings = {key: section[key] for key in (*READING_FIELDS, "block_size") if key in section}
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return replace(DataConfig(**settings), val_fraction=0.0, val_file=None)  # every token is scored


def read_eval_data(files: list[Path], tokenizer, block_size: int, data: DataConfig) -> EvalData:
    """`files` tokenized exactly as training tokenizes them (through the token cache), with nothing held out."""
    from finetune.prepared import is_prepared_dir, load_prepared
    from finetune.token_cache import prepare_data

    quiet: Callable[[str], None] = lambda _message: None  # noqa: E731 (its lines speak of train blocks)
    with warnings.catch_warnings():  # nor do its warnings about validation splits apply here
        warnings.simplefilter("ignore")
        if len(files) == 1 and is_prepared_dir(files[0]):
            prepared = load_prepared(files[0], tokenizer, None, log=quiet)
        else:
            prepared = prepare_data(files, tokenizer, block_size, data, log=quiet)
    split = prepared.train
    if prepared.mode == "supervised":
        from finetune.supervised import Examples

        everything = np.arange(len(split.offsets) - 1, dtype=np.int64)  # the prepared directory's held-out ones too
        return EvalData(files, examples=Examples(split.tokens, split.masks, split.offsets, everything))
    return EvalData(files, stream=split.tokens)  # memory-mapped: windows are read as they are scored


def same_tokens(a: EvalData, b: EvalData) -> bool:
    """Whether two readings of the data (by two tokenizers) are the same tokens: only then do losses compare."""
    if a.supervised != b.supervised:
        return False
    if a.examples is not None:
        return np.array_equal(a.examples.tokens, b.examples.tokens) and np.array_equal(
            a.examples.offsets, b.examples.offsets
        )
    return np.array_equal(a.stream, b.stream)


class BareTokenizer:
    """A `tokenizers.Tokenizer` with the few attributes the data pipeline reads of a transformers tokenizer.

    The ONNX path has no transformers: its export carries tokenizer.json and the special ids in its manifest.
    """

    def __init__(self, backend, eos_token_id: int, bos_token_id: Optional[int]):
        self.backend_tokenizer = backend
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __call__(self, texts: Union[str, list[str]], add_special_tokens: bool = True, **_ignored) -> dict:
        single = isinstance(texts, str)
        encoded = self.backend_tokenizer.encode_batch(
            [texts] if single else texts, add_special_tokens=add_special_tokens
        )
        ids = [e.ids for e in encoded]
        return {"input_ids": ids[0] if single else ids}
