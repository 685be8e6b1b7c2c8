"""width: prune coupled channel groups (residual, Concat, depthwise, BN, SE Mul, Reshape, Gemm/MatMul) + LS repair."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from conftest import float_init as _init
from conftest import make_model as _model
from graphopt.driver import materialize
from graphopt.genotype import Genotype, SearchSpace
from graphopt.modelio.ir import export_graph, load_proto, node_by_name
from graphopt.passes.width import WidthPrune
from graphopt.plugin import MoveContext

TOL = 1e-4
BATCH, HW = 2, 10

# channels made dead (exactly zero everywhere downstream) when dead=True: the lowest-importance
# channels of each group, so the 0.75 choice removes exactly these and must be exact.
DEAD = {"stem": [2, 5], "expand": [0, 7, 8, 15], "reduce": [1], "ba": [4, 1], "bb": [3], "mix": [9, 10, 11],
        "fc": [0, 1, 2, 3]}


def cnn_model(seed: int = 0, dead: bool = False) -> onnx.ModelProto:
    """stem conv+BN+Relu -> [expand 1x1+BN+Clip -> Pad -> depthwise 3x3 -> Relu -> SE (GAP, reduce, expand,
    Sigmoid, Mul) -> project 1x1+BN] + residual -> (3x3 conv || 1x1 conv) -> Concat -> 1x1 conv -> Relu -> GAP
    -> Reshape -> Gemm -> Relu -> MatMul -> Add bias -> logits."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.normal(0, 1.0 / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 else 0.3, shape)

    def bn(prefix, c, zero=()):
        g, b, m, v = rng.uniform(0.5, 1.5, c), w(c), w(c), rng.uniform(0.5, 2.0, c)
        b[list(zero)], m[list(zero)] = 0, 0
        return [_init(f"{prefix}_g", g), _init(f"{prefix}_b", b), _init(f"{prefix}_m", m), _init(f"{prefix}_v", v)]

    def kill(arr, key, axis=0, on=dead):
        if on:
            idx = [slice(None)] * arr.ndim
            idx[axis] = DEAD[key]
            arr[tuple(idx)] = 0
        return arr

    def z(key):
        return DEAD[key] if dead else []

    inits = [
        _init("stem_w", kill(w(8, 3, 3, 3), "stem")), _init("stem_bias", kill(w(8), "stem")), *bn("stem_bn", 8, z("stem")),
        _init("exp_w", kill(w(16, 8, 1, 1), "expand")), *bn("bn0", 16, z("expand")),
        _init("clip_lo", np.array(0.0)), _init("clip_hi", np.array(6.0)),
        _init("dw_w", w(16, 1, 3, 3)), _init("dw_b", kill(w(16), "expand")),
        _init("red_w", kill(w(4, 16, 1, 1), "reduce")), _init("red_b", kill(w(4), "reduce")),
        _init("sex_w", kill(w(16, 4, 1, 1), "expand")), _init("sex_b", kill(w(16), "expand")),
        _init("proj_w", kill(w(8, 16, 1, 1), "stem")), *bn("bn2", 8, z("stem")),
        _init("ba_w", kill(w(6, 8, 3, 3), "ba")), _init("ba_b", kill(w(6), "ba")),
        _init("bb_w", kill(w(4, 8, 1, 1), "bb")),
        _init("mix_w", kill(w(12, 10, 1, 1), "mix")), _init("mix_b", kill(w(12), "mix")),
        _init("fc_w", kill(w(16, 12), "fc")), _init("fc_b", kill(w(16), "fc")),
        _init("head_w", w(16, 10)), _init("head_b", w(10)),
    ]
    inits.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"))
    inits.append(numpy_helper.from_array(np.array([BATCH, 12], np.int64), "flat_shape"))
    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "stem_w", "stem_bias"], ["s0"], name="/stem", pads=[1, 1, 1, 1]),
        mk("BatchNormalization", ["s0", "stem_bn_g", "stem_bn_b", "stem_bn_m", "stem_bn_v"], ["s1"], name="/stem_bn"),
        mk("Relu", ["s1"], ["s"], name="/stem_relu"),
        mk("Conv", ["s", "exp_w"], ["e0"], name="/b/expand"),
        mk("BatchNormalization", ["e0", "bn0_g", "bn0_b", "bn0_m", "bn0_v"], ["e1"], name="/b/bn0"),
        mk("Clip", ["e1", "clip_lo", "clip_hi"], ["e2"], name="/b/act0"),
        mk("Pad", ["e2", "pads"], ["e3"], name="/b/pad", mode="constant"),
        mk("Conv", ["e3", "dw_w", "dw_b"], ["e4"], name="/b/dw", group=16),
        mk("Relu", ["e4"], ["d"], name="/b/act1"),
        mk("GlobalAveragePool", ["d"], ["q0"], name="/b/se/gap"),
        mk("Conv", ["q0", "red_w", "red_b"], ["q1"], name="/b/se/reduce"),
        mk("Relu", ["q1"], ["q2"], name="/b/se/relu"),
        mk("Conv", ["q2", "sex_w", "sex_b"], ["q3"], name="/b/se/expand"),
        mk("Sigmoid", ["q3"], ["q4"], name="/b/se/sigmoid"),
        mk("Mul", ["d", "q4"], ["se"], name="/b/se/mul"),
        mk("Conv", ["se", "proj_w"], ["p0"], name="/b/project"),
        mk("BatchNormalization", ["p0", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["p"], name="/b/bn2"),
        mk("Add", ["p", "s"], ["r"], name="/b/add"),
        mk("Conv", ["r", "ba_w", "ba_b"], ["a0"], name="/ba", pads=[1, 1, 1, 1]),
        mk("Relu", ["a0"], ["a"], name="/ba_relu"),
        mk("Conv", ["r", "bb_w"], ["b"], name="/bb"),
        mk("Concat", ["a", "b"], ["c"], name="/cat", axis=1),
        mk("Conv", ["c", "mix_w", "mix_b"], ["m0"], name="/mix"),
        mk("Relu", ["m0"], ["m"], name="/mix_relu"),
        mk("GlobalAveragePool", ["m"], ["g"], name="/gap"),
        mk("Reshape", ["g", "flat_shape"], ["f"], name="/reshape"),
        mk("Gemm", ["f", "fc_w", "fc_b"], ["h0"], name="/fc", transB=1),
        mk("Relu", ["h0"], ["h"], name="/fc_relu"),
        mk("MatMul", ["h", "head_w"], ["l0"], name="/head"),
        mk("Add", ["l0", "head_b"], ["logits"], name="/head_bias"),
    ]
    return _model(nodes, {"x": [BATCH, 3, HW, HW]}, ["logits"], inits)


