"""The depth pass: residual blocks and post-LN encoder layers removed, on nets built in code, and
the sites it finds on the bundled models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import ROOT, float_init, make_model, run_ort_unoptimized
from graphopt.driver import materialize
from graphopt.genotype import Genotype, SearchSpace
from graphopt.modelio.ir import load_proto
from graphopt.passes.conv_bn import ConvBnFusion
from graphopt.passes.depth import DepthRemoval
from graphopt.plugin import MoveContext

mk = helper.make_node


def resnet(zero_branch: bool = False, seed: int = 0) -> onnx.ModelProto:
    """stem -> relu -> h; block1: h + BN(conv(relu(conv(h)))) ; block2: r1 + conv(relu(conv(r1)))
    with a side output; a broadcast Add; GAP -> out."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.normal(0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)

    last = np.zeros((8, 8, 1, 1)) if zero_branch else w(8, 8, 1, 1)
    inits = [float_init("stem", w(8, 3, 3, 3)), float_init("b1a", w(8, 8, 3, 3)), float_init("b1b", last),
             float_init("bn_g", rng.uniform(0.5, 1.5, 8)), float_init("bn_b", np.zeros(8) if zero_branch else w(8)),
             float_init("bn_m", np.zeros(8)), float_init("bn_v", np.ones(8)),
             float_init("b2a", w(8, 8, 3, 3)), float_init("b2b", w(8, 8, 1, 1)), float_init("bias", w(1, 8, 1, 1)),
             float_init("b3a", w(8, 8, 1, 1))]
    nodes = [
        mk("Conv", ["x", "stem"], ["s"], name="/stem", pads=[1, 1, 1, 1]),
        mk("Relu", ["s"], ["h"], name="/stem_relu"),
        mk("Conv", ["h", "b1a"], ["t1"], name="/b1/conv1", pads=[1, 1, 1, 1]),
        mk("Relu", ["t1"], ["t1r"], name="/b1/relu"),
        mk("Conv", ["t1r", "b1b"], ["t2"], name="/b1/conv2"),
        mk("BatchNormalization", ["t2", "bn_g", "bn_b", "bn_m", "bn_v"], ["t3"], name="/b1/bn"),
        mk("Add", ["h", "t3"], ["r1"], name="/b1/add"),
        # block 2: its inner tensor u1r is also a graph output (a side output): not a site
        mk("Conv", ["r1", "b2a"], ["u1"], name="/b2/conv1", pads=[1, 1, 1, 1]),
        mk("Relu", ["u1"], ["u1r"], name="/b2/relu"),
        mk("Conv", ["u1r", "b2b"], ["u2"], name="/b2/conv2"),
        mk("Add", ["u2", "r1"], ["r2"], name="/b2/add"),
        # a broadcast Add of a pooled tensor: shapes differ
        mk("GlobalAveragePool", ["r2"], ["p"], name="/pool"),
        mk("Conv", ["p", "b3a"], ["q"], name="/se"),
        mk("Add", ["r2", "q"], ["r3"], name="/bcast_add"),
        mk("Add", ["r3", "bias"], ["r4"], name="/bias_add"),
        mk("GlobalAveragePool", ["r4"], ["out"], name="/gap"),
    ]
    return make_model(nodes, {"x": [1, 3, 8, 8]}, ["out", "u1r"], inits)


