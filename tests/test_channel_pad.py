"""targets/channel_pad.py: conv channel groups padded to the vector width with zero weights and
carried to the next convs, exactly; groups it cannot pad whole are left as they are."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import float_init, make_model, run_ort_unoptimized
from graphopt.targets.channel_pad import pad_channels


def _net(c: int = 24, out_is_mid: bool = False, dw_consumer: bool = False, clip_min: float = 0.0,
         seed: int = 0) -> onnx.ModelProto:
    """x[1,8,10,10] -> conv(8->c) -> Clip -> conv(c->c) -> Add(residual) -> Relu -> conv3x3(c->16) -> y:
    one group of c-channel tensors, its seeds the first two convs, its consumers the second and last."""
    rng = np.random.default_rng(seed)
    mk = helper.make_node
    last = (mk("Conv", ["r", "w2"], ["y"], group=c, pads=[1, 1, 1, 1]) if dw_consumer
            else mk("Conv", ["r", "w2", "b2"], ["y"], pads=[1, 1, 1, 1]))
    nodes = [mk("Conv", ["x", "w0", "b0"], ["a"]), mk("Clip", ["a", "lo", "hi"], ["ac"]),
             mk("Conv", ["ac", "w1", "b1"], ["b"]), mk("Add", ["b", "ac"], ["s"]), mk("Relu", ["s"], ["r"]), last]
    inits = [float_init("w0", rng.standard_normal((c, 8, 1, 1)) * 0.3), float_init("b0", rng.standard_normal(c)),
             float_init("lo", np.array(clip_min)), float_init("hi", np.array(6.0)),
             float_init("w1", rng.standard_normal((c, c, 1, 1)) * 0.2), float_init("b1", rng.standard_normal(c)),
             float_init("w2", rng.standard_normal((c, 1, 3, 3) if dw_consumer else (16, c, 3, 3)) * 0.2)]
    if not dw_consumer:
        inits.append(float_init("b2", rng.standard_normal(16)))
    return make_model(nodes, {"x": [1, 8, 10, 10]}, ["y"] + (["s"] if out_is_mid else []), inits)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return run_ort_unoptimized(model, {"x": x})


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in model.graph.initializer if i.name.startswith(("w", "b"))}


def test_a_group_is_padded_whole_and_the_outputs_do_not_change():
    model = _net()
    before = model.SerializeToString()
    out, info = pad_channels(model, 16)
    assert info == {"channels_padded": [(24, 32)], "convs_padded": 3}
    assert _shapes(out) == {"w0": (32, 8, 1, 1), "b0": (32,), "w1": (32, 32, 1, 1), "b1": (32,),
                            "w2": (16, 32, 3, 3), "b2": (16,)}
    assert model.SerializeToString() == before  # the given model is not modified
    onnx.checker.check_model(out, full_check=True)  # shapes infer again: no stale value_info left
    x = np.random.default_rng(1).standard_normal((1, 8, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x)[0], _run(model, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("why, kwargs", [
    ("a group tensor is a model output", {"out_is_mid": True}),
    ("a depthwise conv consumes it", {"dw_consumer": True}),
    ("Clip(1, 6) maps a zero channel to 1", {"clip_min": 1.0}),
    ("20 -> 32 channels is more than x1.5 the work", {"c": 20}),
])
def test_a_group_that_cannot_be_padded_whole_is_left_as_it_is(why, kwargs):
    model = _net(**kwargs)
    out, info = pad_channels(model, 16)
    assert out is model and info["channels_padded"] == [], why


def test_multiples_already_met_or_off_change_nothing():
    model = _net(c=32)
    assert pad_channels(model, 16)[0] is model
    model = _net()
    assert pad_channels(model, 8)[0] is model  # 8 lanes (AVX2) divide 24 already
    assert pad_channels(model, 1)[0] is model


@pytest.mark.tvm
def test_x86_nhwc_pads_to_its_vector_width_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("tvm")
    from graphopt.targets.x86 import X86Target

    model = _net()
    x = np.random.default_rng(2).standard_normal((1, 8, 10, 10)).astype(np.float32)
    t = X86Target(threads=1, trials=0, layout="nhwc")
    art = t.compile(model, tmp_path)
    # 16 float lanes with AVX-512 pad 24 to 32; 8 lanes (AVX2) already divide 24
    assert art.info["channels_padded"] == ([(24, 32)] if t.vector_bits == 512 else [])
    np.testing.assert_allclose(t.run_once(art, {"x": x})[0], _run(model, x)[0], rtol=1e-4, atol=1e-4)
    off = X86Target(threads=1, trials=0, layout="nhwc", pad_channels=0)
    assert off.compile(model, tmp_path).info["channels_padded"] == []
    assert X86Target(threads=1, trials=0, layout="nchw").compile(model, tmp_path).info["channels_padded"] == []
