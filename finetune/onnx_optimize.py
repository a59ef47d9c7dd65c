"""Make an exported decoder fast on ONNX Runtime: fusable modules before export, fused operators after.

The plain dynamo graph of GPT-2 124M has about 660 nodes per step, 160 of them Reshape and 60
Transpose around the attention and the KV cache; at batch 1 on a CPU that per-node overhead is
half of an int8 decode step. onnxscript's ONNX Runtime fusions (`optimize_for_ort`) rewrite the
graph into ONNX Runtime's contrib operators (MultiHeadAttention with the KV cache inside,
SkipLayerNormalization, FastGelu, RotaryEmbedding, ...): 175 nodes. The fused graph needs ONNX
Runtime (any language binding); `--no-optimize` keeps standard ONNX operators only.

Then, for fp32 decoders with plain causal attention, each MultiHeadAttention becomes ONNX Runtime's
GroupQueryAttention, whose KV cache is written in place (onnx_kv_cache.py explains the gain): the graph
takes seqlens_k and total_sequence_length instead of attention_mask, and its manifest says
"kv_cache": "shared". Such a graph also takes logits_positions, the positions of each row whose logits
it computes: a prompt's last token only, where that is all a caller needs (the output layer over every
prompt position was most of a prefill's time at 16 prompts).

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


def replace_value(old, new) -> None:
    """`new` takes `old`'s place in the graph: its uses, its graph-output slot, its name, type and shape."""
    import onnx_ir as ir

    name, old.name = old.name, None  # names are unique in a graph: free it first
    new.name, new.type, new.shape = name, old.type, old.shape
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)


def fuse(source: Path, target: Path, external: bool, shared_kv: bool = False) -> dict[str, int]:
    """Write `source` with ONNX Runtime's fused operators to `target`; returns the fusions applied.

    shared_kv: also turn the attention into GroupQueryAttention where every attention node allows it
    (counted as "GroupQueryAttention"). Raises if the fusions fail, match nothing, or give a graph ONNX
    Runtime cannot load, so the caller can keep the plain graph instead.
    """
    import onnx_ir as ir
    import onnxruntime as ort
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(ir.load(str(source)))
    counts = {name: count for name, count in counts.items() if count}
    if not counts:  # nothing to gain, and the standard graph stays portable
        raise ValueError("no fusion pattern matched this architecture")
    if shared_kv:
        rewritten = share_kv_cache(model)
        if rewritten:
            counts["GroupQueryAttention"] = rewritten
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


MASK_INPUT = "attention_mask"
ATTENTION_BIAS = 5  # MultiHeadAttention's input index of the additive mask made from attention_mask


def _mask_feeds_only_attention(graph, mask) -> bool:
    """Everything computed from attention_mask ends as an attention bias (not a graph output): causal and
    padding masking, which GroupQueryAttention does from seqlens_k itself."""
    outputs = {id(value) for value in graph.outputs}
    frontier, seen = [mask], set()
    while frontier:
        value = frontier.pop()
        if id(value) in outputs:
            return False
        for node, index in value.uses():
            if node.op_type == "MultiHeadAttention":
                if index != ATTENTION_BIAS:
                    return False
            elif id(node) not in seen:
                seen.add(id(node))
                frontier.extend(node.outputs)
    return True


def _graph_inputs_upstream(value) -> set:
    """The names of the graph inputs whose values `value` is computed from (constants, initializers and
    inputs read only for their shape aside)."""
    names, frontier, seen = set(), [value], set()
    while frontier:
        current = frontier.pop()
        producer = current.producer()
        if producer is None:
            if current.const_value is None and not current.is_initializer():
                names.add(current.name)
        elif id(producer) not in seen and producer.op_type not in ("Shape", "Size"):
            seen.add(id(producer))
            frontier.extend(v for v in producer.inputs if v is not None)
    return names


