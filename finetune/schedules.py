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


def lr_schedule(optimizer, name: str, warmup_steps: int, total_steps: int):
    """A LambdaLR stepped once per optimizer step (its state_dict resumes like any scheduler's)."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, partial(SCHEDULES[name], warmup=warmup_steps, total=total_steps))
