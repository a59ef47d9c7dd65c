"""Learning-rate schedules: linear warmup, then cosine decay, linear decay or constant.

The same multipliers as transformers' get_scheduler (tests compare them step by step), written here
because importing transformers.optimization pulls in transformers.trainer_utils, which imports peft
when it is installed: about 2.5 s of start-up on every run for three one-line formulas.
"""

from __future__ import annotations

import math
from functools import partial


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _constant(step: int, warmup: int, total: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def warmup_length(warmup: float, steps: int) -> int:
    """--warmup: a fraction of `steps` if < 1, else a step count."""
    return int(warmup * steps) if warmup < 1 else int(warmup)


def segment(name: str, warmup: float, start: int, end: int) -> dict:
    """The schedule of steps start+1..end: warmup from `start`, then decay to `end` (saved in state.json).

    A run has one segment from step 0; extending a finished run adds a fresh one over the added steps.
    """
    return {"name": name, "start": start, "end": end, "warmup_steps": warmup_length(warmup, end - start)}


def is_segment(value) -> bool:
    """Whether a value read back from state.json is a segment() (an older or damaged file may lack it)."""
    return (
        isinstance(value, dict)
        and value.get("name") in SCHEDULES
        and all(isinstance(value.get(key), int) for key in ("start", "end", "warmup_steps"))
    )


def multiplier(seg: dict, step: int) -> float:
    """The LR at absolute optimizer step `step`, as a fraction of the peak LR."""
    return SCHEDULES[seg["name"]](step - seg["start"], warmup=seg["warmup_steps"], total=seg["end"] - seg["start"])


def _shifted(seg: dict, offset: int, k: int) -> float:
    return multiplier(seg, offset + k)


def scheduler_from(optimizer, seg: dict, peak_lr: float, step: int):
    """A LambdaLR at `step` of `seg` with the peak LR `peak_lr`, whatever the optimizer held before.

    Built fresh on resume instead of loading the saved scheduler, so a changed --lr, --warmup,
    --schedule or --steps drives the rest of the run; with none changed it gives the same LR at
    every step as the uninterrupted run (the same formula at the same absolute step).
    """
    from torch.optim.lr_scheduler import LambdaLR

    for group in optimizer.param_groups:  # a restored optimizer holds the LR it was saved with
        group["lr"] = group["initial_lr"] = peak_lr
    return LambdaLR(optimizer, partial(_shifted, seg, step))
