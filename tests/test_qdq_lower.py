"""targets/qdq_lower.py: QDQ conv2d/matmul lowered to integer ops in Relax, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import float_init, make_model, run_ort_unoptimized
from onnx import helper

pytest.importorskip("tvm")

from graphopt.passes.int8 import quantize
from graphopt.targets import tvm_common as tc
from graphopt.targets.qdq_lower import _requantize_folded, lower_qdq


def tiny_net(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,12,12] -> Conv 3x3 (pad 1) -> Relu -> depthwise Conv 3x3 (pad 1, stride 2) -> GAP -> Flatten
    -> MatMul [8,16] -> Gemm (transB) [10,16] -> y[1,10]."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="dw1", pads=[1, 1, 1, 1], strides=[2, 2],
                              group=8),
             helper.make_node("GlobalAveragePool", ["c1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "wm"], ["m"], name="mm"),
             helper.make_node("Gemm", ["m", "wg", "bg"], ["y"], name="fc", transB=1)]
    inits = [float_init("w0", rng.standard_normal((8, 3, 3, 3)) * 0.3), float_init("b0", rng.standard_normal(8) * 0.1),
             float_init("w1", rng.standard_normal((8, 1, 3, 3)) * 0.3), float_init("b1", rng.standard_normal(8) * 0.1),
             float_init("wm", rng.standard_normal((8, 16)) * 0.3),
             float_init("wg", rng.standard_normal((10, 16)) * 0.3), float_init("bg", rng.standard_normal(10) * 0.1)]
    return make_model(nodes, {"x": [1, 3, 12, 12]}, ["y"], inits)


def _calib(n: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 1, 3, 12, 12)).astype(np.float32)}


@pytest.fixture(scope="module", params=["uint8", "int8"])
def qdq(request) -> onnx.ModelProto:
    # reduce_range off: 8-bit weights, the plain int8 x int8 -> int32 case (TVM has no int16 saturation)
    return quantize(tiny_net(), _calib(), None, activations=request.param, reduce_range=False)


def _ort_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """ONNX QDQ semantics evaluated exactly: onnxruntime with graph optimizations off (no QLinear
    fusion, so no int16-saturating AVX2 kernels; see passes/int8.py)."""
    return run_ort_unoptimized(model, {"x": x})[0]


def _output_scale(model: onnx.ModelProto) -> float:
    """Scale of the last QuantizeLinear (the graph output's)."""
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][-1]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return float(inits[q.input[1]])


def _calls(mod):
    """(op name, [arg dtypes], out dtype) of every call in main's dataflow block."""
    from graphopt.targets.qdq_lower import _dtype

    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if hasattr(v, "op") and hasattr(v.op, "name"):
                args = [_dtype(a) if hasattr(a, "ty") or hasattr(a, "struct_info") else None for a in v.args]
                out.append((v.op.name, args, _dtype(b.var)))
    return out


def test_lowered_relax_has_integer_conv_and_matmul(qdq):
    mod = tc.import_onnx(qdq, lower_int8=False)
    fake = _calls(mod)
    assert [c for c in fake if c[0] in ("relax.nn.conv2d", "relax.matmul") and c[2] == "int32"] == []

    low, stats = lower_qdq(mod)
    assert stats["conv2d"] == 2 and stats["matmul"] == 2, stats
    assert stats["skipped"] == {}
    act = qdq.graph.node[[n.op_type for n in qdq.graph.node].index("QuantizeLinear")]
    act_dtype = {"uint8": "uint8", "int8": "int8"}[_act_dtype(qdq, act)]
    calls = _calls(low)
    convs = [c for c in calls if c[0] == "relax.nn.conv2d"]
    mms = [c for c in calls if c[0] == "relax.matmul"]
    assert len(convs) == 2 and len(mms) == 2
    for _, args, out in convs + mms:
        assert args == [act_dtype, "int8"] and out == "int32"
    # the weights' dequantize is gone; what remains dequantizes activations and the int32 biases
    assert sum(c[0] == "relax.dequantize" for c in calls) < sum(c[0] == "relax.dequantize" for c in fake)


def _act_dtype(model, qnode) -> str:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return str(inits[qnode.input[2]].dtype)


def test_tir_kernels_take_int8_and_accumulate_in_int32(qdq):
    from tvm import relax, tirx

    low, _ = lower_qdq(tc.import_onnx(qdq, lower_int8=False))
    legal = relax.transform.LegalizeOps()(low)
    kinds = {}
    for gv, f in legal.functions.items():
        if not isinstance(f, tirx.PrimFunc):
            continue
        dtypes = [str(p.dtype) for p in f.params]  # TVM 0.27: PrimFunc params are the buffers
        kinds[gv.name_hint] = dtypes
    int_convs = [n for n, d in kinds.items() if "conv2d" in n and d[-1] == "int32" and d[0] in ("int8", "uint8")]
    int_mms = [n for n, d in kinds.items() if "matmul" in n and d[-1] == "int32" and d[0] in ("int8", "uint8")]
    assert len(int_convs) >= 1 and len(int_mms) >= 1, kinds
    assert not [n for n, d in kinds.items() if ("conv2d" in n or "matmul" in n) and "float32" in d], kinds


