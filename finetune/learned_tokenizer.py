"""The tokenizer a from-scratch preset learns from the run's own data: byte-level BPE, cached by the data's key."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.modeling import EOS, SCRATCH_MODELS, finish_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from finetune.config import RunConfig


LEARNER_VERSION = 2  # bump when the way a tokenizer is learned changes (2: long runs cut, reading.bounded_runs)


def train_scratch_tokenizer(preset: str, texts: Iterable[str], digest: str, cache_dir: Path, size: int = 0, log=None):
    """A byte-level BPE tokenizer learned from the training data, cached by the data's digest.

    Byte-level BPE (GPT-2's scheme) can encode any text, so prompts with unseen characters still work.
    `digest` names everything that decides the texts (cache_keys.documents_key); `size`, the data's bytes,
    sizes the progress bar.
    """
    from transformers import AutoTokenizer

    from finetune.files import short
    from finetune.token_cache import discard, write_entry, write_error

    vocab_size = SCRATCH_MODELS[preset]["vocab_size"]
    key = hashlib.sha256(f"{preset}:{vocab_size}:{LEARNER_VERSION}:{digest}".encode()).hexdigest()[:24]
    target = cache_dir / "tokenizers" / key
    say = log or (lambda message: print(message, file=sys.stderr))
    try:
        if os.path.lexists(target):
            try:
                return finish_tokenizer(AutoTokenizer.from_pretrained(target))
            except Exception as exc:  # a damaged entry (a crash, a full disk, a hand edit): learn it again
                say(f"warning: the cached tokenizer {target} is unreadable ({short(exc)}); learning it again")
                discard(target)
        write_entry(target, lambda tmp: _learn_tokenizer(texts, vocab_size, size).save_pretrained(tmp))
    except OSError as exc:
        raise write_error(target.parent, exc, "the tokenizer cache", "--cache-dir") from None
    return finish_tokenizer(AutoTokenizer.from_pretrained(target))


def _learn_tokenizer(texts: Iterable[str], vocab_size: int, size: int):
    """Byte-level BPE learned from `texts`, each run of non-space cut to reading.LEARN_RUN_CHARS first:
    the learner's time grows worse than quadratically with a word's length."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from finetune.reading import bounded_runs
    from finetune.tokenizing import PROGRESS_MIN_BYTES, progress_bar

    def counted(items):  # the learner pulls texts as it counts their words: this bar follows it
        with progress_bar(size, "learning the tokenizer", size) as bar:
            for text in items:
                bar.update(min(len(text), bar.total - bar.n))
                yield text

    bpe = ByteLevelBPETokenizer()
    # show_progress: the learner's own bars (on a terminal) for the merges that follow the counting
    bpe.train_from_iterator(
        counted(bounded_runs(texts)),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        show_progress=size >= PROGRESS_MIN_BYTES,
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def tokenizer_from_data(cfg: RunConfig, files: list[Path]) -> PreTrainedTokenizerBase:
    """The from-scratch preset's tokenizer, learned from this run's data and cached by everything that
    decides the texts it learns from (contents, each file's format, encoding, text field...)."""
    import json

    from finetune.cache_keys import documents_key
    from finetune.config import cache_root
    from finetune.data_files import data_bytes
    from finetune.documents import training_texts

    key = documents_key(files, cfg.data)
    return train_scratch_tokenizer(
        cfg.model.name,
        training_texts(files, cfg.data),
        json.dumps(key, sort_keys=True),
        cache_root(cfg.data.cache_dir),
        size=data_bytes(files),
    )
