"""Batched CPU decoding: every weight of the torch serving backend also kept in oneDNN's packed layout.

A batch-16 decode step of GPT-2 124M on 2 cores spends about 80% of its time in matrix products by
the weights, which torch's default CPU GEMM runs at 90-140 GFLOP/s at 16 rows. The same fp32 product
through oneDNN, on a weight reordered once into its blocked layout (what torch.compile's freezing
pass does on CPU), is 1.3-1.4x faster there (the 50,257-wide output layer: 13.1 -> 9.3 ms), but 10-20%
slower for a single row, where a step only streams the weights from memory. So each layer keeps
both: one row goes through the plain weight, as `finetune generate` does (serving one request is as
fast as generating), and several through the packed copy. The cost is a second copy of the weights in
memory, paid by the torch serving backend on CPU only (ONNX serving and GPUs do not need it), and
only when it fits in half the memory available at load; otherwise batches use the plain weights.

Both paths are fp32 with fp32 accumulation; they differ from each other in rounding only (about
1e-6 on GPT-2's logits), as torch's own GEMM already does between batch sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Below this many rows a product goes through the plain weight (see the module docstring).
PACKED_MIN_ROWS = 2
# oneDNN picks the packed layout for a typical number of rows; 16 (a full CPU batch) measured
# 1.27x at 16 rows and 1.33x at 4, against 1.03x and 1.2x for a layout packed for 32 rows.
PACKED_FOR_ROWS = 16


def available() -> bool:
    """torch's oneDNN linear ops are present (they are in torch's CPU builds, under torch.ops.mkldnn)."""
    import torch

    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4), PACKED_FOR_ROWS)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), weight, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def _packed_linear_class():
    import torch

    class PackedLinear(torch.nn.Module):
        """The wrapped layer for one row; its weight, packed by oneDNN, for several."""

        def __init__(self, plain: torch.nn.Module, weight: torch.Tensor, bias):
            super().__init__()
            self.plain = plain
            self.out_features = weight.shape[0]
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACKED_FOR_ROWS)
            self.packed_bias = None if bias is None else bias.detach()

        @property
        def weight(self) -> torch.Tensor:  # for model code that reads a layer's weight (dtype, device, shape)
            return self.plain.weight

        @property
        def bias(self):
            return self.plain.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, x.shape[-1])
            if rows.shape[0] < PACKED_MIN_ROWS:
                return self.plain(x)
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.packed_bias, "none", [], "")
            return out.reshape(*x.shape[:-1], self.out_features)

    return PackedLinear


def _available_memory() -> int | None:
    """Bytes the OS can hand out now: MemAvailable on Linux (free pages plus reclaimable cache), else free pages."""
    import os

    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every OS reports it
        return None


def fits_in_memory(model: torch.nn.Module) -> bool:
    """A second copy of the model's weights fits in half the memory available now (unknown: assume it does)."""
    available = _available_memory()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return available is None or 2 * weights < available


def worth_packing(model: torch.nn.Module) -> bool:
    """On CPU, with torch's oneDNN ops, and room for the second copy."""
    return next(model.parameters()).device.type == "cpu" and available() and fits_in_memory(model)


def pack_weights(model: torch.nn.Module) -> int:
    """Wrap every fp32 nn.Linear and GPT-2 Conv1D of a CPU inference model; returns how many were wrapped."""
    import torch
    from transformers.pytorch_utils import Conv1D

    packed_linear = _packed_linear_class()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                weight = child.weight  # (out, in)
            elif type(child) is Conv1D:
                weight = child.weight.t()  # Conv1D stores (in, out)
            else:
                continue
            if weight.dtype != torch.float32 or weight.device.type != "cpu":
                continue
            setattr(parent, name, packed_linear(child, weight, child.bias))
            count += 1
    return count