EXPECTED_SITES = {
    "width:/stem": (("/stem", "/b/project"), 8),
    "width:/b/expand": (("/b/expand", "/b/se/expand"), 16),
    "width:/b/se/reduce": (("/b/se/reduce",), 4),
    "width:/ba": (("/ba",), 6),
    "width:/bb": (("/bb",), 4),
    "width:/mix": (("/mix",), 12),
    "width:/fc": (("/fc",), 16),
}


# ------------------------------------------------------------------------------------- helpers
def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _x(seed: int = 123, n: int = BATCH) -> np.ndarray:
    """Smooth positive-ish images (structure for the refits to learn)."""
    x = np.random.default_rng(seed).standard_normal((n, 3, HW, HW)).astype(np.float32)
    return ((x + np.roll(x, 1, -1) + np.roll(x, 1, -2)) / 3).astype(np.float32)


def _calib(n: int, seed: int) -> np.ndarray:
    return np.stack([_x(seed + i) for i in range(n)])  # [samples, batch, 3, H, W]


def _apply(loaded, moves: dict, ctx: MoveContext | None = None) -> onnx.ModelProto:
    graph = loaded.graph()
    sites = {s.key: s for s in WidthPrune().sites(loaded.graph())}
    ctx = ctx or MoveContext(base_model=loaded.proto)
    for key, r in moves.items():
        assert WidthPrune().apply(graph, sites[key], r, ctx) is True, (key, r)
    return export_graph(graph)  # cleanup + shape inference + onnx.checker


def _weight(model: onnx.ModelProto, node_name: str, slot: int = 1) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == node.input[slot])


