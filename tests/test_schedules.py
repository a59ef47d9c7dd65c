"""The learning-rate schedules (schedules.py) equal transformers' own."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "name,hf_name", [("cosine", "cosine"), ("linear", "linear"), ("constant", "constant_with_warmup")]
)
def test_lr_schedules_equal_transformers_get_scheduler(name, hf_name):
    import torch
    from transformers import get_scheduler

    from finetune.schedules import scheduler_from

    def lrs(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler = make(optimizer)
        values = []
        for _ in range(40):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    segment = {"name": name, "start": 0, "end": 33, "warmup_steps": 7}  # 40 > 33: past the end too
    ours = lrs(lambda opt: scheduler_from(opt, segment, 0.5, 0))
    theirs = lrs(lambda opt: get_scheduler(hf_name, opt, num_warmup_steps=7, num_training_steps=33))
    assert ours == pytest.approx(theirs, abs=1e-12)
