"""`finetune prepare` directories: a token cache entry copied out with its tokenizer and a manifest.

Prepared on one machine, trained on another: `finetune train DIR` checks the directory whole, and
that it was tokenized by this run's tokenizer and block size, before it trains on it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from finetune.cache_entry import PreparedData, announce, read_entry
from finetune.cache_keys import tokenizer_digest
from finetune.errors import FinetuneError
from finetune.files import read_json, reading, require_regular_file
from finetune.supervised import ensure_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PREPARED_MANIFEST = "finetune_prepared.json"  # marks a `finetune prepare` output directory
PREPARED_CONTENTS = ("meta.json", "tokens.bin", "train_index.npy")  # what `finetune prepare` writes beside its manifest
PREPARED_FILE = "prepared data file"
PREPARED_FIX = "prepare the data again with `finetune prepare`"


def is_prepared_dir(path: Path) -> bool:
    """A `finetune prepare` output, whole or damaged (its manifest lost): never read as a folder of data files."""
    if not path.is_dir():
        return False
    manifest = path / PREPARED_MANIFEST
    return manifest.exists() or manifest.is_symlink() or all((path / name).exists() for name in PREPARED_CONTENTS)


def write_prepared(prepared: PreparedData, tokenizer: PreTrainedTokenizerBase, tmp: Path, model_name: str) -> None:
    """Fill `tmp` (from output_dirs.start_output_dir) with the cache and tokenizer `finetune train DIR` reads."""
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
    read_entry(directory, PREPARED_FILE, PREPARED_FIX)
    tokenizer_dir = directory / "tokenizer"
    config = tokenizer_dir / "tokenizer_config.json"
    read_json(config, PREPARED_FILE, PREPARED_FIX)
    spec = tokenizer_dir / "tokenizer.json"
    if spec.exists():
        from tokenizers import Tokenizer

        with reading(spec, PREPARED_FILE, PREPARED_FIX):
            require_regular_file(spec, PREPARED_FILE)
            Tokenizer.from_file(str(spec))


def load_prepared(
    directory: Path, tokenizer: PreTrainedTokenizerBase, block_size: Optional[int], log: Callable[[str], None] = print
) -> PreparedData:
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
    meta, train, val = read_entry(directory, PREPARED_FILE, PREPARED_FIX)
    _require_known_ids(directory, meta, len(tokenizer))
    prepared = announce(directory, meta, train, val, from_cache=True, log=log)
    if prepared.chat:
        ensure_chat_template(tokenizer)
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