def test_compiled_int8_matches_onnxruntime(qdq):
    """Tolerance: 2 steps of the output's quantization scale (the result is requantized; a 1-step
    flip from rounding a tie or float summation order may propagate once)."""
    tvm = tc.load_tvm()
    tgt = tvm.target.Target({"kind": "llvm"})
    mod = tc.import_onnx(qdq)  # lower_int8 on by default
    assert "int32" in mod.script(show_meta=False)
    ex = tc.build(mod, tgt)
    step = _output_scale(qdq)
    xs = _calib(3, seed=7)["x"]
    for x in xs:
        ref = _ort_reference(qdq, x)
        got = tc.run_vm(ex, tvm.cpu(), [x])[0]
        assert np.abs(got - ref).max() <= 2 * step + 1e-6, (np.abs(got - ref).max(), step)


def test_fp32_model_is_left_alone():
    mod = tc.import_onnx(tiny_net())
    low, stats = lower_qdq(mod)
    assert stats == {"conv2d": 0, "matmul": 0, "packed": 0, "skipped": {}}
    assert low.same_as(mod)


def test_requantize_folded_weight():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    q[:, 0, 0, 0] = 127  # onnxruntime's symmetric scale: max |W| per channel / 127
    s = rng.uniform(0.001, 0.05, size=4)
    w = (q.astype(np.float64) * s.reshape(-1, 1, 1, 1)).astype(np.float32)
    got = _requantize_folded(w, 0)
    assert got is not None
    np.testing.assert_array_equal(got[0], q)
    np.testing.assert_allclose(got[1][:, 0, 0, 0], s, rtol=1e-6)
    assert _requantize_folded(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), 0) is None


def test_folded_weights_are_lowered_too(qdq):
    """A module whose weight dequantize was constant-folded to float (FoldConstant) still gets
    integer kernels: the int8 weights are recovered from the float grid."""
    from tvm import relax

    mod = tc.import_onnx(qdq, lower_int8=False)
    folded = relax.transform.FoldConstant()(mod)
    assert "R.dequantize(metadata" not in folded.script(show_meta=False)
    low, stats = lower_qdq(folded)
    assert stats["conv2d"] == 2 and stats["matmul"] == 2, stats
    tvm = tc.load_tvm()
    ex = tc.build(low, tvm.target.Target({"kind": "llvm"}))
    x = _calib(1, seed=9)["x"][0]
    assert np.abs(tc.run_vm(ex, tvm.cpu(), [x])[0] - _ort_reference(qdq, x)).max() <= 2 * _output_scale(qdq) + 1e-6


def test_quantized_pad_value_imports():
    """onnxruntime's static quantizer quantizes a Pad's constant_value too (EfficientNet-Lite0's
    static padding): graphopt.modelio.ir.fold_constants replaces DequantizeLinear(constant) there by its
    float value, so TVM's importer (which needs a constant) takes the model, with the same numbers."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Constant", [], ["pv"], name="padval", value=onnx.numpy_helper.from_array(
                 np.array(0.0, np.float32))),
             helper.make_node("Pad", ["x", "pads", "pv"], ["p"], name="pad", mode="constant"),
             helper.make_node("Conv", ["p", "w0", "b0"], ["y"], name="conv0")]
    inits = [onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
             float_init("w0", rng.standard_normal((4, 3, 3, 3)) * 0.3), float_init("b0", rng.standard_normal(4) * 0.1)]
    qdq = quantize(make_model(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits), _calib_shape((1, 3, 8, 8)), None,
                   activations="uint8", reduce_range=False)
    producers = {o: n for n in qdq.graph.node for o in n.output}
    pad = next(n for n in qdq.graph.node if n.op_type == "Pad")
    assert producers[pad.input[2]].op_type == "DequantizeLinear"  # what the importer could not take
    from graphopt.modelio.ir import fold_constants

    folded = fold_constants(qdq)
    pad = next(n for n in folded.graph.node if n.op_type == "Pad")
    assert pad.input[2] in {i.name for i in folded.graph.initializer}
    tvm = tc.load_tvm()
    ex = tc.build(tc.import_onnx(qdq), tvm.target.Target({"kind": "llvm"}))
    x = np.abs(np.random.default_rng(5).standard_normal((1, 3, 8, 8))).astype(np.float32)
    np.testing.assert_allclose(tc.run_vm(ex, tvm.cpu(), [x])[0], _ort_reference(qdq, x), rtol=0,
                               atol=2 * _output_scale(qdq) + 1e-6)


def _calib_shape(shape, n: int = 8) -> dict[str, np.ndarray]:
    return {"x": np.abs(np.random.default_rng(2).standard_normal((n, *shape))).astype(np.float32)}