def _attention_fits(node, graph_inputs: set, graph_outputs: set) -> bool:
    """A self-attention node with the past from graph inputs and the present to graph outputs, no projection
    bias, 3-D query/key/value, and an attention bias made from attention_mask alone (causal and padding
    masking: a bias from anything else, such as positions, would be lost in GroupQueryAttention)."""
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    return (
        node.domain == "com.microsoft"
        and len(node.inputs) == 8
        and all(inputs[i] is not None for i in (0, 1, 2, 5, 6, 7))
        and all(v.shape is None or len(v.shape) == 3 for v in inputs[:3])
        and _graph_inputs_upstream(inputs[ATTENTION_BIAS]) == {MASK_INPUT}
        and inputs[3] is None  # projection bias
        and inputs[4] is None  # key padding mask
        and id(inputs[6]) in graph_inputs
        and id(inputs[7]) in graph_inputs
        and len(node.outputs) == 3
        and all(id(value) in graph_outputs for value in node.outputs[1:])
        and set(node.attributes) <= {"num_heads", "scale", "mask_filter_value", "unidirectional"}
    )


OUTPUT_LAYERS = ("MatMul", "FusedMatMul", "Gemm")


def share_kv_cache(model) -> int:
    """Replace every MultiHeadAttention by GroupQueryAttention on the same past/present names, and feed the
    output layer only the rows of logits_positions; returns how many attention nodes, 0 (and the graph
    unchanged) unless every attention node, the mask's uses and the output layer allow it."""
    import numpy as np
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = model.graph
    attention = [node for node in graph if node.op_type == "MultiHeadAttention"]
    mask = next((value for value in graph.inputs if value.name == MASK_INPUT), None)
    logits = next((value for value in graph.outputs if value.name == "logits"), None)
    head = logits.producer() if logits is not None else None
    graph_inputs = {id(value) for value in graph.inputs}
    graph_outputs = {id(value) for value in graph.outputs}
    if (
        not attention
        or mask is None
        or head is None
        or head.op_type not in OUTPUT_LAYERS
        or not all(_attention_fits(node, graph_inputs, graph_outputs) for node in attention)
        or not _mask_feeds_only_attention(graph, mask)
    ):
        return 0
    batch = mask.shape[0] if mask.shape is not None else None
    seqlens = ir.Value(name="seqlens_k", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([batch]))
    total = ir.Value(name="total_sequence_length", type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([]))
    for node in attention:
        heads = node.attributes["num_heads"].value
        attributes = [ir.AttrInt64("num_heads", heads), ir.AttrInt64("kv_num_heads", heads)]
        if "scale" in node.attributes:
            attributes.append(ir.AttrFloat32("scale", node.attributes["scale"].value))
        q, k, v = node.inputs[:3]
        past_key, past_value = node.inputs[6:8]
        replacement = ir.Node(
            "com.microsoft",
            "GroupQueryAttention",
            [q, k, v, past_key, past_value, seqlens, total],
            attributes,
            num_outputs=3,
            name=(node.name or "attention") + "_gqa",
        )
        graph.insert_before(node, replacement)
        for old, new in zip(node.outputs, replacement.outputs):
            replace_value(old, new)
        graph.remove(node, safe=True)
    # hidden (batch, sequence, width) -> the rows at logits_positions (batch, outputs, width) -> output layer
    picks = ir.Value(name="logits_positions", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch, "outputs"]))
    last_axis = ir.Value(name="logits_positions_axis", const_value=ir.tensor(np.array([-1], np.int64)))
    graph.register_initializer(last_axis)
    as_index = ir.Node("", "Unsqueeze", [picks, last_axis])
    gathered = ir.Node("", "GatherND", [head.inputs[0], as_index.outputs[0]], [ir.AttrInt64("batch_dims", 1)])
    graph.insert_before(head, [as_index, gathered])
    head.replace_input_with(0, gathered.outputs[0])
    RemoveUnusedNodesPass()(model)
    graph.inputs.remove(mask)
    names = [value.name for value in graph.inputs]  # the manifest's order: ids, positions, then these
    position = names.index("position_ids") + 1 if "position_ids" in names else len(names)
    for value in (picks, total, seqlens):
        graph.inputs.insert(position, value)
    return len(attention)
