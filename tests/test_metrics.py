"""The MFU arithmetic (metrics.py): FLOPs per token and the peak FLOP/s of a device."""

from __future__ import annotations


def test_flops_and_mfu_helpers(gpt2_dir):
    from transformers import AutoModelForCausalLM

    from finetune.metrics import flops_per_token, peak_flops

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    n = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, 128) == 6 * n + 12 * 2 * 2 * 32 * 128
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("cpu") is None
