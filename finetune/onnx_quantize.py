"""int8 weights for an exported decoder, in standard ONNX operators, with each row of a batch on its own.

Every MatMul (and Gemm, and ONNX Runtime's FusedMatMul) with a constant weight becomes

    scale = max|x| / 127 over each row's last axis          (Abs, ReduceMax, Mul, Max)
    q     = round(x / scale) + 128 as uint8                  (Div, QuantizeLinear with scale 1, zero point 128)
    y     = MatMulInteger(q, W8, 128) * scale * column_scale (Cast, Mul, Mul)

with W8 the weight in int8, one scale per output column. Why this form:

- One activation scale per row, not per tensor: a row's logits do not depend on which other requests
  share its batch, so served greedy output is the same alone or batched (quantize_dynamic's one scale
  per tensor, and MatMulNBits' packing by batch size, both change a row's numbers with its batch).
- MatMulInteger on uint8 x int8 is ONNX Runtime's fastest CPU integer GEMM (AMX or VNNI where the CPU
  has them). Measured on GPT-2 124M, 2 cores (AMX): a batch-16 decode step 18 ms against 25 ms with
  MatMulNBits (8 bits, blocks of 128, accuracy level 4); batch 1 the same (7 ms, memory-bound).
- Weights use 7 bits (-63..63): CPUs without VNNI multiply uint8 by int8 in pairs summed into int16
  (VPMADDUBSW), which saturates when both are near their full range; 255 x 63 x 2 stays inside it.
  This is ONNX Runtime's own advice for such CPUs (reduce_range), and the export is meant to run on
  any of them.
- Standard operators only: the same quantizer serves fused and `--no-optimize` graphs.
- QuantizeLinear with a constant scale of 1 after the division does Round, Add and Cast in one node,
  with the same numbers (both round half to even): a decode step 4-10% faster at batch 1 and 16.

Embedding tables become int8 rows times a per-row scale (quantize_embeddings).
"""

from __future__ import annotations

from pathlib import Path

WEIGHT_LEVELS = 63  # 7-bit symmetric weights: see the module docstring
ACTIVATION_LEVELS = 127  # symmetric around the uint8 zero point 128
ACTIVATION_ZERO = 128
DESCRIPTION = (
    "int8 (MatMulInteger): weights in 7 bits with one scale per output column, activations quantized to "
    "int8 at run time with one scale per row; embeddings as int8 rows"
)
# The words that say a row's numbers do not depend on its batch (read back by the serving backend).
ROW_ACTIVATIONS = "one scale per row"


def batch_invariant(description: str | None) -> bool:
    """Whether an export quantized as `description` (its manifest's "quantization") computes each row alone.

    Float exports do; earlier int8 exports (one activation scale per tensor, or MatMulNBits) do not."""
    return description is None or ROW_ACTIVATIONS in description


def quantize_int8(source: Path, target: Path, external: bool) -> None:
    """Write `source` with int8 matrix products and embedding tables to `target`."""
    import onnx_ir as ir

    from finetune.onnx_optimize import save

    model = ir.load(str(source))
    _RowQuantizer(model.graph, model.opset_imports.get("", 18)).run()
    quantize_embeddings(model.graph)
    save(model, target, external)


