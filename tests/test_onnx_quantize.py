"""int8 rewriting of matrix products (onnx_quantize), on small graphs built here and run in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from finetune import onnx_quantize


def product_graph(path, op: str, weight: np.ndarray, bias=None, **attrs):
    """One node y = op(x, weight[, bias]) with x of shape (batch, rows, in)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inputs = ["x", "w"] + (["b"] if bias is not None else [])
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft" if op == "FusedMatMul" else "", **attrs)
    initializers = [numpy_helper.from_array(weight, "w")]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "b"))
    x_shape = ["batch", "in"] if op == "Gemm" else ["batch", "rows", "in"]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)


def run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "op, transposed, attrs",
    [("MatMul", False, {}), ("Gemm", True, {"transB": 1}), ("FusedMatMul", True, {"transB": 1})],
)
def test_products_become_int8_with_one_scale_per_row(tmp_path, op, transposed, attrs):
    import onnx

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 48)).astype(np.float32)  # (in, out)
    stored = np.ascontiguousarray(weight.T) if transposed else weight
    bias = rng.standard_normal(48).astype(np.float32) if op == "Gemm" else None
    product_graph(tmp_path / "f.onnx", op, stored, bias, **attrs)
    onnx_quantize.quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", external=False)

    ops = {node.op_type for node in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "MatMulInteger" in ops and op not in ops
    x = rng.standard_normal((5, 64)).astype(np.float32)
    x[1] = 0  # an all-zero row
    x[2] *= 1e4  # a row a thousand times larger than the others: its own scale
    x[3, 0] = 50  # one outlier in a row
    x = x if op == "Gemm" else x[None]
    exact = x @ weight + (bias if bias is not None else 0)
    quantized = run(tmp_path / "q.onnx", x)
    for row in range(5):
        ref, got = exact[..., row, :], quantized[..., row, :]
        assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max() + 1e-6, (op, row)
    # Each row alone gives the same numbers as in the batch.
    alone = run(tmp_path / "q.onnx", x[..., 2:3, :])
    assert np.array_equal(alone[..., 0, :], quantized[..., 2, :])


def test_products_it_cannot_keep_exact_are_left_alone(tmp_path):
    import onnx

    weight = np.ones((8, 4), np.float32)
    product_graph(tmp_path / "f.onnx", "Gemm", weight, alpha=0.5)  # a scaled Gemm: not rewritten
    onnx_quantize.quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", external=False)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    assert [node.op_type for node in graph.node] == ["Gemm"] and len(graph.initializer) == 1