def encoder(layers: int = 2, zero_last: bool = False, seq: int = 6, dim: int = 8, seed: int = 0) -> onnx.ModelProto:
    """A post-LN transformer built from plain ops: x -> LN -> [LN(h + Wo attn(h)) -> LN(y + W2 relu(W1 y))] * layers
    -> ReduceMean. Every LayerNorm has gamma 1, beta 0. zero_last: the last layer's Wo and W2 are
    zero, so that layer maps h to LN(LN(h)) = h (up to eps)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.normal(0, 1.0 / np.sqrt(shape[0]), shape)

    inits = [float_init("g", np.ones(dim)), float_init("b", np.zeros(dim))]
    nodes = [mk("LayerNormalization", ["x", "g", "b"], ["h0"], name="/emb/ln", axis=-1)]
    h = "h0"
    for i in range(layers):
        p = f"/layer.{i}"
        zero = zero_last and i == layers - 1
        for nm in ("wq", "wk", "wv", "wo", "w1", "w2"):
            shape = (dim, 2 * dim) if nm == "w1" else (2 * dim, dim) if nm == "w2" else (dim, dim)
            inits.append(float_init(f"{nm}{i}", np.zeros(shape) if zero and nm in ("wo", "w2") else w(*shape)))
        nodes += [
            mk("MatMul", [h, f"wq{i}"], [f"q{i}"], name=f"{p}/q"),
            mk("MatMul", [h, f"wk{i}"], [f"k{i}"], name=f"{p}/k"),
            mk("MatMul", [h, f"wv{i}"], [f"v{i}"], name=f"{p}/v"),
            mk("Transpose", [f"k{i}"], [f"kt{i}"], name=f"{p}/kt", perm=[0, 2, 1]),
            mk("MatMul", [f"q{i}", f"kt{i}"], [f"s{i}"], name=f"{p}/scores"),
            mk("Softmax", [f"s{i}"], [f"a{i}"], name=f"{p}/softmax", axis=-1),
            mk("MatMul", [f"a{i}", f"v{i}"], [f"c{i}"], name=f"{p}/context"),
            mk("MatMul", [f"c{i}", f"wo{i}"], [f"o{i}"], name=f"{p}/attn_out"),
            mk("Add", [f"o{i}", h], [f"r{i}"], name=f"{p}/attn_add"),
            mk("LayerNormalization", [f"r{i}", "g", "b"], [f"y{i}"], name=f"{p}/attn_ln", axis=-1),
            mk("MatMul", [f"y{i}", f"w1{i}"], [f"f{i}"], name=f"{p}/ffn1"),
            mk("Relu", [f"f{i}"], [f"fr{i}"], name=f"{p}/relu"),
            mk("MatMul", [f"fr{i}", f"w2{i}"], [f"f2{i}"], name=f"{p}/ffn2"),
            mk("Add", [f"y{i}", f"f2{i}"], [f"z{i}"], name=f"{p}/ffn_add"),
            mk("LayerNormalization", [f"z{i}", "g", "b"], [f"h{i + 1}"], name=f"{p}/out_ln", axis=-1),
        ]
        h = f"h{i + 1}"
    nodes.append(mk("ReduceMean", [h], ["out"], name="/pool", axes=[1], keepdims=0))
    return make_model(nodes, {"x": [1, seq, dim]}, ["out"], inits)


def _remove(loaded, *keys: str, passes=None):
    passes = passes or {"depth": DepthRemoval()}
    space = SearchSpace([s for p in passes.values() for s in p.sites(loaded.graph())])
    g = Genotype({k: "remove" for k in keys} | {s.key: s.exact_choice for s in space.sites if s.exact_choice})
    model, applied = materialize(loaded, space, g, passes, MoveContext(loaded.proto))
    onnx.checker.check_model(model, full_check=True)
    return model, applied


def _x(shape, seed=1):
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


# ------------------------------------------------------------------------------------ residual
def test_residual_sites_and_rejections_say_why():
    g = load_proto(resnet()).graph()
    sites = DepthRemoval().sites(g)
    assert [s.key for s in sites] == ["depth:/b1/add"]
    (s,) = sites
    assert s.choices == ("keep", "remove") and s.exact_choice is None
    assert set(s.nodes) == {"/b1/add", "/b1/conv1", "/b1/relu", "/b1/conv2", "/b1/bn"}
    assert s.cost == 2 * 64 * 8 * (8 * 9 + 8)  # the two convs' FLOPs
    why = dict(DepthRemoval().rejections(g))
    assert "u1r is a graph output" in why["/b2/add"]
    assert "differ in shape [1, 8, 8, 8] vs [1, 8, 1, 1]" in why["/bcast_add"]
    assert "/bias_add" not in why  # a constant bias is not a near miss


@pytest.mark.parametrize("zero", [True, False])
def test_removing_a_residual_block(zero):
    """Exact against onnxruntime on the original when the branch computes 0; different otherwise."""
    loaded = load_proto(resnet(zero_branch=zero))
    model, applied = _remove(loaded, "depth:/b1/add")
    assert applied == {"depth:/b1/add": "applied"}
    ops = [n.name for n in model.graph.node]
    assert not any(n.startswith("/b1/") for n in ops) and "/b2/conv1" in ops
    x = _x((1, 3, 8, 8))
    got = run_ort_unoptimized(model, {"x": x})
    ref = run_ort_unoptimized(loaded.proto, {"x": x})
    assert [a.shape for a in got] == [a.shape for a in ref]
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(got, ref))
    if zero:
        assert err < 1e-5, err
    else:
        assert err > 1e-2, err


def test_removal_after_conv_bn_fusion_still_applies():
    """conv_bn (stage 10) rewrites nodes inside the branch first; depth matches again from the Add."""
    loaded = load_proto(resnet(zero_branch=True))
    model, applied = _remove(loaded, "depth:/b1/add", passes={"conv_bn": ConvBnFusion(), "depth": DepthRemoval()})
    assert applied["depth:/b1/add"] == "applied" and applied["conv_bn:/b1/bn"] == "applied"
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    x = _x((1, 3, 8, 8), 2)
    np.testing.assert_allclose(run_ort_unoptimized(model, {"x": x})[0], run_ort_unoptimized(loaded.proto, {"x": x})[0],
                               atol=1e-5)


def test_residual_output_that_is_a_graph_output_keeps_its_name():
    inits = [float_init("w", np.zeros((4, 4, 1, 1)))]
    nodes = [mk("Relu", ["x"], ["h"], name="/pre"), mk("Conv", ["h", "w"], ["c"], name="/blk/conv"),
             mk("Add", ["h", "c"], ["y"], name="/blk/add")]
    loaded = load_proto(make_model(nodes, {"x": [1, 4, 5, 5]}, ["y"], inits))
    model, _ = _remove(loaded, "depth:/blk/add")
    assert [o.name for o in model.graph.output] == ["y"]
    assert [n.op_type for n in model.graph.node] == ["Relu", "Identity"]
    x = _x((1, 4, 5, 5))
    np.testing.assert_allclose(run_ort_unoptimized(model, {"x": x})[0], np.maximum(x, 0), atol=0)


# --------------------------------------------------------------------------------- transformer
def test_encoder_layers_are_sites_and_their_post_ln_adds_are_not():
    g = load_proto(encoder(layers=3)).graph()
    sites = DepthRemoval().sites(g)
    assert [s.key for s in sites] == [f"depth:/layer.{i}/out_ln" for i in range(3)]
    assert all(len(s.nodes) == 15 and "encoder layer /layer.0" in sites[0].note for s in sites)
    why = dict(DepthRemoval().rejections(g))
    assert "post-LN residual" in why["/layer.1/attn_add"] and "/layer.1/out_ln is the site" in why["/layer.1/attn_add"]
    assert "/layer.1/ffn_add" in why


@pytest.mark.parametrize("zero", [True, False])
def test_removing_an_encoder_layer(zero):
    """A last layer whose branches compute 0 maps h to LN(LN(h)) = h: removing it is exact up to
    the LayerNorm epsilon; with live weights the output changes."""
    loaded = load_proto(encoder(layers=2, zero_last=zero))
    model, applied = _remove(loaded, "depth:/layer.1/out_ln")
    assert applied == {"depth:/layer.1/out_ln": "applied"}
    names = [n.name for n in model.graph.node]
    assert not any(n.startswith("/layer.1/") for n in names) and "/layer.0/out_ln" in names
    x = _x((1, 6, 8))
    got, ref = run_ort_unoptimized(model, {"x": x})[0], run_ort_unoptimized(loaded.proto, {"x": x})[0]
    assert got.shape == ref.shape == (1, 8)
    err = float(np.max(np.abs(got - ref)))
    assert (err < 1e-4) if zero else (err > 1e-2), err


def test_two_layers_removed_read_the_embedding():
    loaded = load_proto(encoder(layers=3))
    model, applied = _remove(loaded, "depth:/layer.0/out_ln", "depth:/layer.1/out_ln")
    assert set(applied.values()) == {"applied"}
    first = next(n for n in model.graph.node if n.name == "/layer.2/q")
    assert first.input[0] == "h0"


# ------------------------------------------------------------------------------ bundled models
def _flops(proto) -> int:
    from graphopt.reporting.analysis import analyze

    return analyze(proto).total_flops


@pytest.mark.parametrize("name,count,kind", [("efficientnet_lite0", 9, "residual block"),
                                             ("minilm", 6, "encoder layer")])
def test_bundled_models(name, count, kind):
    """EfficientNet-Lite0's 9 stride-1 MBConv blocks with a skip; MiniLM's 6 encoder layers.
    Removing one lowers the FLOPs by about the block's cost and the model still runs."""
    from graphopt.modelio.ir import load_model

    path = ROOT / "models" / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not built")
    base = load_model(path)
    sites = DepthRemoval().sites(base.graph())
    assert len(sites) == count and all(kind in s.note for s in sites)
    site = max(sites, key=lambda s: s.cost)
    model, applied = _remove(base, site.key)
    assert applied == {site.key: "applied"}
    before, after = _flops(base.proto), _flops(model)
    assert 0.5 * site.cost < before - after < 1.5 * site.cost + 0.02 * before, (before, after, site.cost)


