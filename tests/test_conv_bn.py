"""conv_bn: BatchNormalization fused into Conv / Gemm / MatMul(+Add), checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import float_init as _init
from conftest import make_model as _model
from conftest import run_ort_unoptimized
from graphopt.modelio.ir import export_graph, load_proto, node_by_name
from graphopt.passes.conv_bn import ConvBnFusion
from graphopt.plugin import MoveContext

TOL = 1e-4


# ------------------------------------------------------------------------------------ builders
def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _bn(prefix: str, x: str, y: str, c: int, rng, eps: float = 1e-3, **attrs):
    """A BN node with non-trivial statistics, plus its four initializers."""
    inits = [
        _init(f"{prefix}_gamma", rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c)),
        _init(f"{prefix}_beta", rng.normal(0, 1, c)),
        _init(f"{prefix}_mean", rng.normal(0, 2, c)),
        _init(f"{prefix}_var", rng.uniform(0.1, 3.0, c)),
    ]
    outs = attrs.pop("bn_outputs", [y])
    node = helper.make_node("BatchNormalization", [x] + [i.name for i in inits], outs, name=prefix,
                            epsilon=eps, **attrs)
    return node, inits


def conv_model(*, bias=True, group=1, cin=4, cout=6, k=3, hw=8, batch=2, seed=0, **conv_attrs):
    rng = _rng(seed)
    inits = [_init("w", rng.normal(0, 0.5, (cout, cin // group, k, k)))]
    conv_in = ["x", "w"]
    if bias:
        inits.append(_init("b", rng.normal(0, 1, cout)))
        conv_in.append("b")
    conv_attrs.setdefault("pads", [k // 2] * 4)
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="/conv", group=group, **conv_attrs)]
    bn, bn_inits = _bn("/bn", "c", "y", cout, rng)
    return _model(nodes + [bn], {"x": [batch, cin, hw, hw]}, ["y"], inits + bn_inits)


def gemm_model(*, trans_b: int, c_shape=None, alpha=1.0, beta=1.0, m=3, k=5, n=4, seed=1):
    rng = _rng(seed)
    inits = [_init("B", rng.normal(0, 0.5, (n, k) if trans_b else (k, n)))]
    g_in = ["a", "B"]
    if c_shape is not None:
        inits.append(_init("C", rng.normal(0, 1, c_shape)))
        g_in.append("C")
    nodes = [helper.make_node("Gemm", g_in, ["g"], name="/gemm", transB=trans_b, alpha=alpha, beta=beta)]
    bn, bn_inits = _bn("/bn", "g", "y", n, rng)
    return _model(nodes + [bn], {"a": [m, k]}, ["y"], inits + bn_inits)


def matmul_model(*, add: str | None, bias_shape=(4,), m=3, k=5, n=4, seed=2):
    """add: None (MatMul alone), "right" (Add(mm, b)) or "left" (Add(b, mm))."""
    rng = _rng(seed)
    inits = [_init("W", rng.normal(0, 0.5, (k, n)))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="/matmul")]
    bn_in = "mm"
    if add is not None:
        inits.append(_init("bias", rng.normal(0, 1, bias_shape)))
        ins = ["mm", "bias"] if add == "right" else ["bias", "mm"]
        nodes.append(helper.make_node("Add", ins, ["mm_b"], name="/add"))
        bn_in = "mm_b"
    bn, bn_inits = _bn("/bn", bn_in, "y", n, rng)
    return _model(nodes + [bn], {"x": [m, k]}, ["y"], inits + bn_inits)


# ------------------------------------------------------------------------------------- helpers
def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_ort_unoptimized(model, feeds)  # no ORT-side fusion


def _feeds(loaded, seed: int = 123) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    return {i.name: rng.normal(0, 1, i.shape).astype(i.dtype) for i in loaded.inputs}


def _fuse(model: onnx.ModelProto, only: set[str] | None = None):
    """Load, build sites, apply every (or only the named) site to a fresh graph, export."""
    loaded = load_proto(model)
    sites = ConvBnFusion().sites(loaded.graph())
    graph = loaded.graph()
    ctx = MoveContext(base_model=loaded.proto)
    for site in sites:
        if only is None or site.key in only:
            assert ConvBnFusion().apply(graph, site, "fuse", ctx) is True, site
    return loaded, sites, export_graph(graph)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _assert_same(loaded, fused: onnx.ModelProto) -> None:
    feeds = _feeds(loaded)
    ref = _run(loaded.proto, feeds)
    got = _run(fused, feeds)
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        err = float(np.max(np.abs(r - g)))
        assert err <= TOL, f"max abs error {err}"


# ---------------------------------------------------------------------------------- exactness
CASES = {
    "conv_bias": lambda: conv_model(bias=True),
    "conv_no_bias": lambda: conv_model(bias=False),
    "conv_grouped": lambda: conv_model(group=2, cin=4, cout=6),
    "conv_depthwise": lambda: conv_model(group=4, cin=4, cout=4, bias=False),
    "conv_strided_padded": lambda: conv_model(strides=[2, 2], pads=[1, 0, 2, 1], dilations=[1, 2], hw=9),
    "gemm_transB1_C_N": lambda: gemm_model(trans_b=1, c_shape=(4,), alpha=0.7, beta=1.3),
    "gemm_transB1_C_1xN": lambda: gemm_model(trans_b=1, c_shape=(1, 4), beta=0.5),
    "gemm_transB1_C_MxN": lambda: gemm_model(trans_b=1, c_shape=(3, 4), alpha=1.5, beta=-2.0),
    "gemm_transB0_no_C": lambda: gemm_model(trans_b=0, alpha=0.9),
    "matmul_add": lambda: matmul_model(add="right"),
    "matmul_add_bias_first": lambda: matmul_model(add="left", bias_shape=(1, 4)),
    "matmul_alone": lambda: matmul_model(add=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fusion_is_exact(case):
    loaded, sites, fused = _fuse(CASES[case]())
    assert len(sites) == 1
    assert "BatchNormalization" not in _ops(fused)
    _assert_same(loaded, fused)


def test_site_fields():
    model = conv_model(group=2, cin=4, cout=6, k=3, hw=8, batch=2)
    loaded = load_proto(model)
    (site,) = ConvBnFusion().sites(loaded.graph())
    assert site.key == "conv_bn:/bn"
    assert site.pass_name == "conv_bn"
    assert site.nodes == ("/conv", "/bn")
    assert site.choices == ("keep", "fuse") and site.exact_choice == "fuse"
    assert site.cost == 2 * (2 * 6 * 8 * 8) * (2 * 3 * 3)
    assert site.note == "Conv /conv -> BN /bn"
    assert ConvBnFusion().rejections(loaded.graph()) == []


def test_matmul_add_site_lists_three_nodes_and_alone_inserts_add():
    (site,) = ConvBnFusion().sites(load_proto(matmul_model(add="right")).graph())
    assert site.nodes == ("/matmul", "/add", "/bn")
    assert site.cost == 2 * 3 * 4 * 5
    _, _, fused = _fuse(matmul_model(add=None))
    assert _ops(fused) == ["MatMul", "Add"]


def test_gemm_beta_folded():
    _, _, fused = _fuse(gemm_model(trans_b=1, c_shape=(4,), alpha=0.7, beta=1.3))
    (gemm,) = fused.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["beta"] == pytest.approx(1.0)
    assert attrs["alpha"] == pytest.approx(0.7)


def test_apply_is_stale_safe_and_leaves_base_constants_alone():
    loaded = load_proto(conv_model(bias=True))
    base = loaded.graph()
    (site,) = ConvBnFusion().sites(base)
    w_before = node_by_name(base, "/conv").inputs[1].values.copy()
    clone = base.copy()  # gs copies share weight arrays with the original
    ctx = MoveContext(base_model=loaded.proto)
    assert ConvBnFusion().apply(clone, site, "fuse", ctx) is True
    assert ConvBnFusion().apply(clone, site, "fuse", ctx) is False  # already fused
    np.testing.assert_array_equal(node_by_name(base, "/conv").inputs[1].values, w_before)
    assert node_by_name(base, "/bn") is not None
    _assert_same(loaded, export_graph(clone))


def test_shared_weight_between_two_convs():
    rng = _rng(5)
    inits = [_init("w", rng.normal(0, 0.5, (4, 4, 3, 3)))]
    bn1, i1 = _bn("/bn1", "c1", "y1", 4, rng)
    bn2, i2 = _bn("/bn2", "c2", "y2", 4, rng)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="/conv1", pads=[1, 1, 1, 1]), bn1,
        helper.make_node("Conv", ["y1", "w"], ["c2"], name="/conv2", pads=[1, 1, 1, 1]), bn2,
    ]
    loaded, sites, fused = _fuse(_model(nodes, {"x": [1, 4, 6, 6]}, ["y2"], inits + i1 + i2))
    assert len(sites) == 2
    assert _ops(fused) == ["Conv", "Conv"]
    _assert_same(loaded, fused)


# ------------------------------------------------------------------------------------ negatives
def _conv_then(extra_nodes, outputs, seed=3, bn_input="c", **bn_attrs):
    rng = _rng(seed)
    inits = [_init("w", rng.normal(0, 0.5, (4, 4, 3, 3))), _init("b", rng.normal(0, 1, 4))]
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], name="/conv", pads=[1, 1, 1, 1])
    bn, bn_inits = _bn("/bn", bn_input, "y", 4, rng, **bn_attrs)
    return _model([conv, *extra_nodes, bn], {"x": [1, 4, 6, 6]}, outputs, inits + bn_inits)


def _assert_rejected(model, reason_part: str, check_runtime: bool = True):
    loaded = load_proto(model, check_runtime=check_runtime)
    assert ConvBnFusion().sites(loaded.graph()) == []
    rej = dict(ConvBnFusion().rejections(loaded.graph()))
    assert "/bn" in rej and reason_part in rej["/bn"], rej


def test_bn_after_relu_is_not_a_site():
    relu = helper.make_node("Relu", ["c"], ["r"], name="/relu")
    _assert_rejected(_conv_then([relu], ["y"], bn_input="r"), "input comes from Relu, not Conv/Gemm/MatMul")


def test_conv_output_with_second_consumer_is_not_a_site():
    relu = helper.make_node("Relu", ["c"], ["r"], name="/relu")
    _assert_rejected(_conv_then([relu], ["y", "r"]), "Conv /conv output has 2 consumers")


def test_conv_output_that_is_a_graph_output_is_not_a_site():
    _assert_rejected(_conv_then([], ["y", "c"]), "output is also a graph output")


def test_bn_in_training_mode_is_not_a_site():
    model = _conv_then([], ["y"], training_mode=1, bn_outputs=["y", "rm", "rv"])
    _assert_rejected(model, "training mode")


def test_bn_with_non_constant_stats_is_not_a_site():
    rng = _rng(4)
    inits = [_init("w", rng.normal(0, 0.5, (4, 4, 1, 1)))]
    bn, bn_inits = _bn("/bn", "c", "y", 4, rng)
    bn.input[3] = "mean_in"  # running mean fed at run time
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="/conv"), bn]
    model = _model(nodes, {"x": [1, 4, 3, 3], "mean_in": [4]}, ["y"],
                   inits + [i for i in bn_inits if i.name != "/bn_mean"])
    _assert_rejected(model, "mean is not a constant")


def test_two_conv_chain_only_one_fusable():
    """conv1 -> relu -> bn1 (not fusable) -> conv2 -> bn2 (fusable)."""
    rng = _rng(6)
    inits = [_init("w1", rng.normal(0, 0.5, (4, 3, 3, 3))), _init("w2", rng.normal(0, 0.5, (5, 4, 1, 1))),
             _init("b2", rng.normal(0, 1, 5))]
    bn1, i1 = _bn("/bn1", "r1", "y1", 4, rng)
    bn2, i2 = _bn("/bn2", "c2", "y2", 5, rng)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="/conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="/relu1"),
        bn1,
        helper.make_node("Conv", ["y1", "w2", "b2"], ["c2"], name="/conv2"),
        bn2,
    ]
    model = _model(nodes, {"x": [2, 3, 5, 5]}, ["y2"], inits + i1 + i2)
    loaded = load_proto(model)
    sites = ConvBnFusion().sites(loaded.graph())
    assert [s.key for s in sites] == ["conv_bn:/bn2"]
    assert sites[0].nodes == ("/conv2", "/bn2")
    rej = dict(ConvBnFusion().rejections(loaded.graph()))
    assert rej == {"/bn1": "input comes from Relu, not Conv/Gemm/MatMul"}
    _, _, fused = _fuse(model, only={"conv_bn:/bn2"})
    assert _ops(fused) == ["Conv", "Relu", "BatchNormalization", "Conv"]
    _assert_same(loaded, fused)


def test_training_mode_with_used_running_stats_is_not_a_site():
    model = _conv_then([], ["y", "rm"], training_mode=1, bn_outputs=["y", "rm", "rv"])
    _assert_rejected(model, "training mode")


def test_bn_with_used_running_stat_outputs_is_not_a_site():
    """training_mode=0 but running mean consumed: passes onnx.checker (not full), ORT refuses it."""
    model = _conv_then([], ["y"], training_mode=0, bn_outputs=["y", "rm", "rv"])
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6]),
                               helper.make_tensor_value_info("rm", TensorProto.FLOAT, [4])])
    _assert_rejected(model, "used outputs", check_runtime=False)
