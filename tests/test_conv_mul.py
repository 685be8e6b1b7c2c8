"""conv_mul (passes/conv_mul.py, the example of a match()-based pass): exact against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import float_init, make_model, random_feeds, run_ort_unoptimized
from graphopt.modelio.ir import export_graph, load_proto
from graphopt.plugin import MoveContext
from graphopt.registry import PASSES


def conv_mul(scale_shape, *, bias=True, scale_first=False, extra_consumer=False, seed=0):
    rng = np.random.default_rng(seed)
    inits = [float_init("w", rng.normal(0, 0.5, (6, 4, 3, 3))),
             float_init("s", rng.uniform(-2, 2, scale_shape))]
    conv_in = ["x", "w"]
    if bias:
        inits.append(float_init("b", rng.normal(0, 1, 6)))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], name="/conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["s", "c"] if scale_first else ["c", "s"], ["y"], name="/mul")]
    outs = ["y"]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="/relu"))
        outs.append("r")
    return make_model(nodes, {"x": [2, 4, 8, 8]}, outs, inits)


def _fold(model: onnx.ModelProto):
    loaded = load_proto(model)
    p = PASSES.create("conv_mul")
    sites = p.sites(loaded.graph())
    graph = loaded.graph()
    for s in sites:
        assert p.apply(graph, s, "fold", MoveContext(base_model=loaded.proto)) is True
    return loaded, sites, export_graph(graph)


@pytest.mark.parametrize("shape,bias,first", [((6, 1, 1), True, False), ((1, 6, 1, 1), False, True),
                                               ((1,), True, False), ((), True, True)])
def test_fold_is_exact(shape, bias, first):
    loaded, sites, folded = _fold(conv_mul(shape, bias=bias, scale_first=first))
    assert [s.key for s in sites] == ["conv_mul:/mul"] and sites[0].nodes == ("/conv", "/mul")
    assert sites[0].exact_choice == "fold"
    onnx.checker.check_model(folded)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    feeds = random_feeds(loaded)
    ref, got = run_ort_unoptimized(loaded.proto, feeds)[0], run_ort_unoptimized(folded, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,why", [
    (dict(scale_shape=(1, 1, 8, 1)), "not one value per channel"),
    (dict(scale_shape=(8,)), "not one value per channel"),  # scales along W, not channels
    (dict(scale_shape=(6, 1, 1), extra_consumer=True), "2 consumers"),
])
def test_rejections_say_why(kwargs, why):
    loaded = load_proto(conv_mul(kwargs.pop("scale_shape"), **kwargs))
    p = PASSES.create("conv_mul")
    assert p.sites(loaded.graph()) == []
    (rej,) = p.rejections(loaded.graph())
    assert why in rej[1], rej


def test_registered_by_its_file_alone():
    assert "conv_mul" in PASSES.names()
    assert PASSES.get("conv_mul").__module__ == "graphopt.passes.conv_mul"