def _io_shapes(model: onnx.ModelProto):
    dims = lambda vi: [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return [dims(v) for v in model.graph.input], [dims(v) for v in model.graph.output]


# ---------------------------------------------------------------------------------------- sites
def test_sites_are_the_coupled_groups():
    sites = WidthPrune().sites(load_proto(cnn_model()).graph())
    assert {s.key: (s.nodes, s.choices) for s in sites} == {
        k: (nodes, ("keep", 0.75, 0.5)) for k, (nodes, _) in EXPECTED_SITES.items()}
    by = {s.key: s for s in sites}
    assert by["width:/stem"].note == "8 channels of Conv '/stem' (+1 coupled)"
    # cost: FLOPs of every conv/Gemm/MatMul the group touches (the residual group: stem, project, ba, bb, expand)
    assert by["width:/stem"].cost > by["width:/bb"].cost > 0
    assert dict(WidthPrune().rejections(load_proto(cnn_model()).graph())) == {"/head": "graph output 'logits'"}


@pytest.mark.parametrize("key", list(EXPECTED_SITES))
@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_every_choice_is_valid_and_keeps_io_shapes(key, ratio):
    loaded = load_proto(cnn_model())
    x = _x()
    model = _apply(loaded, {key: ratio})
    assert _io_shapes(model) == _io_shapes(loaded.proto)
    assert _run(model, x).shape == _run(loaded.proto, x).shape
    nodes, c = EXPECTED_SITES[key]
    kept = int(np.ceil(ratio * c))
    for name in nodes:  # each producer lost its output channels
        assert _weight(model, name).shape[0] == kept


def test_all_sites_at_once_with_repair():
    loaded = load_proto(cnn_model())
    x = _x()
    ctx = MoveContext(loaded.proto, {"x": _calib(4, 7)}, {"repair": True})
    for ratio in (0.75, 0.5):
        model = _apply(loaded, {k: ratio for k in EXPECTED_SITES}, ctx)
        onnx.checker.check_model(model, full_check=True)
        assert _io_shapes(model) == _io_shapes(loaded.proto)
        assert np.all(np.isfinite(_run(model, x)))


def test_pruned_shapes_follow_the_coupling():
    loaded = load_proto(cnn_model())
    m = _apply(loaded, {"width:/b/expand": 0.5, "width:/bb": 0.5, "width:/mix": 0.75})
    assert _weight(m, "/b/expand").shape == (8, 8, 1, 1)
    assert [numpy_helper.to_array(i).shape for i in m.graph.initializer
            if i.name in next(n for n in m.graph.node if n.name == "/b/bn0").input[1:]] == [(8,)] * 4
    dw = next(n for n in m.graph.node if n.name == "/b/dw")
    assert _weight(m, "/b/dw").shape == (8, 1, 3, 3) and _weight(m, "/b/dw", 2).shape == (8,)
    assert next(a.i for a in dw.attribute if a.name == "group") == 8
    assert _weight(m, "/b/se/reduce").shape == (4, 8, 1, 1)  # SE squeeze reads the pruned channels
    assert _weight(m, "/b/se/expand").shape == (8, 4, 1, 1)  # SE excite is coupled through the Mul
    assert _weight(m, "/b/project").shape == (8, 8, 1, 1)
    assert _weight(m, "/mix").shape == (9, 6 + 2, 1, 1)  # Concat: 6 from /ba + 2 of /bb's 4
    assert list(numpy_helper.to_array(next(i for i in m.graph.initializer
                                           if i.name == next(n for n in m.graph.node if n.name == "/reshape").input[1]))) \
        == [BATCH, 9]
    assert _weight(m, "/fc").shape == (16, 9)


# -------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("repair", [False, True])
def test_pruning_dead_channels_is_exact(repair):
    """Channels that are exactly zero downstream have zero importance: 0.75 removes exactly them."""
    loaded = load_proto(cnn_model(seed=1, dead=True))
    x = _x()
    ref = _run(loaded.proto, x)
    ctx = MoveContext(loaded.proto, {"x": _calib(3, 50)} if repair else {}, {"repair": repair})
    for key, (nodes, c) in EXPECTED_SITES.items():
        model = _apply(loaded, {key: 0.75}, ctx)
        got = _run(model, x)
        assert float(np.max(np.abs(got - ref))) <= TOL, key
        n_dead = len(DEAD[{"width:/stem": "stem", "width:/b/expand": "expand", "width:/b/se/reduce": "reduce",
                           "width:/ba": "ba", "width:/bb": "bb", "width:/mix": "mix", "width:/fc": "fc"}[key]])
        assert c - _weight(model, nodes[0]).shape[0] <= n_dead
    # all groups at once, still exact
    model = _apply(loaded, {k: 0.75 for k in EXPECTED_SITES}, ctx)
    assert float(np.max(np.abs(_run(model, x) - ref))) <= TOL


def test_pruning_live_channels_changes_the_output():
    loaded = load_proto(cnn_model(seed=2))
    x = _x()
    assert float(np.max(np.abs(_run(_apply(loaded, {"width:/mix": 0.5}), x) - _run(loaded.proto, x)))) > 1e-3


# ---------------------------------------------------------------------------------------- repair
@pytest.mark.parametrize("key", ["width:/b/expand", "width:/mix", "width:/stem", "width:/fc"])
def test_repair_is_closer_to_the_original_on_held_out_inputs(key):
    base = load_proto(cnn_model(seed=3))
    space = SearchSpace(WidthPrune().sites(base.graph()))
    g = Genotype({key: 0.5})
    calib, held_out = _calib(16, 100), [_x(900 + i) for i in range(6)]
    passes = {"width": WidthPrune()}
    plain, _ = materialize(base, space, g, passes, MoveContext(base.proto, {"x": calib}, {"repair": False}))
    fixed, _ = materialize(base, space, g, passes, MoveContext(base.proto, {"x": calib}, {"repair": True}))
    err = {name: np.mean([np.linalg.norm(_run(m, x) - _run(base.proto, x)) for x in held_out])
           for name, m in (("plain", plain), ("repaired", fixed))}
    print(key, err)
    assert err["repaired"] < 0.9 * err["plain"], err


# ---------------------------------------------------------------------------------- rejections
def test_rejections_say_why():
    rng = np.random.default_rng(5)
    mk = helper.make_node
    inits = [_init("w_in", rng.normal(0, 0.3, (4, 4, 1, 1))),  # residual with the graph input
             _init("w_g", rng.normal(0, 0.3, (8, 4, 3, 3))), _init("w_g2", rng.normal(0, 0.3, (8, 4, 1, 1))),
             _init("w_l", rng.normal(0, 0.3, (6, 4, 1, 1))), _init("w_l2", rng.normal(0, 0.3, (4, 6, 1, 1))),
             _init("w_f", rng.normal(0, 0.3, (5, 4, 1, 1))), _init("fc_w", rng.normal(0, 0.3, (5 * 16, 3))),
             _init("w_ok", rng.normal(0, 0.3, (6, 4, 1, 1))), _init("w_ok2", rng.normal(0, 0.3, (2, 6, 1, 1)))]
    nodes = [
        mk("Conv", ["x", "w_in"], ["i0"], name="/touches_input"),
        mk("Add", ["i0", "x"], ["i1"], name="/res_in"),
        mk("Conv", ["i1", "w_g"], ["g0"], name="/feeds_grouped", pads=[1, 1, 1, 1]),
        mk("Conv", ["g0", "w_g2"], ["g1"], name="/grouped", group=2),
        mk("Conv", ["i1", "w_l"], ["l0"], name="/feeds_lrn"),
        mk("LRN", ["l0"], ["l1"], name="/lrn", size=3),
        mk("Conv", ["l1", "w_l2"], ["l2"], name="/after_lrn"),
        mk("Conv", ["i1", "w_f"], ["f0"], name="/feeds_flatten"),
        mk("Flatten", ["f0"], ["f1"], name="/flatten"),
        mk("MatMul", ["f1", "fc_w"], ["out1"], name="/fc"),
        mk("Conv", ["i1", "w_ok"], ["k0"], name="/ok"),
        mk("Relu", ["k0"], ["k1"], name="/ok_relu"),
        mk("Conv", ["k1", "w_ok2"], ["out2"], name="/ok_last"),
    ]
    loaded = load_proto(_model(nodes, {"x": [1, 4, 4, 4]}, ["g1", "l2", "out1", "out2"], inits))
    assert [s.key for s in WidthPrune().sites(loaded.graph())] == ["width:/ok"]
    rej = dict(WidthPrune().rejections(loaded.graph()))
    assert rej["/touches_input"] == "graph input 'x'"
    assert rej["/feeds_grouped"].startswith("Conv '/grouped': grouped conv (group=2")
    assert rej["/feeds_lrn"] == "LRN '/lrn': op not understood by the width analysis"
    assert rej["/feeds_flatten"].startswith("Flatten '/flatten': mixes the channel axis 1 of [1, 5, 4, 4]")
    assert rej["/after_lrn"] == "graph output 'l2'"
    assert set(rej) >= {"/touches_input", "/feeds_grouped", "/feeds_lrn", "/feeds_flatten", "/after_lrn", "/ok_last"}


def test_small_groups_offer_only_ratios_that_remove_something():
    rng = np.random.default_rng(6)
    inits = [_init("w1", rng.normal(0, 0.3, (2, 3, 1, 1))), _init("w2", rng.normal(0, 0.3, (3, 2, 1, 1))),
             _init("w3", rng.normal(0, 0.3, (1, 3, 1, 1))), _init("w4", rng.normal(0, 0.3, (2, 1, 1, 1)))]
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "w1"], ["a"], name="/two"), mk("Conv", ["a", "w2"], ["b"], name="/three"),
             mk("Conv", ["b", "w3"], ["c"], name="/one"), mk("Conv", ["c", "w4"], ["y"], name="/last")]
    loaded = load_proto(_model(nodes, {"x": [1, 3, 4, 4]}, ["y"], inits))
    # 2 channels: 0.75 keeps 2 (no change) -> only 0.5; 3 channels: 0.75 keeps 3 -> only 0.5 (keeps 2)
    assert {s.key: s.choices for s in WidthPrune().sites(loaded.graph())} == {
        "width:/two": ("keep", 0.5), "width:/three": ("keep", 0.5)}
    assert dict(WidthPrune().rejections(loaded.graph()))["/one"] == "a single channel"