def test_repair_refits_the_layer_that_reads_the_removed_block():
    """Opt-in (depth_repair): with calibration data, /b2/conv1 (reads the removed block's output) is
    refit to compute from x what it computed from x + f(x): its output u1r gets closer to the
    original's on new inputs."""
    loaded = load_proto(resnet(seed=3))
    passes = {"depth": DepthRemoval()}
    space = SearchSpace(DepthRemoval().sites(loaded.graph()))
    g = Genotype({"depth:/b1/add": "remove"})
    calib = np.random.default_rng(7).normal(0, 1, (16, 1, 3, 8, 8)).astype(np.float32)
    err = {}
    for repair in (False, True):
        model, _ = materialize(loaded, space, g, passes,
                               MoveContext(loaded.proto, {"x": calib}, {"repair": repair, "depth_repair": repair}))
        onnx.checker.check_model(model, full_check=True)
        refit = [t.name for t in model.graph.initializer if "depth_refit" in t.name]
        assert bool(refit) == repair
        err[repair] = np.mean([np.linalg.norm(run_ort_unoptimized(model, {"x": x})[1]
                                              - run_ort_unoptimized(loaded.proto, {"x": x})[1])
                               for x in (_x((1, 3, 8, 8), 100 + i) for i in range(6))])
    assert err[True] < 0.5 * err[False], err


def test_repair_is_off_by_default():
    loaded = load_proto(resnet(seed=3))
    space = SearchSpace(DepthRemoval().sites(loaded.graph()))
    calib = np.random.default_rng(7).normal(0, 1, (16, 1, 3, 8, 8)).astype(np.float32)
    model, _ = materialize(loaded, space, Genotype({"depth:/b1/add": "remove"}), {"depth": DepthRemoval()},
                           MoveContext(loaded.proto, {"x": calib}, {"repair": True}))
    assert not [t.name for t in model.graph.initializer if "depth_refit" in t.name]
