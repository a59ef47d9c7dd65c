"""What training measures: metrics.jsonl (append, read, cut back on resume), peak memory, FLOPs and MFU.

metrics.jsonl holds one JSON object per line: a training record every --log-every steps and a
validation record every --eval-every steps, each with its "step". A run that validates also records,
at step 0, the validation loss of the model before any update, under keys of its own (INITIAL_VAL_LOSS),
so the validation records remain those of the --eval-every cadence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from finetune import files

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FILE_NAME = "metrics.jsonl"
_WHAT = "metrics file"
_FIX = "delete its damaged lines, or the file"
INITIAL_VAL_LOSS = "initial_val_loss"  # step 0: the validation loss before training
INITIAL_VAL_PERPLEXITY = "initial_val_perplexity"


def append(path: Path, record: dict) -> None:
    files.append_line(path, json.dumps(record), _WHAT)


def read(path: Path) -> list[dict]:
    """The file's records; a damaged line other than a torn last one names itself."""
    return files.read_jsonl(path, _WHAT, _FIX)


def initial_val_loss(path: Path) -> Optional[float]:
    """The validation loss recorded before the first update (the "before" of before/after), if any."""
    if not path.is_file():
        return None
    for record in read(path):
        value = record.get(INITIAL_VAL_LOSS)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def records_until(path: Path, step: int) -> Optional[list[dict]]:
    """metrics.jsonl's records up to `step` (later steps are trained again), or None when nothing is to drop.

    A last line cut short by a crash is dropped (files.read_jsonl), never an error.
    """
    if not path.exists():
        return None
    text = files.read_text(path, _WHAT, _FIX)
    records = read(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    whole = len(kept) == len([line for line in text.splitlines() if line.strip()]) and text.endswith("\n")
    return None if whole else kept


def rewrite(path: Path, records: list[dict]) -> None:
    files.write_atomic(path, "".join(json.dumps(r) + "\n" for r in records), _WHAT)


def current_rss() -> int:
    import resource

    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_bytes(baseline_rss: int) -> int:
    """Peak memory used by training: CUDA allocations, or on CPU the peak RSS above the pre-model baseline."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss)


# Dense bf16 peak FLOP/s by device name, for MFU (vendor data sheets, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """nanoGPT's estimate: 6N + 12·L·H·Q·T for a forward and backward pass, per token."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n_params = sum(p.numel() for p in model.parameters())
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 6 * n_params + 12 * layers * heads * head_dim * seq_len


def peak_flops(device_name: str) -> Optional[float]:
    """The device's dense bf16 peak FLOP/s, for MFU; None for a device not in the table (and CPUs)."""
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None