# ------------------------------------------------------------------------------------ staleness
def test_apply_after_change_returns_false_and_base_is_untouched():
    loaded = load_proto(cnn_model())
    base = loaded.graph()
    site = next(s for s in WidthPrune().sites(base) if s.key == "width:/b/expand")
    w_before = node_by_name(base, "/b/expand").inputs[1].values.copy()
    ctx = MoveContext(base_model=loaded.proto)
    clone = base.copy()  # gs copies share weight arrays with the original
    assert WidthPrune().apply(clone, site, 0.5, ctx) is True
    assert WidthPrune().apply(clone, site, 0.5, ctx) is False  # already pruned: the group changed
    np.testing.assert_array_equal(node_by_name(base, "/b/expand").inputs[1].values, w_before)
    assert node_by_name(base, "/b/dw").attrs["group"] == 16
    export_graph(clone)
    gone = loaded.graph()
    node_by_name(gone, "/b/se/expand").name = "/renamed_by_an_earlier_move"
    assert WidthPrune().apply(gone, site, 0.5, ctx) is False
    for bad in ("keep", 0, 1.0, 1.5, True):
        with pytest.raises(ValueError):
            WidthPrune().apply(loaded.graph(), site, bad, ctx)


def test_registered():
    from graphopt.registry import PASSES

    assert PASSES.get("width") is WidthPrune