def _attr(node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _weight_of(node):
    """(weight value, transposed?) when `node` is a matrix product by a constant 2-D float weight that the
    rewrite keeps exact: no alpha/beta scaling, no transposed input."""
    import numpy as np

    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        transposed = False
    elif node.op_type == "Gemm" and node.domain in ("", "ai.onnx"):
        if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0 or _attr(node, "transA", 0):
            return None
        transposed = bool(_attr(node, "transB", 0))
    elif node.op_type == "FusedMatMul" and node.domain == "com.microsoft":
        if _attr(node, "alpha", 1.0) != 1.0 or any(
            _attr(node, name, 0) for name in ("transA", "transBatchA", "transBatchB")
        ):
            return None
        transposed = bool(_attr(node, "transB", 0))
    else:
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or not weight.is_initializer() or weight.is_graph_input():
        return None  # a graph input may be fed another value at run time
    array = weight.const_value.numpy()
    if array.ndim != 2 or array.dtype != np.float32:
        return None
    return weight, transposed


class _RowQuantizer:
    """Rewrites one graph's matrix products; an input read by several products is quantized once."""

    def __init__(self, graph, opset: int):
        import numpy as np

        self.graph = graph
        self.axes_as_input = opset >= 18  # ReduceMax took `axes` as an attribute before opset 18
        self.rows: dict = {}  # input value -> (uint8 rows, row scales)
        self.weights: dict = {}  # (weight value, transposed) -> (int8 weight, column scales): one copy per weight
        self.count = 0
        self.inv_levels = self._constant("int8_rows_inv_levels", np.array(1 / ACTIVATION_LEVELS, np.float32))
        self.tiny = self._constant("int8_rows_tiny", np.array(1e-12, np.float32))  # an all-zero row
        self.one = self._constant("int8_rows_one", np.array(1.0, np.float32))
        self.zero = self._constant("int8_rows_zero", np.array(ACTIVATION_ZERO, np.uint8))
        self.last_axis = self._constant("int8_rows_last_axis", np.array([-1], np.int64)) if self.axes_as_input else None

    def _constant(self, name: str, array):
        import onnx_ir as ir

        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    @staticmethod
    def _op(added: list, op_type: str, inputs: list, *attrs):
        """A new standard-domain node (collected in `added`, inserted by the caller); its output."""
        import onnx_ir as ir

        node = ir.Node("", op_type, inputs, list(attrs))
        added.append(node)
        return node.outputs[0]

    def run(self) -> None:
        for node in list(self.graph):
            found = _weight_of(node)
            if found is not None:
                self._rewrite(node, *found)
        for name in [name for name in self.graph.initializers if name.startswith("int8_rows_")]:
            if not self.graph.initializers[name].uses():  # a graph with nothing to rewrite
                self.graph.initializers.pop(name)

    def _quantized_rows(self, x, added: list):
        """uint8 rows of `x` and their scales, built once per input value."""
        import onnx_ir as ir

        if x not in self.rows:

            def op(op_type, inputs, *attrs):
                return self._op(added, op_type, inputs, *attrs)

            magnitude = op("Abs", [x])
            if self.axes_as_input:
                peak = op("ReduceMax", [magnitude, self.last_axis], ir.AttrInt64("keepdims", 1))
            else:
                peak = op("ReduceMax", [magnitude], ir.AttrInt64s("axes", [-1]), ir.AttrInt64("keepdims", 1))
            scale = op("Max", [op("Mul", [peak, self.inv_levels]), self.tiny])
            # |x| / scale <= 127 by the choice of scale: rounded and shifted by 128, it fits uint8 unclipped.
            rows = op("QuantizeLinear", [op("Div", [x, scale]), self.one, self.zero])
            self.rows[x] = (rows, scale)
        return self.rows[x]

    def _int8_weight(self, weight, transposed: bool):
        """The weight as (in, out) int8 levels and a float scale per output column, made once per weight."""
        import numpy as np

        if (weight, transposed) not in self.weights:
            matrix = weight.const_value.numpy()
            matrix = np.ascontiguousarray(matrix.T if transposed else matrix)  # (in, out)
            column_scale = np.abs(matrix).max(axis=0) / WEIGHT_LEVELS
            column_scale[column_scale == 0] = 1
            levels = np.clip(np.rint(matrix / column_scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
            self.count += 1
            self.weights[weight, transposed] = (
                self._constant(f"{weight.name}_int8_{self.count}", levels),
                self._constant(f"{weight.name}_scale_{self.count}", column_scale.astype(np.float32)),
            )
        return self.weights[weight, transposed]

    def _rewrite(self, node, weight, transposed: bool) -> None:
        import onnx_ir as ir

        from finetune.onnx_optimize import replace_value

        w8, w_scale = self._int8_weight(weight, transposed)

        added: list = []
        rows, row_scale = self._quantized_rows(node.inputs[0], added)

        def op(op_type, inputs, *attrs):
            return self._op(added, op_type, inputs, *attrs)

        product = op("MatMulInteger", [rows, w8, self.zero])
        as_float = op("Cast", [product], ir.AttrInt64("to", ir.DataType.FLOAT))
        result = op("Mul", [op("Mul", [as_float, row_scale]), w_scale])
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            result = op("Add", [result, node.inputs[2]])
        self.graph.insert_before(node, added)
        replace_value(node.outputs[0], result)  # a graph output (the logits) keeps its name, type and shape
        self.graph.remove(node, safe=True)
        if not weight.uses():
            self.graph.initializers.pop(weight.name)


def quantize_embeddings(graph) -> None:
    """Replace Gather(float table, ids) by int8 rows times a per-row scale.

    Gather(int8 table) -> Cast -> Mul(Gather(scales)) is four standard operators on the few rows a
    step looks up, instead of keeping GPT-2's 154 MB token table in fp32.
    """
    import numpy as np
    import onnx_ir as ir

    for node in list(graph):
        table = node.inputs[0] if node.op_type == "Gather" and node.domain in ("", "ai.onnx") else None
        if table is None or table.const_value is None or not table.is_initializer():
            continue
        axis = node.attributes.get("axis")
        weights = table.const_value.numpy()
        if weights.ndim != 2 or weights.dtype != np.float32 or (axis is not None and axis.as_int() != 0):
            continue
        scales = np.abs(weights).max(axis=1, keepdims=True) / 127
        scales[scales == 0] = 1
        rows = np.clip(np.rint(weights / scales), -127, 127).astype(np.int8)
        int8_table = ir.Value(name=f"{table.name}_int8", const_value=ir.tensor(rows, name=f"{table.name}_int8"))
        scale_table = ir.Value(
            name=f"{table.name}_scales", const_value=ir.tensor(scales.astype(np.float32), name=f"{table.name}_scales")
        )
        graph.register_initializer(int8_table)
        graph.register_initializer(scale_table)
        ids = node.inputs[1]
        picked = ir.Node("", "Gather", [int8_table, ids], [ir.AttrInt64("axis", 0)])
        as_float = ir.Node("", "Cast", picked.outputs, [ir.AttrInt64("to", ir.DataType.FLOAT)])
        picked_scales = ir.Node("", "Gather", [scale_table, ids], [ir.AttrInt64("axis", 0)])
        scaled = ir.Node("", "Mul", [as_float.outputs[0], picked_scales.outputs[0]])
        graph.insert_before(node, [picked, as_float, picked_scales, scaled])
        ir.convenience.replace_all_uses_with(node.outputs[0], scaled.outputs[0])
        graph.remove(node, safe=True)
        if not table.uses():
            graph.initializers.pop(table.name)
