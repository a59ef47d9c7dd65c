"""Make an exported decoder fast on ONNX Runtime: fusable modules before export, fused operators after.

The plain dynamo graph of GPT-2 124M has about 660 nodes per step, 160 of them Reshape and 60
Transpose around the attention and the KV cache; at batch 1 on a CPU that per-node overhead is
half of an int8 decode step. onnxscript's ONNX Runtime fusions (`optimize_for_ort`) rewrite the
graph into ONNX Runtime's contrib operators (MultiHeadAttention with the KV cache inside,
SkipLayerNormalization, FastGelu, RotaryEmbedding, ...): 175 nodes. The fused graph needs ONNX
Runtime (any language binding); `--no-optimize` keeps standard ONNX operators only.

int8 weights (fused graph or not) are onnx_quantize.py's.
"""

from __future__ import annotations

import shutil
import types
from pathlib import Path


def _matmul_add(self, x):
    import torch

    return torch.matmul(x, self.weight) + self.bias


def prepare_model(model) -> None:
    """Swap modules for equivalents whose exported form the fusions recognise (no weight changes).

    GPT-2's Conv1D flattens its input to 2-D for addmm, which exports as Reshape-Gemm-Reshape: the
    attention pattern then does not match, and onnxscript's attention fusion leaves a 3-D input on
    the Gemm that ONNX Runtime rejects. matmul + add on the 3-D input is the same arithmetic.
    GPT-2's GELU (eight tensor operations) becomes torch's tanh GELU, the same formula, which the
    fusions turn into FastGelu.
    """
    import torch
    from transformers.activations import NewGELUActivation
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                child.forward = types.MethodType(_matmul_add, child)
            elif isinstance(child, NewGELUActivation):
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))


def save(model, path: Path, external: bool) -> None:
    import onnx_ir as ir

    ir.save(model, str(path), external_data=path.name + ".data" if external else None)


def fuse(source: Path, target: Path, external: bool) -> dict[str, int]:
    """Write `source` with ONNX Runtime's fused operators to `target`; returns the fusions applied.

    Raises if the fusions fail, match nothing, or give a graph ONNX Runtime cannot load, so the
    caller can keep the plain graph instead.
    """
    import onnx_ir as ir
    import onnxruntime as ort
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(ir.load(str(source)))
    counts = {name: count for name, count in counts.items() if count}
    if not counts:  # nothing to gain, and the standard graph stays portable
        raise ValueError("no fusion pattern matched this architecture")
    save(model, target, external)
    del model
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the load is a check; its shape-merge warnings are noise here
    ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
    return counts


def move_graph(source: Path, directory: Path) -> None:
    """Move model.onnx and its external data file (named relative to the graph) into `directory`."""
    for path in source.parent.glob(source.name + "*"):
        shutil.move(str(path), str(directory / path.name))
