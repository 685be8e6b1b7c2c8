"""kernel: KxK conv kernels shrunk (centre crop) or grown (zero ring), checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from conftest import float_init as _init
from conftest import make_model as _model
from conftest import net_model
from conftest import random_feeds as _feeds
from conftest import run_ort_unoptimized as _run
from graphopt.modelio.ir import export_graph, load_proto, node_by_name
from graphopt.passes.kernel import KernelResize
from graphopt.plugin import MoveContext

TOL = 1e-4


# ------------------------------------------------------------------------------------ builders
def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def conv_model(*, bias=True, group=1, cin=4, cout=6, k=3, hw=8, batch=2, seed=0, weight=None, **conv_attrs):
    rng = _rng(seed)
    w = weight if weight is not None else rng.normal(0, 0.5, (cout, cin // group, k, k))
    inits = [_init("w", w)]
    conv_in = ["x", "w"]
    if bias:
        inits.append(_init("b", rng.normal(0, 1, cout)))
        conv_in.append("b")
    if "auto_pad" not in conv_attrs:
        conv_attrs.setdefault("pads", [k // 2] * 4)
    nodes = [helper.make_node("Conv", conv_in, ["y"], name="/conv", group=group, **conv_attrs)]
    return _model(nodes, {"x": [batch, cin, hw, hw]}, ["y"], inits)


def _apply(loaded, moves: dict[str, int]) -> onnx.ModelProto:
    """Apply {site key: choice} to a fresh graph of the base model and export it."""
    sites = {s.key: s for s in KernelResize().sites(loaded.graph())}
    graph = loaded.graph()
    ctx = MoveContext(base_model=loaded.proto)
    for key, choice in moves.items():
        assert KernelResize().apply(graph, sites[key], choice, ctx) is True, (key, choice)
    return export_graph(graph)


def _max_err(loaded, model: onnx.ModelProto) -> float:
    feeds = _feeds(loaded)
    ref, got = _run(loaded.proto, feeds), _run(model, feeds)
    assert [r.shape for r in ref] == [g.shape for g in got]
    return max(float(np.max(np.abs(r - g))) for r, g in zip(ref, got))


def _conv_attrs(model: onnx.ModelProto, name: str = "/conv") -> dict:
    node = next(n for n in model.graph.node if n.name == name)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------------------------------- sites
def test_sites_and_rejections_on_net():
    loaded = load_proto(net_model())
    sites = KernelResize().sites(loaded.graph())
    assert {s.key: s.choices for s in sites} == {
        "kernel:/stem": ("keep", 1, 5),
        "kernel:/block/conv": ("keep", 1, 5),
        "kernel:/dw": ("keep", 1, 5),
        "kernel:/grouped": ("keep", 3, 7),
        "kernel:/down": ("keep", 1, 5),
        "kernel:/same": ("keep", 1, 5),
    }
    for s in sites:
        assert s.pass_name == "kernel" and s.nodes == (s.key.split(":", 1)[1],)
        assert s.exact_choice is None  # growth is exact but never pays: no prior
    by_key = {s.key: s for s in sites}
    assert by_key["kernel:/stem"].cost == 2 * (2 * 8 * 12 * 12) * (4 * 3 * 3)
    assert by_key["kernel:/grouped"].cost == 2 * (2 * 8 * 12 * 12) * (4 * 5 * 5)
    assert by_key["kernel:/down"].cost == 2 * (2 * 16 * 6 * 6) * (16 * 3 * 3)
    assert by_key["kernel:/grouped"].note == "Conv 5x5 8->8 group=2"
    assert by_key["kernel:/stem"].note == "Conv 3x3 4->8"
    assert dict(KernelResize().rejections(loaded.graph())) == {"/proj": "1x1 kernel (pointwise; no ring to resize)"}


def test_every_choice_at_every_site_exports_with_original_shapes():
    loaded = load_proto(net_model())
    feeds = _feeds(loaded)
    ref_shapes = [r.shape for r in _run(loaded.proto, feeds)]
    sites = KernelResize().sites(loaded.graph())
    for site in sites:
        for choice in site.choices[1:]:
            model = _apply(loaded, {site.key: choice})  # export_graph runs onnx.checker
            assert [o.shape for o in _run(model, feeds)] == ref_shapes, (site.key, choice)
    # all sites at once, both directions
    for pick in (1, 2):
        model = _apply(loaded, {s.key: s.choices[pick] for s in sites})
        assert [o.shape for o in _run(model, feeds)] == ref_shapes


def test_growing_every_site_of_the_net_is_exact():
    loaded = load_proto(net_model())
    sites = KernelResize().sites(loaded.graph())
    assert _max_err(loaded, _apply(loaded, {s.key: s.choices[2] for s in sites})) <= TOL


# -------------------------------------------------------------------------------- exactness
GROW_CASES = {
    "plain": lambda: conv_model(),
    "no_bias": lambda: conv_model(bias=False),
    "asym_pads_strided_dilated": lambda: conv_model(pads=[1, 2, 2, 3], strides=[2, 1], dilations=[1, 2], hw=9),
    "same_upper_strided": lambda: conv_model(auto_pad="SAME_UPPER", strides=[2, 2], k=5, hw=8),
    "same_lower_strided": lambda: conv_model(auto_pad="SAME_LOWER", strides=[2, 2], k=5, hw=8),
    "same_upper_odd": lambda: conv_model(auto_pad="SAME_UPPER", hw=7),
    "grouped": lambda: conv_model(group=2, cin=4, cout=6, k=5, pads=[2, 2, 2, 2]),
    "depthwise": lambda: conv_model(group=4, cin=4, cout=4),
    "depthwise_multiplier2": lambda: conv_model(group=4, cin=4, cout=8, bias=False),
}


@pytest.mark.parametrize("case", list(GROW_CASES))
def test_growth_is_exact(case):
    loaded = load_proto(GROW_CASES[case]())
    (site,) = KernelResize().sites(loaded.graph())
    k = site.choices[2] - 2
    grown = _apply(loaded, {site.key: k + 2})
    attrs = _conv_attrs(grown)
    assert attrs["kernel_shape"] == [k + 2, k + 2]
    assert attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    assert _max_err(loaded, grown) <= TOL


def test_growth_moves_pads_by_dilation():
    loaded = load_proto(conv_model(pads=[1, 2, 2, 3], strides=[2, 1], dilations=[1, 2], hw=9))
    assert _conv_attrs(_apply(loaded, {"kernel:/conv": 5}))["pads"] == [2, 4, 3, 5]
    assert _conv_attrs(_apply(loaded, {"kernel:/conv": 1}))["pads"] == [0, 0, 1, 1]


def _ringed(cout, cin, k, inner, seed):
    """Random weights that are zero outside the central inner x inner window."""
    w = _rng(seed).normal(0, 0.5, (cout, cin, k, k))
    lo = (k - inner) // 2
    mask = np.zeros((k, k))
    mask[lo:lo + inner, lo:lo + inner] = 1
    return w * mask


SHRINK_CASES = {
    "5_to_3": lambda: conv_model(k=5, weight=_ringed(6, 4, 5, 3, 1)),
    "3_to_1": lambda: conv_model(k=3, weight=_ringed(6, 4, 3, 1, 2)),
    "same_lower_strided_5_to_3": lambda: conv_model(auto_pad="SAME_LOWER", strides=[2, 2], k=5, hw=8,
                                                    weight=_ringed(6, 4, 5, 3, 3)),
    "dilated_asym": lambda: conv_model(pads=[1, 2, 2, 3], dilations=[1, 2], hw=9, weight=_ringed(6, 4, 3, 1, 4)),
    "grouped_5_to_3": lambda: conv_model(group=2, k=5, pads=[2, 2, 2, 2], weight=_ringed(6, 2, 5, 3, 5)),
    "depthwise_3_to_1": lambda: conv_model(group=4, cin=4, cout=4, weight=_ringed(4, 1, 3, 1, 6)),
}


@pytest.mark.parametrize("case", list(SHRINK_CASES))
def test_shrink_of_a_conv_with_a_zero_outer_ring_is_exact(case):
    loaded = load_proto(SHRINK_CASES[case]())
    (site,) = KernelResize().sites(loaded.graph())
    k_small = site.choices[1]
    small = _apply(loaded, {site.key: k_small})
    assert _conv_attrs(small)["kernel_shape"] == [k_small, k_small]
    w = next(numpy_helper.to_array(i) for i in small.graph.initializer if i.dims[-1] == k_small)
    assert w.shape[2:] == (k_small, k_small)
    assert _max_err(loaded, small) <= TOL


def test_shrink_of_a_dense_kernel_is_approximate():
    loaded = load_proto(conv_model(k=5))
    assert _max_err(loaded, _apply(loaded, {"kernel:/conv": 3})) > 1e-2


# ---------------------------------------------------------------------------------- rejections
def test_rejections_say_why():
    rng = _rng(7)
    inits = [_init("w3", rng.normal(0, 0.5, (4, 4, 3, 3))), _init("w35", rng.normal(0, 0.5, (4, 4, 3, 5))),
             _init("w4", rng.normal(0, 0.5, (4, 4, 4, 4))), _init("w1", rng.normal(0, 0.5, (4, 4, 1, 1))),
             _init("w1d", rng.normal(0, 0.5, (4, 4, 3)))]
    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "w3"], ["valid"], name="/valid", auto_pad="VALID"),
        mk("Conv", ["x", "w3"], ["nopad"], name="/nopad"),
        mk("Conv", ["x", "w3"], ["half"], name="/halfpad", pads=[1, 0, 1, 1]),
        mk("Conv", ["x", "w35"], ["rect"], name="/rect", pads=[1, 2, 1, 2]),
        mk("Conv", ["x", "w4"], ["even"], name="/even", pads=[1, 1, 2, 2]),
        mk("Conv", ["x", "w1"], ["pw"], name="/pw"),
        mk("Conv", ["x", "wdyn"], ["dyn"], name="/dyn", pads=[1, 1, 1, 1]),
        mk("Conv", ["x1d", "w1d"], ["c1d"], name="/conv1d", pads=[1, 1]),
        mk("Conv", ["x", "w3"], ["ok"], name="/ok", pads=[1, 1, 1, 1]),
    ]
    outs = ["valid", "nopad", "half", "rect", "even", "pw", "dyn", "c1d", "ok"]
    model = _model(nodes, {"x": [1, 4, 8, 8], "wdyn": [4, 4, 3, 3], "x1d": [1, 4, 10]}, outs, inits)
    loaded = load_proto(model)
    assert [s.key for s in KernelResize().sites(loaded.graph())] == ["kernel:/ok"]
    rej = dict(KernelResize().rejections(loaded.graph()))
    assert set(rej) == {"/valid", "/nopad", "/halfpad", "/rect", "/even", "/pw", "/dyn", "/conv1d"}
    for name in ("/valid", "/nopad", "/halfpad"):
        assert "would go negative" in rej[name], rej[name]
    assert rej["/rect"] == "non-square kernel 3x5"
    assert rej["/even"].startswith("even kernel 4x4")
    assert rej["/pw"].startswith("1x1 kernel")
    assert rej["/dyn"] == "weight is not a constant"
    assert rej["/conv1d"] == "not a 2-D conv (weight has rank 3)"


def test_same_upper_clamped_at_zero_pad_is_rejected():
    """stride 4 on a 3x3 kernel: SAME needs no padding, so there is none to give back."""
    loaded = load_proto(conv_model(auto_pad="SAME_UPPER", strides=[4, 4], hw=8))
    assert KernelResize().sites(loaded.graph()) == []
    ((name, why),) = KernelResize().rejections(loaded.graph())
    assert name == "/conv" and "would go negative" in why


# ------------------------------------------------------------------------------------ staleness
def test_apply_after_node_is_gone_returns_false_and_base_is_untouched():
    loaded = load_proto(conv_model())
    base = loaded.graph()
    (site,) = KernelResize().sites(base)
    w_before = node_by_name(base, "/conv").inputs[1].values.copy()
    ctx = MoveContext(base_model=loaded.proto)

    clone = base.copy()  # gs copies share weight arrays with the original
    assert KernelResize().apply(clone, site, 5, ctx) is True
    assert KernelResize().apply(clone, site, 5, ctx) is False  # already 5x5
    np.testing.assert_array_equal(node_by_name(base, "/conv").inputs[1].values, w_before)
    assert node_by_name(base, "/conv").attrs["pads"] == [1, 1, 1, 1]
    assert _max_err(loaded, export_graph(clone)) <= TOL

    gone = loaded.graph()
    node = node_by_name(gone, "/conv")
    node.name = "/renamed_by_an_earlier_move"
    assert KernelResize().apply(gone, site, 1, ctx) is False
    gone.nodes.remove(node)
    assert KernelResize().apply(gone, site, 5, ctx) is False


def test_bad_choice_raises():
    loaded = load_proto(conv_model())
    (site,) = KernelResize().sites(loaded.graph())
    for bad in ("keep", 4, 0, True):
        with pytest.raises(ValueError):
            KernelResize().apply(loaded.graph(), site, bad, MoveContext(base_model=loaded.proto))


def test_separate_zero_pad_is_absorbed():
    """'same' padding exported as Pad -> Conv(pads 0) (as EfficientNet's export does): a site, exact growth."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (6, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["xp"], name="/pad", mode="constant"),
             helper.make_node("Conv", ["xp", "w"], ["y"], name="/dw", group=6, kernel_shape=[3, 3])]
    base = load_proto(_model(nodes, {"x": [1, 6, 8, 8]}, ["y"], inits))
    sites = KernelResize().sites(base.graph())
    assert [s.choices for s in sites] == [("keep", 1, 5)]
    x = rng.normal(0, 1, (1, 6, 8, 8)).astype(np.float32)
    for k in (1, 5):
        g = base.graph()
        assert KernelResize().apply(g, sites[0], k, MoveContext(base.proto))
        out = export_graph(g)
        assert not any(n.op_type == "Pad" for n in out.graph.node)
        s = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
        r = ort.InferenceSession(base.proto.SerializeToString(), providers=["CPUExecutionProvider"])
        y, y0 = s.run(None, {"x": x})[0], r.run(None, {"x": x})[0]
        assert y.shape == y0.shape
        if k == 5:
            np.testing.assert_allclose(y, y0, atol=1e-5)


