"""targets/tvm_prep.py: the TVM CPU targets fold BatchNormalization and zero Pads into the convs
before import (as onnxruntime does), exactly; `canonicalize=0` imports the graph as it is."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt.errors import UsageError
from tests.test_int8_prep import conv_bn_net


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def test_canonicalize_folds_bn_and_pad_and_keeps_the_input():
    from graphopt.targets.tvm_prep import canonicalize

    model = conv_bn_net()
    before = model.SerializeToString()
    out, info = canonicalize(model)
    assert info == {"bn_folded": 2, "pads_folded": 1}
    assert [n.op_type for n in out.graph.node] == ["Conv", "Clip", "Conv", "Clip"]
    assert model.SerializeToString() == before  # the input model is not modified
    onnx.checker.check_model(out)
    x = np.random.default_rng(3).standard_normal((1, 8, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(_ort(out, x), _ort(model, x), rtol=1e-4, atol=1e-4)


def test_nonzero_pad_is_not_folded():
    from graphopt.targets.tvm_prep import canonicalize

    out, info = canonicalize(conv_bn_net(pad_value=1.0))
    assert info == {"bn_folded": 2, "pads_folded": 0}
    assert [n.op_type for n in out.graph.node].count("Pad") == 1


@pytest.mark.parametrize("canon", [True, False])
def test_x86_compile_matches_onnxruntime_with_and_without(canon, tmp_path):
    from graphopt.targets import tuning
    from graphopt.targets.x86 import X86Target

    model = conv_bn_net()
    t = X86Target(threads=1, trials=0, canonicalize=canon)
    art = t.compile(model, tmp_path)
    assert art.info["canonicalized"] == ({"bn_folded": 2, "pads_folded": 1} if canon else {})
    x = np.random.default_rng(4).standard_normal((1, 8, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(t.run_once(art, {"x": x})[0], _ort(model, x), rtol=1e-4, atol=1e-4)
    # what MetaSchedule would tune: with the folds, two conv workloads and no pad or BN arithmetic
    import tvm.s_tir.meta_schedule as ms

    _, fused = tuning.prepare(t.relax_module(model), t.target)
    names = sorted(task.task_name for task in ms.relax_integration.extract_tasks(fused, t.target))
    assert any("pad" in n for n in names) != canon
    assert any("subtract" in n or "divide" in n for n in names) != canon


def test_bad_option_value_is_refused_before_the_run():
    from graphopt.config import RunConfig

    with pytest.raises(UsageError, match=r"--target-opt canonicalize='maybe': expected 1 or 0 \(target 'x86'\)"):
        RunConfig(model="m.onnx", target="x86", target_options={"canonicalize": "maybe"}).validate()


def test_nhwc_layout_matches_onnxruntime(tmp_path):
    from graphopt.targets.x86 import X86Target

    model = conv_bn_net()
    t = X86Target(threads=1, trials=0, layout="nhwc")
    assert 'data_layout="NHWC"' in t.relax_module(model).script()
    assert 'data_layout="NHWC"' not in X86Target(threads=1, trials=0, layout="nchw").relax_module(model).script()
    art = t.compile(model, tmp_path)
    assert art.info["layout"] == "nhwc"
    x = np.random.default_rng(5).standard_normal((1, 8, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(t.run_once(art, {"x": x})[0], _ort(model, x), rtol=1e-4, atol=1e-4)


def test_nhwc_weights_are_hwio_and_every_conv_kind_matches_onnxruntime(tmp_path):
    """NHWC convs take their weights as HWIO, output channels innermost: the axis the x86 schedules
    vectorize. With OHWI (the previous choice) each vector of weights was a strided gather; tuned
    48 trials, a 192 -> 1152 1x1 conv took 141 us with OHWI and 74 us with HWIO, a depthwise 3x3
    131 vs 72 us (docs/compiler.md). Batch 2, dilated, grouped (2 groups), depthwise, strided and
    SAME_UPPER convs all compile in that layout and match onnxruntime."""
    from graphopt.modelio.ir import load_model
    from graphopt.targets.x86 import X86Target
    from tests.conftest import net_model, random_feeds

    model = net_model()
    t = X86Target(threads=1, trials=0, layout="nhwc")
    script = t.relax_module(model).script()
    assert script.count('kernel_layout="HWIO"') == 7 and 'kernel_layout="OIHW"' not in script, script
    art = t.compile(model, tmp_path)
    onnx.save(model, tmp_path / "net.onnx")
    feeds = random_feeds(load_model(tmp_path / "net.onnx"))
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for got, ref in zip(t.run_once(art, feeds), want):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_auto_layout_is_nhwc_for_float_conv_nets_where_the_space_vectorizes_wide():
    """layout=auto (the default): NHWC where x86 tunes at full vector width (wide_vector with AVX2 or
    AVX-512) and the model is a conv net, float or QDQ int8 (targets/int8_nhwc.py); NCHW with
    wide_vector=0, and for a model without convs (nothing to convert)."""
    from graphopt.passes.int8 import quantize
    from graphopt.targets.x86 import X86Target
    from tests.conftest import matmul_model
    from tests.test_x86_int8 import _calib, pointwise_net

    t = X86Target(threads=1, trials=0)
    assert t.layout == "auto" and t.vector_bits in (0, 256, 512)
    assert t.layout_for(conv_bn_net()) == ("nhwc" if t.vector_bits else "nchw")
    assert 'data_layout="NHWC"' in t.relax_module(conv_bn_net()).script() or not t.vector_bits
    assert X86Target(threads=1, trials=0, wide_vector=0).layout_for(conv_bn_net()) == "nchw"
    assert t.layout_for(quantize(pointwise_net(), _calib(), None)) == ("nhwc" if t.vector_bits else "nchw")
    assert t.layout_for(pointwise_net()) == ("nhwc" if t.vector_bits else "nchw")  # the same net in float
    assert t.layout_for(matmul_model()) == "nchw"


def test_bad_layout_is_refused_before_the_run():
    from graphopt.config import RunConfig

    with pytest.raises(UsageError, match=r"--target-opt layout='nchwc': expected one of auto, nchw, nhwc"):
        RunConfig(model="m.onnx", target="x86", target_options={"layout": "nchwc"}).validate()


def test_bn_parameters_from_constant_nodes_are_folded_too(tmp_path):
    """A raw export feeds Pad its pads (and BN its parameters) through Constant nodes, not
    initializers: the target folds constants first, so those are folded as well (the bundled
    EfficientNet-Lite0 file: 17 Pads were left unfolded, 47 workloads instead of 35)."""
    from onnx import helper

    from graphopt.targets.x86 import X86Target

    model = conv_bn_net()
    bn_inputs = {i for n in model.graph.node if n.op_type == "BatchNormalization" for i in n.input[1:]} | {"pads"}
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
              for t in model.graph.initializer if t.name in bn_inputs]
    keep = [t for t in model.graph.initializer if t.name not in bn_inputs]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    t = X86Target(threads=1, trials=0)
    art = t.compile(model, tmp_path)
    assert art.info["canonicalized"] == {"bn_folded": 2, "pads_folded": 1}
    x = np.random.default_rng(6).standard_normal((1, 8, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(t.run_once(art, {"x": x})[0], _ort(model, x), rtol=1e-4, atol=1e-4)


def _transcendental_net() -> onnx.ModelProto:
    """x[1, 4, 64] -> Erf, Exp, Tanh, Sigmoid, Softmax (five outputs): the ops fast_math rewrites."""
    from onnx import helper

    from conftest import make_model

    ops = {"erf": "Erf", "exp": "Exp", "tanh": "Tanh", "sig": "Sigmoid", "sm": "Softmax"}
    nodes = [helper.make_node(op, ["x"], [out], **({"axis": -1} if op == "Softmax" else {})) for out, op in ops.items()]
    m = make_model(nodes, {"x": [1, 4, 64]}, list(ops), [])
    onnx.checker.check_model(m)
    return m


@pytest.mark.tvm
def test_fast_math_rewrites_exp_erf_tanh_sigmoid_softmax_within_1e6_of_onnxruntime(tmp_path):
    """Default on: the five ops become TOPI's polynomials (no libm call left in the Relax module),
    within 1e-6 (relative to the value's scale) of onnxruntime over [-10, 10]; fast_math=0 keeps
    the Relax ops (libm)."""
    pytest.importorskip("tvm")
    from graphopt.targets.x86 import X86Target

    model = _transcendental_net()
    x = np.linspace(-10, 10, 256, dtype=np.float32).reshape(1, 4, 64)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    fast, libm = X86Target(threads=1, trials=0), X86Target(threads=1, trials=0, fast_math=0)
    text = fast.relax_module(model).script()
    ops = ("erf", "exp", "tanh", "sigmoid", "nn.softmax")
    assert not any(f"R.{op}(" in text for op in ops), text
    assert all(f"R.{op}(" in libm.relax_module(model).script() for op in ops)
    for t, n in ((fast, 5), (libm, 0)):
        art = t.compile(model, tmp_path)
        assert art.info["fast_math"] == n
        for name, got, w in zip(ops, t.run_once(art, {"x": x}), want):
            np.testing.assert_allclose(got, w, rtol=2e-6, atol=1e-6, err_msg=f"{name}, fast_math={t.fast_math}")


@pytest.mark.tvm
def test_fast_math_leaves_a_module_without_those_ops_as_it_is():
    pytest.importorskip("tvm")
    from graphopt.targets.tvm_prep import fast_math
    from graphopt.targets.x86 import X86Target

    mod = X86Target(threads=1, trials=0, fast_math=0).relax_module(conv_bn_net())
    out, n = fast_math(mod)
    assert n == 0 and out.same_as(mod)
