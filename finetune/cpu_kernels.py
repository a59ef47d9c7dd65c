"""Fast paths for training on a CPU: the same model and arithmetic, cheaper kernels.

A profile of the tiny preset on a 2-core CPU puts half of every step outside the matrix products:
GPT-2's GELU written as eight separate tensor operations, dropout masks drawn one random number
per element from a single-threaded generator, attention that falls back to its slowest form when
dropout is on, and the kernel zeroing fresh pages for every large tensor the allocator returns.
Each fix below keeps the model's function: GELU is the same tanh formula in one kernel, dropout
drops each element with probability p (to 1/65536) and scales by 1/(1-p), attention is the textbook
softmax(QK^T/sqrt(d))V with that dropout. On by default without CUDA (TrainConfig.cpu_kernels;
--no-cpu-kernels turns them off); on a GPU, dropout and GELU are already fast and torch.compile
fuses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.architectures import architecture

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTENTION_NAME = "finetune_cpu"
_MALLOC_TUNED = False


def dropout_keep_mask(shape, p: float, device):
    """True where an element is kept, each with probability 1 - p (p rounded to 1/65536).

    torch's CPU dropout draws one 32-bit number per element; one 64-bit draw here gives four
    16-bit numbers, about 5x faster. Draws come from torch's default generator, so seeding and
    the checkpointed RNG state (exact resume, activation recomputation) work unchanged.
    """
    import torch

    count = 1
    for size in shape:
        count *= size
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    return words.view(torch.int16)[:count].view(shape) >= round(p * 65536) - 2**15


def _dropout(x, p: float):
    return x * dropout_keep_mask(x.shape, p, x.device) * (1.0 / (1.0 - p))


def _fast_dropout_class():
    import torch

    class FastDropout(torch.nn.Module):
        """nn.Dropout with dropout_keep_mask's cheaper random numbers."""

        def __init__(self, p: float):
            super().__init__()
            self.p = p

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            return _dropout(x, self.p)

    return FastDropout


def attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """transformers' attention interface: SDPA without dropout; with it, SDPA's math path in
    fewer passes and with the cheaper dropout mask (SDPA's fused kernels take no dropout on CPU)."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if dropout == 0.0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    lowest = torch.finfo(scores.dtype).min  # not -inf: a fully masked (padding) row stays finite
    if attention_mask is None:
        q_len, kv_len = query.shape[-2], key.shape[-2]
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        scores = scores.masked_fill(~allowed, lowest)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, lowest)
    else:
        scores = scores + attention_mask
    probs = _dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the masks SDPA gets


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel after every step.

    By default each large tensor is a fresh mmap that the kernel zero-fills page by page (about a
    million page faults per 20 steps of the tiny preset); with these limits the same pages are
    reused. Freed memory stays with the process until it exits. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _MALLOC_TUNED = bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, (1 << 31) - 1))
    return _MALLOC_TUNED


def apply(model: PreTrainedModel) -> list[str]:
    """Swap in the fast kernels (no parameters change); returns what was swapped, for the log."""
    import torch
    from transformers.activations import NewGELUActivation

    FastDropout = _fast_dropout_class()
    swapped = set()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, NewGELUActivation):
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))  # the same formula, one kernel
                swapped.add("GELU")
            elif type(child) is torch.nn.Dropout and child.p > 0:
                setattr(parent, name, FastDropout(child.p))
                swapped.add("dropout")
    config = getattr(model, "config", None)
    if (
        config is not None
        and architecture(getattr(config, "model_type", None)).cpu_attention
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and any(getattr(config, key, 0) for key in ("attn_pdrop", "attention_dropout"))
    ):
        _register_attention()
        model.set_attn_implementation(ATTENTION_NAME)
        swapped.add("attention")
    if tune_allocator():
        swapped.add("allocator")
    return sorted(swapped)
