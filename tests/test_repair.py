"""Least-squares weight repair: the repaired model is closer to the original on held-out inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import conv_bn_model
from graphopt.driver import materialize
from graphopt.genotype import Genotype, SearchSpace
from graphopt.modelio.ir import load_proto
from graphopt.passes.depthwise import DepthwiseSeparable
from graphopt.plugin import MoveContext
from graphopt.recovery.repair import im2col, refit_conv, refit_linear, refit_pointwise, run_conv


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


# ------------------------------------------------------------------- the least-squares kernels
def test_refit_linear_recovers_grouped_weights_and_bias():
    """Per group g: T_g = F_g W_g^T + b_g exactly; with a negligible ridge the fit returns W and b."""
    rng = np.random.default_rng(0)
    groups, d, o, p = 3, 4, 2, 500
    feats = rng.standard_normal((p, groups * d))
    w = rng.standard_normal((groups * o, d))
    b = rng.standard_normal(groups * o)
    target = np.concatenate([feats[:, g * d:(g + 1) * d] @ w[g * o:(g + 1) * o].T for g in range(groups)], axis=1) + b
    w_fit, b_fit = refit_linear(feats, target, groups=groups, ridge=1e-10, intercept=True)
    np.testing.assert_allclose(w_fit, w, atol=1e-6)
    np.testing.assert_allclose(b_fit, b, atol=1e-6)
    # without the intercept the bias cannot be absorbed: the fit is worse
    w_nob = refit_linear(feats, target, groups=groups, ridge=1e-10)
    assert w_nob.shape == w.shape and np.abs(w_nob - w).max() > 1e-3


def test_refit_linear_keeps_the_prior_where_the_data_says_nothing():
    """A dead input channel (always 0) leaves its weights at w0; the live ones are fit."""
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((200, 4))
    feats[:, 2] = 0.0
    w_true = rng.standard_normal((3, 4))
    w0 = rng.standard_normal((3, 4))
    w = refit_linear(feats, feats @ w_true.T, w0=w0, ridge=1e-6)
    np.testing.assert_allclose(w[:, 2], w0[:, 2], atol=1e-9)  # no data: the prior
    np.testing.assert_allclose(w[:, [0, 1, 3]], w_true[:, [0, 1, 3]], atol=1e-4)
    # fewer rows than features: the minimum-change solution toward w0 still fits the rows it has
    few = rng.standard_normal((2, 4))
    w2 = refit_linear(few, few @ w_true.T, w0=w0, ridge=1e-8)
    np.testing.assert_allclose(few @ w2.T, few @ w_true.T, atol=1e-5)


def test_refit_linear_samples_rows_beyond_max_rows():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((5000, 6))
    w_true = rng.standard_normal((2, 6))
    w = refit_linear(feats, feats @ w_true.T, ridge=1e-10, max_rows=300)  # exact data: 300 rows are enough
    np.testing.assert_allclose(w, w_true, atol=1e-6)
    noisy = feats @ w_true.T + rng.standard_normal((5000, 2))  # with noise, which rows are sampled shows
    a, b = (refit_linear(feats, noisy, max_rows=300, seed=5) for _ in range(2))
    np.testing.assert_array_equal(a, b)  # deterministic for a seed
    assert not np.array_equal(a, refit_linear(feats, noisy, max_rows=300, seed=6))


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 2], "pads": [0, 1, 0, 1]},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"group": 2, "pads": [1, 1, 1, 1]},
    {"group": 4, "pads": [1, 1, 1, 1]},  # depthwise
], ids=["same", "strided", "dilated", "auto_pad", "grouped", "depthwise"])
def test_refit_conv_recovers_a_conv_of_any_geometry(attrs):
    """Targets made by onnxruntime's Conv of a known weight: refit_conv (im2col + per-group least
    squares) returns that weight, and im2col's patches times the weight are the conv itself."""
    rng = np.random.default_rng(3)
    groups = attrs.get("group", 1)
    x = rng.standard_normal((6, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 4 // groups, 3, 3)).astype(np.float32)
    y = run_conv(x, w, attrs)
    w_fit = refit_conv(x, y, np.zeros_like(w), attrs, ridge=1e-10)
    np.testing.assert_allclose(w_fit, w, atol=2e-4)
    if groups == 1:
        cols = im2col(x, (3, 3), attrs)
        np.testing.assert_allclose(np.einsum("nkhw,ok->nohw", cols, w.reshape(4, -1)), y, rtol=1e-4, atol=1e-4)
    w_fit, b_fit = refit_conv(x, y + 0.5, np.zeros_like(w), attrs, ridge=1e-10, intercept=True)
    np.testing.assert_allclose(b_fit, 0.5, atol=1e-3)


def test_refit_conv_refuses_a_target_of_another_geometry():
    x = np.zeros((1, 2, 8, 8), np.float32)
    with pytest.raises(ValueError, match="do not match target"):
        refit_conv(x, np.zeros((1, 3, 4, 4), np.float32), np.zeros((3, 2, 3, 3), np.float32), {"pads": [1, 1, 1, 1]})


def test_activations_are_the_original_model_s_and_leave_it_alone():
    from graphopt.recovery.repair import Activations, activations

    base = load_proto(conv_bn_model(channels=8, size=8, blocks=2))
    before = base.proto.SerializeToString()
    xs = np.random.default_rng(4).standard_normal((3, 1, 3, 8, 8)).astype(np.float32)
    act = Activations(base.proto, {"x": xs})
    got = act.get(["r0", "logits"])
    assert got["r0"].shape == (3, 8, 8, 8) and got["logits"].shape == (3, 10)  # samples along axis 0
    np.testing.assert_allclose(got["logits"], np.concatenate(_run(base.proto, xs)), rtol=1e-5, atol=1e-6)
    assert np.all(got["r0"] >= 0)  # a Relu output
    assert act.get(["r0"])["r0"] is got["r0"]  # cached: fetched once per run
    assert base.proto.SerializeToString() == before  # outputs were added to a copy
    assert activations(MoveContext(base.proto, {}, {})) is None  # no data: no repair
    ctx = MoveContext(base.proto, {"x": xs}, {})
    assert activations(ctx) is activations(ctx)
