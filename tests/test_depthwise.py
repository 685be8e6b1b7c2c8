"""depthwise: KxK conv -> depthwise KxK (multiplier r) + pointwise 1x1 from a per-channel SVD."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import float_init as _init
from conftest import make_model as _model
from conftest import net_model
from conftest import random_feeds as _feeds
from conftest import run_ort_unoptimized as _run
from graphopt.modelio.ir import export_graph, load_proto, node_by_name
from graphopt.passes.depthwise import DepthwiseSeparable, factorize
from graphopt.passes.kernel import KernelResize
from graphopt.plugin import MoveContext

TOL = 1e-4


# ------------------------------------------------------------------------------------ builders
def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def conv_model(*, bias=True, cin=4, cout=6, k=3, hw=8, batch=2, seed=0, kw=None, **conv_attrs):
    rng = _rng(seed)
    kw = k if kw is None else kw
    inits = [_init("w", rng.normal(0, 0.5, (cout, cin, k, kw)))]
    conv_in = ["x", "w"]
    if bias:
        inits.append(_init("b", rng.normal(0, 1, cout)))
        conv_in.append("b")
    if "auto_pad" not in conv_attrs:
        conv_attrs.setdefault("pads", [k // 2, kw // 2] * 2)
    nodes = [helper.make_node("Conv", conv_in, ["y"], name="/conv", **conv_attrs)]
    return _model(nodes, {"x": [batch, cin, hw, hw]}, ["y"], inits)


def _apply(loaded, moves: dict[str, int]) -> onnx.ModelProto:
    """Apply {site key: rank} to a fresh graph of the base model (apply() takes any valid rank)."""
    graph = loaded.graph()
    sites = {s.key: s for s in DepthwiseSeparable().sites(graph)}
    ctx = MoveContext(base_model=loaded.proto)
    for key, r in moves.items():
        assert DepthwiseSeparable().apply(graph, sites[key], r, ctx) is True, (key, r)
    return export_graph(graph)


def _outputs(loaded, model: onnx.ModelProto) -> tuple[list[np.ndarray], list[np.ndarray]]:
    feeds = _feeds(loaded)
    ref, got = _run(loaded.proto, feeds), _run(model, feeds)
    assert [r.shape for r in ref] == [g.shape for g in got]
    return ref, got


def _max_err(loaded, model: onnx.ModelProto) -> float:
    ref, got = _outputs(loaded, model)
    return max(float(np.max(np.abs(r - g))) for r, g in zip(ref, got))


def _cosine(loaded, model: onnx.ModelProto) -> float:
    (ref,), (got,) = _outputs(loaded, model)
    r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    return float(r @ g / (np.linalg.norm(r) * np.linalg.norm(g)))


def _node(model: onnx.ModelProto, name: str):
    return next(n for n in model.graph.node if n.name == name)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weight(model: onnx.ModelProto, node) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == node.input[1])


# ---------------------------------------------------------------------------------------- sites
def test_sites_and_rejections_on_net():
    loaded = load_proto(net_model())
    sites = DepthwiseSeparable().sites(loaded.graph())
    assert {s.key: s.choices for s in sites} == {
        "depthwise:/stem": ("keep", 1, 2, 4),
        "depthwise:/block/conv": ("keep", 1, 2, 4),
        "depthwise:/down": ("keep", 1, 2, 4),
        "depthwise:/same": ("keep", 1, 2, 4),
    }
    by_key = {s.key: s for s in sites}
    stem = by_key["depthwise:/stem"]
    assert stem.pass_name == "depthwise" and stem.nodes == ("/stem",) and stem.exact_choice is None
    assert stem.note == "Conv 3x3 4->8"
    assert stem.cost == 2 * (2 * 8 * 12 * 12) * (4 * 3 * 3)
    assert by_key["depthwise:/down"].cost == 2 * (2 * 16 * 6 * 6) * (16 * 3 * 3)
    assert dict(DepthwiseSeparable().rejections(loaded.graph())) == {
        "/dw": "already depthwise (group=8)",
        "/grouped": "grouped conv (group=2)",
        "/proj": "1x1 kernel (already pointwise)",
    }


def test_only_ranks_that_save_flops_are_offered():
    # Cout=2, 3x3: full rank 2; r=1 costs 1*(9+2)=11 < 18 MACs, r=2 costs 22 > 18.
    (site,) = DepthwiseSeparable().sites(load_proto(conv_model(cout=2)).graph())
    assert site.choices == ("keep", 1)
    # Cout=1: no rank saves FLOPs -> not a site, and rejections says so.
    loaded = load_proto(conv_model(cout=1))
    assert DepthwiseSeparable().sites(loaded.graph()) == []
    ((name, why),) = DepthwiseSeparable().rejections(loaded.graph())
    assert name == "/conv" and why.startswith("no rank in (1, 2, 4) saves FLOPs")


def test_every_choice_at_every_site_exports_with_original_shapes():
    loaded = load_proto(net_model())
    feeds = _feeds(loaded)
    ref_shapes = [r.shape for r in _run(loaded.proto, feeds)]
    sites = DepthwiseSeparable().sites(loaded.graph())
    for site in sites:
        for choice in site.choices[1:]:
            model = _apply(loaded, {site.key: choice})  # export_graph runs onnx.checker
            assert [o.shape for o in _run(model, feeds)] == ref_shapes, (site.key, choice)
    for choice in (1, 2, 4):  # every site at once
        model = _apply(loaded, {s.key: choice for s in sites})
        assert [o.shape for o in _run(model, feeds)] == ref_shapes


def test_rewrite_structure_bias_on_pointwise_bn_keeps_consuming():
    loaded = load_proto(net_model())
    model = _apply(loaded, {"depthwise:/stem": 2, "depthwise:/block/conv": 4})
    names = [n.name for n in model.graph.node]
    assert "/stem" not in names and "/block/conv" not in names
    dw, pw = _node(model, "/block/conv/depthwise"), _node(model, "/block/conv/pointwise")
    a = _attrs(dw)
    assert a["group"] == 8 and a["dilations"] == [2, 2] and a["pads"] == [2, 2, 2, 2]
    assert a["kernel_shape"] == [3, 3]
    assert _weight(model, dw).shape == (32, 1, 3, 3) and _weight(model, pw).shape == (8, 32, 1, 1)
    assert pw.input[0] == dw.output[0] and len(pw.input) == 2  # no bias on /block/conv
    assert _node(model, "/block/bn").input[0] == pw.output[0] == "bc"
    stem_dw, stem_pw = _node(model, "/stem/depthwise"), _node(model, "/stem/pointwise")
    assert len(stem_dw.input) == 2 and stem_pw.input[2] == "stem_b"  # bias moved to pointwise
    assert _weight(model, stem_dw).shape == (8, 1, 3, 3) and _weight(model, stem_pw).shape == (8, 8, 1, 1)
    assert stem_pw.output[0] == "s"


# -------------------------------------------------------------------------------- exactness
def test_factorization_at_full_rank_reconstructs_the_weight():
    w = _rng(3).normal(0, 1, (6, 4, 3, 3))
    dw, pw = factorize(w, 6)
    assert dw.shape == (24, 1, 3, 3) and pw.shape == (6, 24, 1, 1)
    # input channel i feeds depthwise outputs i*r .. i*r+r-1, which pointwise columns i*r.. read
    rec = np.stack([np.einsum("or,rij->oij", pw[:, i * 6:(i + 1) * 6, 0, 0], dw[i * 6:(i + 1) * 6, 0])
                    for i in range(4)], axis=1)
    np.testing.assert_allclose(rec, w, atol=1e-10)


FULL_RANK_CASES = {
    "cout_below_taps": lambda: conv_model(cout=6),  # full rank = Cout = 6
    "cout_above_taps": lambda: conv_model(cout=16),  # full rank = K*K = 9
    "no_bias": lambda: conv_model(bias=False),
    "strided_asym_dilated": lambda: conv_model(strides=[2, 1], pads=[1, 2, 2, 3], dilations=[1, 2], hw=9),
    "same_upper_strided": lambda: conv_model(auto_pad="SAME_UPPER", strides=[2, 2], k=5, hw=9),
    "same_lower": lambda: conv_model(auto_pad="SAME_LOWER", hw=7),
    "valid_5x5": lambda: conv_model(k=5, cout=12, auto_pad="VALID", hw=9),
    "non_square_3x5": lambda: conv_model(k=3, kw=5, cout=20),
}


@pytest.mark.parametrize("case", list(FULL_RANK_CASES))
def test_full_rank_is_exact(case):
    loaded = load_proto(FULL_RANK_CASES[case]())
    (site,) = DepthwiseSeparable().sites(loaded.graph())
    w = node_by_name(loaded.graph(), "/conv").inputs[1].values
    full = min(w.shape[0], w.shape[2] * w.shape[3])
    assert full not in site.choices  # full rank never saves FLOPs: apply-only
    assert _max_err(loaded, _apply(loaded, {site.key: full})) <= TOL


def test_full_rank_at_every_site_of_the_net_is_exact():
    loaded = load_proto(net_model())
    sites = DepthwiseSeparable().sites(loaded.graph())
    full = {"depthwise:/stem": 8, "depthwise:/block/conv": 8, "depthwise:/down": 9, "depthwise:/same": 9}
    assert _max_err(loaded, _apply(loaded, {s.key: full[s.key] for s in sites})) <= TOL


def test_fidelity_increases_with_rank():
    loaded = load_proto(conv_model(cin=4, cout=16, hw=10, bias=False, seed=11))
    cos = [_cosine(loaded, _apply(loaded, {"depthwise:/conv": r})) for r in (1, 2, 4, 9)]
    assert cos[0] < cos[1] < cos[2] < cos[3], cos
    assert cos[0] < 0.9 and cos[3] > 1 - 1e-9, cos


# ------------------------------------------------------------------------------------ staleness
def test_apply_after_node_is_gone_returns_false_and_base_is_untouched():
    loaded = load_proto(conv_model())
    base = loaded.graph()
    (site,) = DepthwiseSeparable().sites(base)
    w_before = node_by_name(base, "/conv").inputs[1].values.copy()
    ctx = MoveContext(base_model=loaded.proto)
    clone = base.copy()  # gs copies share weight arrays with the original
    assert DepthwiseSeparable().apply(clone, site, 2, ctx) is True
    assert DepthwiseSeparable().apply(clone, site, 2, ctx) is False  # /conv is gone
    assert DepthwiseSeparable().apply(base.copy(), site, 7, ctx) is False  # r above full rank 6
    np.testing.assert_array_equal(node_by_name(base, "/conv").inputs[1].values, w_before)
    export_graph(clone)
    for bad in ("keep", 0, 1.5, True):
        with pytest.raises(ValueError):
            DepthwiseSeparable().apply(base.copy(), site, bad, ctx)


def test_with_kernel_pass_on_the_same_conv():
    loaded = load_proto(conv_model(cout=8))
    ctx = MoveContext(base_model=loaded.proto)
    (k_site,) = KernelResize().sites(loaded.graph())
    (d_site,) = DepthwiseSeparable().sites(loaded.graph())
    # depthwise first: the kernel move finds its conv gone
    graph = loaded.graph()
    assert DepthwiseSeparable().apply(graph, d_site, 4, ctx) is True
    assert KernelResize().apply(graph, k_site, 5, ctx) is False
    # kernel growth first: depthwise factorises the grown 5x5 conv, still exact at full rank
    graph = loaded.graph()
    assert KernelResize().apply(graph, k_site, 5, ctx) is True
    assert DepthwiseSeparable().apply(graph, d_site, 8, ctx) is True
    model = export_graph(graph)
    assert _weight(model, _node(model, "/conv/depthwise")).shape == (32, 1, 5, 5)
    assert _max_err(loaded, model) <= TOL
