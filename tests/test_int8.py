"""passes/int8.py: static QDQ quantization per node or whole model, through materialize."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import float_init, make_model
from graphopt.passes.int8 import GLOBAL_KEY, Int8Quantize, quantize
from onnx import helper

from graphopt.driver import materialize
from graphopt.errors import UsageError
from graphopt.genotype import Genotype, SearchSpace
from graphopt.modelio.ir import load_proto
from graphopt.plugin import MoveContext
from graphopt.registry import PASSES


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,16,16] -> Conv -> Relu -> Conv -> Relu -> GAP -> Flatten -> Gemm -> y[1,10]."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1)]
    inits = [float_init("w0", rng.standard_normal((16, 3, 3, 3)) * 0.3), float_init("b0", rng.standard_normal(16) * 0.1),
             float_init("w1", rng.standard_normal((16, 16, 3, 3)) * 0.1), float_init("b1", rng.standard_normal(16) * 0.1),
             float_init("wg", rng.standard_normal((10, 16)) * 0.3), float_init("bg", rng.standard_normal(10) * 0.1)]
    return make_model(nodes, {"x": [1, 3, 16, 16]}, ["y"], inits)


def _data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def setup():
    base = load_proto(conv_net())
    p = Int8Quantize()
    space = SearchSpace(p.sites(base.graph()))
    ctx = MoveContext(base_model=base.proto, calibration={"x": _data(8, 1)})
    return base, p, space, ctx


def _run(model: onnx.ModelProto, x: np.ndarray, opt_path: str | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    if opt_path:
        so.optimized_model_filepath = opt_path
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _quantized_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of Conv/MatMul/Gemm nodes whose data input (0) and weight (1) come from DequantizeLinear
    (a float node after a quantized node's Relu reads a dequantized input too, with float weights)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return {n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
            and all(producer.get(n.input[i]) is not None and producer[n.input[i]].op_type == "DequantizeLinear"
                    for i in (0, 1))}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_registered():
    assert PASSES.get("int8") is Int8Quantize


def test_sites(setup):
    _, _, space, _ = setup
    keys = [s.key for s in space.sites]
    assert keys == ["int8:conv0", "int8:conv1", "int8:fc", GLOBAL_KEY]
    assert space.site("int8:conv1").choices == ("keep", "int8")
    assert space.site(GLOBAL_KEY).choices == ("keep", "all")
    assert space.site("int8:conv1").cost == 2.0 * 16 * 16 * 16 * 16 * 9


def test_only_chosen_nodes_are_quantized(setup):
    base, p, space, ctx = setup
    model, applied = materialize(base, space, Genotype({"int8:conv1": "int8"}), {"int8": p}, ctx)
    assert applied == {"int8:conv1": "applied"}
    onnx.checker.check_model(model, full_check=True)
    assert _quantized_nodes(model) == {"conv1"}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 1 and "DequantizeLinear" in ops
    # the weight of conv1 is stored as int8 with a per-channel scale
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    w1 = [v for k, v in inits.items() if k.startswith("w1") and v.dtype == np.int8 and v.ndim == 4]
    assert len(w1) == 1 and w1[0].shape == (16, 16, 3, 3)
    assert not any(k.startswith("w0") and v.dtype == np.int8 and v.ndim == 4 for k, v in inits.items())


def test_ort_runs_integer_kernels(setup, tmp_path):
    base, p, space, ctx = setup
    model, _ = materialize(base, space, Genotype({"int8:conv0": "int8", "int8:conv1": "int8"}), {"int8": p}, ctx)
    opt = tmp_path / "opt.onnx"
    _run(model, _data(1, 2)[0], str(opt))
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert ops.count("QLinearConv") == 2, ops
    assert "Conv" not in ops


def test_whole_model_fidelity(setup):
    """Whole-model int8 vs fp32 on held-out inputs: cosine >= 0.995 and max abs error within
    5% of the output range (measured: cosine ~0.9999)."""
    base, p, space, ctx = setup
    model, applied = materialize(base, space, Genotype({GLOBAL_KEY: "all"}), {"int8": p}, ctx)
    assert applied == {GLOBAL_KEY: "applied"}
    assert _quantized_nodes(model) == {"conv0", "conv1", "fc"}
    for x in _data(4, 3):
        ref, got = _run(base.proto, x), _run(model, x)
        assert _cosine(ref, got) >= 0.995
        assert np.abs(ref - got).max() <= 0.05 * (ref.max() - ref.min())


def test_move_on_a_removed_node_does_not_apply(setup):
    base, p, space, ctx = setup
    g = base.graph()
    conv = next(n for n in g.nodes if n.name == "conv1")
    conv.name = "renamed"
    assert p.apply(g, space.site("int8:conv1"), "int8", ctx) is False
    with pytest.raises(ValueError, match="not 'int8'"):
        p.apply(g, space.site("int8:conv0"), 0.5, ctx)


def test_options_are_checked(setup):
    base, _, _, ctx = setup
    with pytest.raises(UsageError, match="int8_activations"):
        quantize(base.proto, dict(ctx.calibration), ["conv0"], activations="int4")
    with pytest.raises(UsageError, match="--data"):
        quantize(base.proto, {}, ["conv0"])
    with pytest.raises(UsageError, match=r"no array for input\(s\) \['x'\]"):
        quantize(base.proto, {"other": ctx.calibration["x"]}, ["conv0"])


def test_int8_activations_option(setup):
    base, _, _, ctx = setup
    def activation_zero_points(q):  # activations: per tensor (scalar); weights: per channel
        zps = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("zero_point")}
        return {k: z for k, z in zps.items() if z.ndim == 0}

    q = quantize(base.proto, dict(ctx.calibration), ["conv0"], activations="int8", reduce_range=False)
    act_zps = activation_zero_points(q)
    # conv0's input and output; the output Q sits after conv0's Relu (quantized with it, _int8_prep)
    assert {"x_zero_point", "r0_zero_point"} <= set(act_zps), sorted(act_zps)
    assert all(z.dtype == np.int8 for z in act_zps.values())
    q = quantize(base.proto, dict(ctx.calibration), ["conv0"], activations="uint8", reduce_range=False)
    act_zps = activation_zero_points(q)
    assert {"x_zero_point", "r0_zero_point"} <= set(act_zps), sorted(act_zps)
    assert all(z.dtype == np.uint8 for z in act_zps.values())


def _scale(model: onnx.ModelProto, name: str) -> float:
    return float(next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name))


def test_calibration_is_cached(setup, tmp_path):
    """The second quantize of the same graph and data reads the ranges the first one calibrated:
    the cache file is edited in between, and the second model's input scale follows the edit."""
    import json

    base, _, _, ctx = setup
    a = quantize(base.proto, dict(ctx.calibration), ["conv0"], cache_dir=tmp_path, reduce_range=False)
    (cache,) = tmp_path.glob("ranges-*.json")
    ranges = json.loads(cache.read_text())
    x = ranges["data"]["x"]
    lo, hi = x["lowest"]["data"][0], x["highest"]["data"][0]
    assert _scale(a, "x_scale") == pytest.approx((hi - lo) / 255, rel=1e-5)  # uint8, asymmetric: the range / 255
    x["lowest"]["data"], x["highest"]["data"] = [-100.0], [155.0]
    cache.write_text(json.dumps(ranges))
    b = quantize(base.proto, dict(ctx.calibration), ["conv0", "conv1"], cache_dir=tmp_path, reduce_range=False)
    assert _scale(b, "x_scale") == pytest.approx(1.0, rel=1e-5)  # (155 - -100) / 255: the edited range was read
    assert list(tmp_path.glob("ranges-*.json")) == [cache]
    assert _quantized_nodes(a) == {"conv0"} and _quantized_nodes(b) == {"conv0", "conv1"}
    # other data: its own ranges, calibrated anew
    c = quantize(base.proto, {"x": _data(8, 2)}, ["conv0"], cache_dir=tmp_path, reduce_range=False)
    assert len(list(tmp_path.glob("ranges-*.json"))) == 2 and _scale(c, "x_scale") < 0.1
    # the input model is never edited (quantize_static re-saves a ModelProto it is given in place)
    onnx.checker.check_model(base.proto, full_check=True)
    assert all(not i.external_data for i in base.proto.graph.initializer)


