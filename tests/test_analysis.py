"""graphopt.reporting.analysis: exact parameter and FLOP counts on tiny models built in code."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.reporting.analysis import ModelStats, analyze, format_table

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, F, s) for n, s in outputs],
        initializer=[numpy_helper.from_array(np.ones(s, np.float32), n) for n, s in inits])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m)
    return m  # no value_info: analyze() has to infer shapes itself


def _node(stats: ModelStats, name: str):
    (n,) = [n for n in stats.nodes if n.name == name]
    return n


def test_grouped_strided_conv_with_bias():
    # X 1x4x9x9, W 8x2x3x3 (groups=2 -> Cin/groups = 2), stride 2, pad 1 -> Y 1x8x5x5
    m = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=2,
                                 kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
               [("x", [1, 4, 9, 9])], [("y", [1, 8, 5, 5])], [("w", [8, 2, 3, 3]), ("b", [8])])
    s = analyze(m)
    n = _node(s, "conv")
    assert n.output_shape == (1, 8, 5, 5)
    assert n.params == 8 * 2 * 3 * 3 + 8
    # 2 * N * Cout * Hout * Wout * (Cin/groups) * kh * kw + bias adds (N * Cout * Hout * Wout)
    assert n.flops == 2 * 1 * 8 * 5 * 5 * 2 * 3 * 3 + 8 * 5 * 5 == 7400
    assert n.flops_known and s.unknown_flops_ops == []
    assert (s.total_params, s.total_flops) == (152, 7400)


def test_depthwise_conv_without_bias_batch_2():
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=6,
                                 kernel_shape=[5, 5], pads=[2, 2, 2, 2])],
               [("x", [2, 6, 7, 7])], [("y", [2, 6, 7, 7])], [("w", [6, 1, 5, 5])])
    n = _node(analyze(m), "dw")
    assert (n.params, n.flops) == (150, 2 * 2 * 6 * 7 * 7 * 1 * 5 * 5)


def test_conv_transpose():
    # X 1x4x5x5, W 4x3x3x3 (Cin, Cout/groups, k, k), stride 2 -> Y 1x3x11x11
    m = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct", strides=[2, 2])],
               [("x", [1, 4, 5, 5])], [("y", [1, 3, 11, 11])], [("w", [4, 3, 3, 3])])
    n = _node(analyze(m), "ct")
    assert n.output_shape == (1, 3, 11, 11)
    assert (n.params, n.flops) == (108, 2 * 100 * 3 * 3 * 3)


def test_gemm_trans_b_with_bias():
    # A 3x5, B 4x5 (transB) -> Y 3x4: M=3, N=4, K=5
    m = _model([helper.make_node("Gemm", ["a", "b", "c"], ["y"], name="fc", transB=1)],
               [("a", [3, 5])], [("y", [3, 4])], [("b", [4, 5]), ("c", [4])])
    n = _node(analyze(m), "fc")
    assert n.params == 20 + 4
    assert n.flops == 2 * 3 * 4 * 5 + 3 * 4 == 132


def test_gemm_trans_a_without_bias():
    m = _model([helper.make_node("Gemm", ["a", "b"], ["y"], name="fc", transA=1)],
               [("a", [5, 3])], [("y", [3, 4])], [("b", [5, 4])])
    assert _node(analyze(m), "fc").flops == 2 * 3 * 4 * 5


def test_batched_matmul():
    # A 2x3x4x5 @ W 5x6 (broadcast) -> 2x3x4x6; then batched A2 2x4x5 @ B2 2x5x6 (both activations)
    m = _model([helper.make_node("MatMul", ["a", "w"], ["y"], name="mm_w"),
                helper.make_node("MatMul", ["a2", "b2"], ["y2"], name="mm_bb")],
               [("a", [2, 3, 4, 5]), ("a2", [2, 4, 5]), ("b2", [2, 5, 6])],
               [("y", [2, 3, 4, 6]), ("y2", [2, 4, 6])], [("w", [5, 6])])
    s = analyze(m)
    mm_w, mm_bb = _node(s, "mm_w"), _node(s, "mm_bb")
    assert (mm_w.params, mm_w.flops) == (30, 2 * (2 * 3) * 4 * 6 * 5)
    assert (mm_bb.params, mm_bb.flops) == (0, 2 * 2 * 4 * 6 * 5)
    assert (s.total_params, s.total_flops) == (30, 1440 + 480)


def test_totals_on_a_small_classifier():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["l"], name="fc", transB=1),
        helper.make_node("Softmax", ["l"], ["y"], name="softmax", axis=1),
    ]
    m = _model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 10])],
               [("w", [4, 3, 3, 3]), ("s", [4]), ("bb", [4]), ("mu", [4]), ("var", [4]),
                ("fw", [10, 4]), ("fb", [10])])
    s = analyze(m)
    want = {
        "conv": 2 * 4 * 8 * 8 * 3 * 3 * 3,  # 13824
        "bn": 2 * 4 * 8 * 8,                # 512
        "relu": 4 * 8 * 8,                  # 256
        "pool": 4 * 4 * 4 * 2 * 2,          # 256: output elements * kernel area
        "gap": 4 * 4 * 4,                   # 64: input elements
        "flat": 0,
        "fc": 2 * 1 * 10 * 4 + 10,          # 90
        "softmax": 5 * 10,                  # 50
    }
    assert {n.name: n.flops for n in s.nodes} == want
    assert s.total_flops == sum(want.values()) == 15052
    assert s.total_params == 108 + 4 * 4 + 40 + 10
    assert _node(s, "bn").params == 16
    assert s.unknown_flops_ops == []
    assert s.by_op()["Conv"] == (1, 13824)


def test_shared_weights_counted_once_and_int64_shapes_are_not_params():
    shape = helper.make_node("Constant", [], ["shape"], name="shape",
                             value=numpy_helper.from_array(np.array([1, 20], np.int64)))
    scale = helper.make_node("Constant", [], ["k"], name="k",
                             value=numpy_helper.from_array(np.full([20], 0.5, np.float32)))
    nodes = [shape, scale,
             helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             helper.make_node("Mul", ["r", "k"], ["m1"], name="mul1"),
             helper.make_node("Mul", ["m1", "k"], ["y"], name="mul2")]
    s = analyze(_model(nodes, [("x", [4, 5])], [("y", [1, 20])]))
    assert _node(s, "reshape").params == 0 and _node(s, "reshape").flops == 0
    assert _node(s, "mul1").params == _node(s, "mul2").params == 20
    assert s.total_params == 20
    assert s.total_flops == 40


def test_unknown_ops_count_zero_and_are_listed():
    nodes = [helper.make_node("LRN", ["x"], ["l"], name="lrn", size=3),
             helper.make_node("Relu", ["l"], ["y"], name="relu")]
    s = analyze(_model(nodes, [("x", [1, 4, 3, 3])], [("y", [1, 4, 3, 3])]))
    lrn = _node(s, "lrn")
    assert (lrn.flops, lrn.flops_known) == (0, False)
    assert s.unknown_flops_ops == ["LRN"]
    assert s.total_flops == 36
    assert "FLOPs not counted" in format_table(s) and "LRN" in format_table(s)


def test_uses_existing_value_info_and_leaves_the_proto_alone():
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1, 1])],
               [("x", [1, 2, 4, 4])], [("y", [1, 3, 4, 4])], [("w", [3, 2, 1, 1])])
    inferred = onnx.shape_inference.infer_shapes(m)
    before = m.SerializeToString()
    assert analyze(m).total_flops == analyze(inferred).total_flops == 2 * 3 * 16 * 2
    assert m.SerializeToString() == before


def test_unknown_shapes_do_not_raise():
    # a dynamic batch dimension: the conv's FLOPs cannot be known
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[1, 1])],
               [("x", ["N", 2, 4, 4])], [("y", ["N", 3, 4, 4])], [("w", [3, 2, 1, 1])])
    s = analyze(m)
    assert s.unknown_flops_ops == ["Conv"] and s.total_flops == 0 and s.total_params == 6


def test_shapes_behind_shape_arithmetic_are_recovered():
    # pads computed by Reshape -> Transpose -> Reshape (as torch exports TF-"same" padding):
    # onnx's own inference loses the Pad output shape; the conv after it must still be counted
    # (onnxruntime's symbolic shape inference recovers it; it needs sympy).
    pytest.importorskip("sympy")
    def const(name, values):
        return helper.make_node("Constant", [], [name], name=name,
                                value=numpy_helper.from_array(np.array(values, np.int64)))

    nodes = [const("p", [0, 1, 0, 1, 0, 1, 0, 1]), const("s1", [2, 4]), const("s2", [-1]),
             helper.make_node("Reshape", ["p", "s1"], ["p1"], name="r1"),
             helper.make_node("Transpose", ["p1"], ["p2"], name="t", perm=[1, 0]),
             helper.make_node("Reshape", ["p2", "s2"], ["pads"], name="r2"),  # [0,0,1,1,0,0,1,1]
             helper.make_node("Pad", ["x", "pads"], ["xp"], name="pad"),
             helper.make_node("Conv", ["xp", "w"], ["y"], name="conv", kernel_shape=[3, 3])]
    m = _model(nodes, [("x", [1, 2, 5, 5])], [("y", [1, 3, 5, 5])], [("w", [3, 2, 3, 3])])
    s = analyze(m)
    assert _node(s, "pad").output_shape == (1, 2, 7, 7)
    assert _node(s, "conv").flops == 2 * 3 * 5 * 5 * 2 * 3 * 3
    assert s.unknown_flops_ops == [] and s.total_params == 54


def test_format_table_lists_the_most_expensive_nodes_first():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="big"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="small")]
    m = _model(nodes, [("x", [1, 64])], [("y", [1, 2])], [("w1", [64, 32]), ("w2", [32, 2])])
    s = analyze(m)
    text = format_table(s, top=2)
    lines = text.splitlines()
    assert lines[0].startswith("top 2 of 3 nodes")
    assert "big" in lines[3] and "small" in lines[4]
    assert "act" not in text.split("total:")[0]
    assert f"{s.total_flops:,} FLOPs" in text and "estimated" in text
    assert s.total_flops == 2 * 64 * 32 + 32 + 2 * 32 * 2


@pytest.mark.parametrize("op,factor", [("Softmax", 5), ("Sigmoid", 1), ("LayerNormalization", 1)])
def test_elementwise_norm_and_softmax_factors(op, factor):
    ins = ["x", "g"] if op == "LayerNormalization" else ["x"]
    inits = [("g", [6])] if op == "LayerNormalization" else []
    m = _model([helper.make_node(op, ins, ["y"], name="n")], [("x", [2, 3, 6])], [("y", [2, 3, 6])], inits)
    assert _node(analyze(m), "n").flops == factor * 36