# ------------------------------------------------------------------------------------ importance
def _two_layer(w1: np.ndarray, gamma: np.ndarray | None = None) -> onnx.ModelProto:
    c = w1.shape[0]
    inits = [_init("w1", w1.reshape(c, -1, 1, 1)), _init("w2", np.ones((3, c, 1, 1)))]
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "w1"], ["a"], name="/a")]
    if gamma is not None:
        inits += [_init("g", gamma), _init("b", np.zeros(c)), _init("m", np.zeros(c)), _init("v", np.ones(c))]
        nodes.append(mk("BatchNormalization", ["a", "g", "b", "m", "v"], ["a_bn"], name="/bn"))
    nodes.append(mk("Conv", ["a_bn" if gamma is not None else "a", "w2"], ["y"], name="/b"))
    return _model(nodes, {"x": [1, w1.shape[1], 4, 4]}, ["y"], inits)


def test_importance_weighs_filters_by_the_following_bn_scale():
    w1 = np.array([[1, -2, 0, 1], [0, 1, 2, -1], [-1, 0, 1, 2], [2, 1, -1, 0]], float)  # equal L1 and L2 norms
    loaded = load_proto(_two_layer(w1, gamma=np.array([1.0, 0.1, -2.0, 0.2])))
    m = _apply(loaded, {"width:/a": 0.5})
    gamma = next(numpy_helper.to_array(i) for i in m.graph.initializer
                 if i.name == next(n for n in m.graph.node if n.name == "/bn").input[1])
    np.testing.assert_allclose(gamma, [1.0, -2.0])  # |gamma| 0.1 and 0.2 went
    np.testing.assert_allclose(_weight(m, "/a")[:, :, 0, 0], w1[[0, 2]])


