"""targets/int8_nhwc.py: lowered int8 (QDQ) models compiled in NHWC with no transposes between layers.

Checked on an inverted-residual block built in code (1x1 expand, padded depthwise 3x3 with a
ReLU6, 1x1 project, residual add, pooled classifier), static int8 with uint8 activations (non-zero
zero points, so the padded conv takes the shifted-input path) and int8 activations: the NHWC module
has no quantize/dequantize left, at most the model's own edge transposes, every 1x1 conv packed; it
computes exactly what the NCHW lowering computes and onnxruntime's QDQ reference; and the x86
target compiles it with `layout=nhwc`.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from conftest import float_init, make_model
from onnx import helper

pytest.importorskip("tvm")

from graphopt.passes.int8 import quantize
from graphopt.targets import int8_nhwc, tvm_prep
from graphopt.targets import tvm_common as tc


def block_net(seed: int = 0) -> onnx.ModelProto:
    """x[1,8,10,10] -> 1x1 (8->24) -> Relu -> dw 3x3 pad 1 -> Clip(0,6) -> 1x1 (24->8) -> + x -> GAP
    -> Flatten -> MatMul [8,5] -> y[1,5]."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="expand"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="dw", pads=[1, 1, 1, 1], group=24),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="project"),
             helper.make_node("Add", ["c2", "x"], ["s"], name="residual"),
             helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "wm"], ["y"], name="fc")]
    inits = [float_init("w0", rng.standard_normal((24, 8, 1, 1)) * 0.3), float_init("b0", rng.standard_normal(24) * 0.1),
             float_init("w1", rng.standard_normal((24, 1, 3, 3)) * 0.3), float_init("b1", rng.standard_normal(24) * 0.1),
             float_init("w2", rng.standard_normal((8, 24, 1, 1)) * 0.2), float_init("b2", rng.standard_normal(8) * 0.1),
             float_init("wm", rng.standard_normal((8, 5)) * 0.3), float_init("lo", 0.0), float_init("hi", 6.0)]
    return make_model(nodes, {"x": [1, 8, 10, 10]}, ["y"], inits)


def _calib(n: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 1, 8, 10, 10)).astype(np.float32)}


@pytest.fixture(scope="module", params=["uint8", "int8"])
def qdq(request) -> onnx.ModelProto:
    return quantize(block_net(), _calib(), None, activations=request.param, reduce_range=False)


def _ort_qdq(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime's QDQ reference (graph optimizations off), as tests/test_x86_int8.py computes it."""
    from test_x86_int8 import _ort_qdq as ort_qdq

    return ort_qdq(model, {"x": x})


def test_nhwc_int8_has_no_transposes_between_layers_and_is_exact(qdq):
    tvm = tc.load_tvm()
    llvm = tvm.target.Target({"kind": "llvm"})
    kernels = "vnni"  # the lowering only: untuned code runs on any CPU
    nchw = tc.import_onnx(qdq, int8_kernels=kernels)
    mod, stats = int8_nhwc.convert(tc.import_onnx(qdq, int8_kernels=kernels, int8_nhwc=True), kernels,
                                   lambda m: tvm_prep.convert_layout(m, "nhwc", llvm))
    text = mod["main"].script(show_meta=False)
    assert "R.quantize" not in text and "R.dequantize" not in text and "R.nn.pad" not in text
    assert stats["packed"] == 2 and stats["decomposed"] > 0, stats  # expand and project
    # only at the model's edges: its input (quantized for the expand conv, float for the residual add)
    # and the pooled 1x1 head before Flatten; none between the layers (NCHW: two per packed conv)
    assert len(re.findall(r"R\.permute_dims\(", text)) <= 3, text
    assert len(re.findall(r"R\.permute_dims\(", nchw["main"].script(show_meta=False))) >= 4
    assert len(re.findall(r'data_layout="NHWC"', text)) == 1  # the depthwise conv, in NHWC
    ex_nchw, ex_nhwc = tc.build(nchw, llvm), tc.build(mod, llvm)
    for x in _calib(3, seed=7)["x"]:
        got = tc.run_vm(ex_nhwc, tvm.cpu(), [x])[0]
        np.testing.assert_array_equal(got, tc.run_vm(ex_nchw, tvm.cpu(), [x])[0])
        np.testing.assert_allclose(got, _ort_qdq(qdq, x), rtol=0, atol=1e-5)


def test_convert_layout_routes_integer_modules_only():
    """tvm_prep.convert_layout sends a lowered int8 module to int8_nhwc when given int8_kernels, and a
    float module through plain ConvertLayout (its R.nn.conv2d in NHWC, no packing)."""
    from conftest import conv_bn_model

    tvm = tc.load_tvm()
    llvm = tvm.target.Target({"kind": "llvm"})
    fp = tvm_prep.convert_layout(tc.import_onnx(conv_bn_model()), "nhwc", llvm, int8_kernels="vnni")
    assert "packed_int8_matmul" not in fp.script(show_meta=False)
    assert 'data_layout="NHWC"' in fp["main"].script(show_meta=False)
    q = quantize(block_net(), _calib(), None, activations="uint8", reduce_range=False)
    lowered = tc.import_onnx(q, int8_kernels="vnni", int8_nhwc=True)
    routed = tvm_prep.convert_layout(lowered, "nhwc", llvm, int8_kernels="vnni")["main"].script(show_meta=False)
    plain = tvm_prep.convert_layout(lowered, "nhwc", llvm)["main"].script(show_meta=False)  # no int8_kernels
    assert "R.quantize" not in routed and "R.quantize" in plain  # int8_nhwc made them elementwise
    assert routed.count("R.nn.conv2d(") == 1 and plain.count("R.nn.conv2d(") == 3  # and packed the two 1x1


def test_x86_target_compiles_int8_in_nhwc(tmp_path):
    from graphopt.targets.x86 import X86Target

    q = quantize(block_net(), _calib(), None, activations="uint8", reduce_range=False)
    t = X86Target(trials=0, threads=1, layout="nhwc")
    assert t.layout_for(q) == "nhwc"
    text = t.relax_module(q)["main"].script(show_meta=False)
    assert "packed_int8_matmul" in text and "R.quantize" not in text
    art = t.compile(q, tmp_path)
    x = _calib(1, seed=9)["x"][0]
    np.testing.assert_allclose(t.run_once(art, {"x": x})[0], _ort_qdq(q, x), rtol=0, atol=1e-5)
