"""Least-squares weight repair: the repaired model is closer to the original on held-out inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import conv_bn_model
from graphopt.driver import materialize
from graphopt.genotype import Genotype, SearchSpace
from graphopt.ir import load_proto
from graphopt.passes.depthwise import DepthwiseSeparable
from graphopt.plugin import MoveContext
from graphopt.repair import refit_pointwise


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _run(model, xs):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [s.run(None, {"x": x})[0] for x in xs]


def test_refit_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((4, 6, 5, 5))
    w = rng.standard_normal((3, 6))
    target = np.einsum("oc,nchw->nohw", w, feats)
    np.testing.assert_allclose(refit_pointwise(feats, target), w, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2])
def test_depthwise_repair_beats_svd_init_on_held_out_inputs(rank):
    base = load_proto(conv_bn_model(channels=16, size=12, blocks=2, seed=3))
    rng = np.random.default_rng(1)
    # inputs with spatial structure (smoothed noise), calibration and held-out disjoint
    def sample(n):
        x = rng.standard_normal((n, 1, 3, 12, 12)).astype(np.float32)
        return (x + np.roll(x, 1, -1) + np.roll(x, 1, -2)) / 3
    calib, held_out = sample(16), sample(8)
    graph = base.graph()
    space = SearchSpace(DepthwiseSeparable().sites(graph))
    site = next(s for s in space.sites if s.nodes[0] == "conv1")  # the 16->16 conv
    g = Genotype({site.key: rank})
    passes = {"depthwise": DepthwiseSeparable()}
    plain, _ = materialize(base, space, g, passes, MoveContext(base.proto, {"x": calib}, {"repair": False}))
    repaired, _ = materialize(base, space, g, passes, MoveContext(base.proto, {"x": calib}, {"repair": True}))
    ref = _run(base.proto, held_out)
    cos_plain = np.mean([_cos(a, b) for a, b in zip(ref, _run(plain, held_out))])
    cos_rep = np.mean([_cos(a, b) for a, b in zip(ref, _run(repaired, held_out))])
    print(f"rank {rank}: held-out cosine {cos_plain:.4f} (SVD init) -> {cos_rep:.4f} (repaired)")
    assert cos_rep > cos_plain, (cos_plain, cos_rep)
    err_plain = np.mean([np.linalg.norm(a - b) for a, b in zip(ref, _run(plain, held_out))])
    err_rep = np.mean([np.linalg.norm(a - b) for a, b in zip(ref, _run(repaired, held_out))])
    assert err_rep < 0.9 * err_plain, (err_plain, err_rep)