@pytest.mark.parametrize("norm, kept", [("l1", 1), ("l2", 0)])
def test_importance_norm_option(norm, kept):
    w1 = np.array([[3.0, 0, 0, 0], [1, 1, 1, 1]])  # L1: 3 < 4; L2: 3 > 2
    loaded = load_proto(_two_layer(w1))
    (site,) = WidthPrune().sites(loaded.graph())
    graph = loaded.graph()
    assert WidthPrune().apply(graph, site, 0.5, MoveContext(loaded.proto, options={"width_importance": norm}))
    np.testing.assert_allclose(_weight(export_graph(graph), "/a")[:, :, 0, 0], w1[[kept]])


def test_data_driven_selection_drops_a_redundant_channel():
    """Channels a and b are copies, c is small but carries its own signal. Filter norms keep a and
    b and lose c; the least-squares selection (the default with calibration data) drops the copy,
    and the refit folds its weight into a: the repaired model is then almost exact."""
    w1 = np.array([[1.0, 2.0], [1.0, 2.0], [0.1, -0.1]])
    inits = [_init("w1", w1.reshape(3, 2, 1, 1)), _init("w2", np.array([[1.0, 0.5, 2.0], [-1.0, 1.0, 3.0]])[..., None, None])]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="/a"), helper.make_node("Conv", ["a", "w2"], ["y"], name="/b")]
    loaded = load_proto(_model(nodes, {"x": [1, 2, 16, 16]}, ["y"], inits))
    rng = np.random.default_rng(0)
    calib, x = rng.normal(0, 1, (8, 1, 2, 16, 16)).astype(np.float32), rng.normal(0, 1, (1, 2, 16, 16)).astype(np.float32)
    (site,) = WidthPrune().sites(loaded.graph())
    err = {}
    for imp in ("l1", "auto"):
        graph = loaded.graph()
        assert WidthPrune().apply(graph, site, 0.5, MoveContext(loaded.proto, {"x": calib}, {"width_importance": imp}))
        m = export_graph(graph)
        kept = _weight(m, "/a")[:, :, 0, 0]
        assert kept.shape == (2, 2)
        if imp == "auto":
            np.testing.assert_allclose(kept[1], w1[2])  # c survives
        err[imp] = float(np.abs(_run(m, x) - _run(loaded.proto, x)).max())
    print(err)
    assert err["auto"] < 0.01 * err["l1"], err
    with pytest.raises(ValueError, match="width_importance"):
        WidthPrune().apply(loaded.graph(), site, 0.5, MoveContext(loaded.proto, {}, {"width_importance": "l3"}))


def test_with_the_other_passes_in_one_candidate():
    """conv_bn (stage 10) fuses first: width still finds its groups, and stays exact on dead channels;
    kernel/depthwise (stage 30) before width (40): every move in one candidate gives a valid graph."""
    from graphopt.registry import PASSES

    passes = {n: PASSES.create(n) for n in ("conv_bn", "kernel", "depthwise", "width")}
    base = load_proto(cnn_model(seed=1, dead=True))
    space = SearchSpace([s for p in passes.values() for s in p.sites(base.graph())])
    ctx = MoveContext(base.proto, {"x": _calib(4, 3)}, {"repair": True})
    x = _x()
    g = Genotype({s.key: s.exact_choice for s in space.sites if s.pass_name == "conv_bn"}
                 | {s.key: 0.75 for s in space.sites if s.pass_name == "width"})
    model, applied = materialize(base, space, g, passes, ctx)
    assert set(applied.values()) == {"applied"} and not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert float(np.abs(_run(model, x) - _run(base.proto, x)).max()) <= TOL
    model, applied = materialize(base, space, Genotype({s.key: s.choices[1] for s in space.sites}), passes, ctx)
    assert all(v == "applied" for k, v in applied.items() if k.startswith("width:"))
    assert _io_shapes(model) == _io_shapes(base.proto) and np.all(np.isfinite(_run(model, x)))


