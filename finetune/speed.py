"""MFU arithmetic: the FLOPs of a training step per token and the peak FLOP/s of a device."""

from __future__ import annotations

from typing import Optional

# Dense bf16 peak FLOP/s per device, for MFU (nanoGPT's convention).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def flops_per_token(model, seq_len: int) -> float:
    """nanoGPT's estimate: 6N + 12·L·H·Q·T for a forward and backward pass, per token."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n_params = sum(p.numel() for p in model.parameters())
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 6 * n_params + 12 * layers * heads * head_dim * seq_len


def peak_flops(device_name: str) -> Optional[float]:
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None