# ------------------------------------------------------------------------------------- repair
def _smooth(n: int, shape, seed: int) -> np.ndarray:
    """Spatially correlated inputs [n, *shape] (the refit has structure to learn from)."""
    x = _rng(seed).normal(0, 1, (n, *shape))
    for _ in range(3):  # box blurs: neighbouring pixels alike, as in images
        x = (x + np.roll(x, 1, -1) + np.roll(x, 1, -2) + np.roll(x, (1, 1), (-1, -2))) / 4
    return (x / x.std()).astype(np.float32)


def _shrink(loaded, calib, repair: bool, k_new=None) -> onnx.ModelProto:
    (site,) = KernelResize().sites(loaded.graph())
    graph = loaded.graph()
    ctx = MoveContext(loaded.proto, {"x": calib}, {"repair": repair})
    assert KernelResize().apply(graph, site, site.choices[1] if k_new is None else k_new, ctx) is True
    return export_graph(graph)


REPAIR_CASES = {
    "plain_5_to_3": lambda: conv_model(k=5, cin=4, cout=6, hw=10, seed=1),
    "no_bias_strided": lambda: conv_model(bias=False, k=5, strides=[2, 2], hw=10, seed=2),
    "depthwise_5_to_3": lambda: conv_model(group=4, cin=4, cout=4, k=5, hw=10, seed=3),
    "grouped_same_upper": lambda: conv_model(group=2, cin=4, cout=6, k=5, hw=10, auto_pad="SAME_UPPER", seed=4),
}


