"""int8 rewriting of matrix products (onnx_quantize), on small graphs built here and run in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from finetune import onnx_quantize


def product_graph(path, op: str, weight: np.ndarray, bias=None, opset: int = 18, **attrs):
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
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape[:-1] + ["out"])],
        initializers,
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)


def run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "op, transposed, opset, attrs",
    [
        ("MatMul", False, 18, {}),
        ("MatMul", False, 17, {}),  # ReduceMax takes its axes as an attribute before opset 18
        ("Gemm", True, 18, {"transB": 1}),
        ("FusedMatMul", True, 18, {"transB": 1}),
    ],
)
def test_products_become_int8_with_one_scale_per_row(tmp_path, op, transposed, opset, attrs):
    import onnx

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 48)).astype(np.float32)  # (in, out)
    stored = np.ascontiguousarray(weight.T) if transposed else weight
    bias = rng.standard_normal(48).astype(np.float32) if op == "Gemm" else None
    product_graph(tmp_path / "f.onnx", op, stored, bias, opset=opset, **attrs)
    onnx_quantize.quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", external=False)

    model = onnx.load(str(tmp_path / "q.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert "MatMulInteger" in ops and op not in ops
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # the output keeps its type
    if op != "FusedMatMul":  # the checker knows standard operators only
        onnx.checker.check_model(model, full_check=True)
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


def test_a_weight_shared_by_two_products_is_stored_once(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a2", "w"], ["y"])]
    nodes.insert(1, helper.make_node("Slice", ["x", "zero", "eight", "last"], ["x8"]))
    nodes.insert(2, helper.make_node("Concat", ["x8", "x8"], ["a2"], axis=-1))
    constants = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([8], np.int64), "eight"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 8]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8]),
        ],
        constants,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "f.onnx")
    onnx_quantize.quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", external=False)
    model = onnx.load(str(tmp_path / "q.onnx"))
    int8 = [t.name for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert len(int8) == 1 and "w" not in {t.name for t in model.graph.initializer}
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    a, y = run_all(tmp_path / "q.onnx", x)
    assert np.abs(a - x @ weight).max() < 0.05 * np.abs(x @ weight).max()
    x8 = np.concatenate([x[:, :8], x[:, :8]], axis=-1)
    assert np.abs(y - x8 @ weight).max() < 0.05 * np.abs(x8 @ weight).max()


def run_all(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