def test_example_model_groups(example_model):
    """EfficientNet-Lite0: 24 groups (the residual trunks are coupled across blocks), the
    classifier (a graph output) is not one; a move exports and keeps the logits' shape."""
    from graphopt.modelio.ir import load_model

    loaded = load_model(example_model)
    sites = {s.key: s for s in WidthPrune().sites(loaded.graph())}
    assert len(sites) == 24
    assert sites["width:/_blocks.11/_project_conv/Conv"].nodes == tuple(
        f"/_blocks.{i}/_project_conv/Conv" for i in (11, 12, 13, 14))
    assert dict(WidthPrune().rejections(loaded.graph())) == {"/_fc/Gemm": "graph output 'logits'"}
    model = _apply(loaded, {"width:/_blocks.11/_project_conv/Conv": 0.5})
    assert _io_shapes(model) == _io_shapes(loaded.proto)
    assert _weight(model, "/_blocks.12/_expand_conv/Conv").shape == (1152, 96, 1, 1)


def test_transformer_ffn_hidden_units():
    """x [1, T, D] -> LayerNorm -> MatMul (D->F) + bias -> Relu -> MatMul (F->D) + residual: the F hidden
    units are one group (channels on the last axis); the residual stream is not (a graph input)."""
    rng = np.random.default_rng(9)
    d, f, t = 8, 16, 6
    inits = [_init("ln_g", np.ones(d)), _init("ln_b", np.zeros(d)), _init("w1", rng.normal(0, 0.4, (d, f))),
             _init("b1", rng.normal(0, 0.1, f)), _init("w2", rng.normal(0, 0.3, (f, d)))]
    mk = helper.make_node
    nodes = [mk("LayerNormalization", ["x", "ln_g", "ln_b"], ["n"], name="/ln", axis=-1),
             mk("MatMul", ["n", "w1"], ["h0"], name="/ffn/up"), mk("Add", ["h0", "b1"], ["h1"], name="/ffn/bias"),
             mk("Relu", ["h1"], ["h"], name="/ffn/relu"), mk("MatMul", ["h", "w2"], ["o"], name="/ffn/down"),
             mk("Add", ["x", "o"], ["y"], name="/res")]
    loaded = load_proto(_model(nodes, {"x": [1, t, d]}, ["y"], inits))
    assert [(s.key, s.choices) for s in WidthPrune().sites(loaded.graph())] == [("width:/ffn/up", ("keep", 0.75, 0.5))]
    assert dict(WidthPrune().rejections(loaded.graph()))["/ffn/down"].startswith("Add '/res': inputs 'x' and 'o'")
    (site,) = WidthPrune().sites(loaded.graph())
    calib = rng.normal(0, 1, (32, 1, t, d)).astype(np.float32)
    held = [rng.normal(0, 1, (1, t, d)).astype(np.float32) for _ in range(4)]
    err = {}
    for rep in (False, True):
        graph = loaded.graph()
        assert WidthPrune().apply(graph, site, 0.5, MoveContext(loaded.proto, {"x": calib}, {"repair": rep}))
        m = export_graph(graph)
        assert _weight(m, "/ffn/up").shape == (d, f // 2) and _weight(m, "/ffn/down").shape == (f // 2, d)
        err[rep] = np.mean([np.linalg.norm(_run(m, x) - _run(loaded.proto, x)) for x in held])
    assert err[True] < 0.9 * err[False], err


def test_bad_importance_option_stops_the_run_before_any_candidate(tmp_path):
    """width_importance is checked once at the start of a run (Pass.check_options), as a usage
    error naming the fix, not once per candidate as a failed record."""
    from graphopt.config import RunConfig
    from graphopt.errors import UsageError
    from graphopt.world import open_world

    path = tmp_path / "m.onnx"
    onnx.save(cnn_model(), path)
    cfg = RunConfig(model=path, passes=["width"], pass_options={"width_importance": "l3"}, allow_synthetic=True,
                    out=tmp_path / "out")
    with pytest.raises(UsageError, match=r"width_importance='l3': use one of auto, l1, l2, ls"):
        open_world(cfg)
    cfg.pass_options["width_importance"] = "l2"
    assert len(open_world(cfg).space) > 0