@pytest.mark.parametrize("case", list(REPAIR_CASES))
def test_shrink_repair_is_closer_on_held_out_inputs(case):
    loaded = load_proto(REPAIR_CASES[case]())
    shape = loaded.inputs[0].shape
    calib, held_out = _smooth(12, shape, 10), _smooth(4, shape, 99)
    plain, fixed = _shrink(loaded, calib, False), _shrink(loaded, calib, True)
    assert _conv_attrs(fixed)["kernel_shape"] == _conv_attrs(plain)["kernel_shape"]
    err = {}
    for name, m in (("plain", plain), ("repaired", fixed)):
        err[name] = np.mean([np.linalg.norm(_run(m, {"x": x})[0] - _run(loaded.proto, {"x": x})[0]) for x in held_out])
    print(case, err)
    assert err["repaired"] < 0.8 * err["plain"], err


def test_shrink_repair_keeps_an_exact_shrink_exact_and_growth_is_untouched():
    loaded = load_proto(conv_model(k=5, weight=_ringed(6, 4, 5, 3, 1)))
    calib = _smooth(4, loaded.inputs[0].shape, 5)
    assert _max_err(loaded, _shrink(loaded, calib, True)) <= TOL
    dense = load_proto(conv_model(k=3, seed=8))
    grown = _shrink(dense, _smooth(4, dense.inputs[0].shape, 6), True, k_new=5)
    w = next(numpy_helper.to_array(i) for i in grown.graph.initializer if i.dims[-1] == 5)
    np.testing.assert_array_equal(w[:, :, 1:4, 1:4], numpy_helper.to_array(dense.proto.graph.initializer[0]))
    assert _max_err(dense, grown) <= TOL


def test_shrink_repair_with_absorbed_pad():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (6, 1, 5, 5)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 0, 2, 2, 0, 0, 2, 2], np.int64), "pads")]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["xp"], name="/pad", mode="constant"),
             helper.make_node("Conv", ["xp", "w"], ["y"], name="/conv", group=6, kernel_shape=[5, 5])]
    loaded = load_proto(_model(nodes, {"x": [1, 6, 9, 9]}, ["y"], inits))
    calib, held_out = _smooth(8, (1, 6, 9, 9), 1), _smooth(3, (1, 6, 9, 9), 2)
    plain, fixed = _shrink(loaded, calib, False), _shrink(loaded, calib, True)
    assert not any(n.op_type == "Pad" for n in fixed.graph.node)
    assert len(next(n for n in fixed.graph.node if n.op_type == "Conv").input) == 3  # a fitted bias was added
    e = [np.mean([np.abs(_run(m, {"x": x})[0] - _run(loaded.proto, {"x": x})[0]).mean() for x in held_out])
         for m in (plain, fixed)]
    assert e[1] < 0.8 * e[0], e