# ------------------------------------------------------------------------------ dynamic int8
def mlp(seed: int = 0) -> onnx.ModelProto:
    """x[1,8,32] -> MatMul -> Add -> Relu -> MatMul -> Add -> y[1,8,16]; the second layer's input has
    a few outlier channels (as after GELU in a transformer)."""
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((32, 64)) * 0.2
    w0[:, :3] *= 20.0  # outlier channels
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["m0"], name="mm0"),
             helper.make_node("Add", ["m0", "b0"], ["a0"], name="add0"),
             helper.make_node("Relu", ["a0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["y"], name="add1")]
    inits = [float_init("w0", w0), float_init("b0", rng.standard_normal(64) * 0.1),
             float_init("w1", rng.standard_normal((64, 16)) * rng.uniform(0.01, 1.0, (1, 16))),
             float_init("b1", rng.standard_normal(16) * 0.1)]
    return make_model(nodes, {"x": [1, 8, 32]}, ["y"], inits)


@pytest.fixture(scope="module")
def mlp_setup():
    base = load_proto(mlp())
    p = Int8Quantize()
    space = SearchSpace(p.sites(base.graph()))
    x = np.random.default_rng(3).standard_normal((8, 1, 8, 32)).astype(np.float32)
    return base, p, space, MoveContext(base_model=base.proto, calibration={"x": x})


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_dynamic_choices_only_for_matmul(setup, mlp_setup):
    _, _, space, _ = setup
    assert space.site("int8:conv1").choices == ("keep", "int8")  # dynamic Conv (ConvInteger) is not offered
    assert space.site("int8:fc").choices == ("keep", "int8")
    _, _, mspace, _ = mlp_setup
    assert mspace.site("int8:mm0").choices == ("keep", "int8", "dynamic")
    assert mspace.site(GLOBAL_KEY).choices == ("keep", "all", "dynamic")


def test_dynamic_per_node_is_integer_per_channel_and_close(mlp_setup):
    base, p, space, ctx = mlp_setup
    model, applied = materialize(base, space, Genotype({"int8:mm1": "dynamic"}), {"int8": p}, ctx)
    assert applied == {"int8:mm1": "applied"}
    onnx.checker.check_model(model)
    ops = _ops(model)
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops and ops.count("MatMul") == 1  # mm0 stays float
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    w1q = [v for v in inits.values() if v.dtype == np.int8 and v.shape == (64, 16)]
    assert len(w1q) == 1
    scales = [v for k, v in inits.items() if "scale" in k and v.size == 16]
    assert scales, "per-channel weights: one scale per output column"
    x = np.random.default_rng(9).standard_normal((1, 8, 32)).astype(np.float32)
    assert _cosine(_run(base.proto, x), _run(model, x)) >= 0.999


def test_per_channel_dynamic_beats_per_tensor_on_uneven_columns(mlp_setup, tmp_path):
    """Why dynamic int8 uses per-channel weights (7-bit on x86 without VNNI, like static): columns
    of very different scale. (Per-channel at full 8 bits was 3x worse than stock here: u8s8 saturation.)"""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    base, p, space, ctx = mlp_setup
    ours, _ = materialize(base, space, Genotype({GLOBAL_KEY: "dynamic"}), {"int8": p}, ctx)
    src = tmp_path / "m.onnx"
    onnx.save(base.proto, src)
    quantize_dynamic(src, tmp_path / "stock.onnx", weight_type=QuantType.QInt8)  # ORT's default recipe
    stock = onnx.load(tmp_path / "stock.onnx")
    x = np.random.default_rng(11).standard_normal((1, 8, 32)).astype(np.float32)
    ref = _run(base.proto, x)
    err_ours = float(np.abs(_run(ours, x) - ref).max())
    err_stock = float(np.abs(_run(stock, x) - ref).max())
    assert err_ours < err_stock, (err_ours, err_stock)


def test_static_and_dynamic_mixed(mlp_setup):
    base, p, space, ctx = mlp_setup
    model, _ = materialize(base, space, Genotype({"int8:mm0": "int8", "int8:mm1": "dynamic"}), {"int8": p}, ctx)
    onnx.checker.check_model(model)
    ops = _ops(model)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops  # mm0 static QDQ
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops  # mm1 dynamic
    x = np.random.default_rng(10).standard_normal((1, 8, 32)).astype(np.float32)
    assert _cosine(_run(base.proto, x), _run(model, x)) >= 0.99


def test_global_dynamic_quantizes_fused_attention():
    """int8:*=dynamic after the attention pass: com.microsoft.Attention becomes QAttention."""
    from test_attention import _apply, _ctx, _padded_feeds, _run as run_feeds, padded_model

    base = load_proto(padded_model())
    calib = _padded_feeds(6)
    fused, _ = _apply(base, "fused", _ctx(base, calib))
    fb = load_proto(fused)
    p = Int8Quantize()
    space = SearchSpace(p.sites(fb.graph()))
    model, _ = materialize(fb, space, Genotype({GLOBAL_KEY: "dynamic"}), {"int8": p},
                           MoveContext(base_model=fb.proto, calibration=calib))
    onnx.checker.check_model(model)
    ops = _ops(model)
    assert "QAttention" in ops and "Attention" not in ops and "MatMulInteger" in ops
    feeds = {k: v[2] for k, v in _padded_feeds(3, seed=5).items()}
    assert _cosine(run_feeds(base.proto, feeds), run_feeds(model, feeds)) >= 0.99
