"""graphopt.evaluation.evaluate and graphopt.evaluation.metrics: every built-in metric on hand-made cases, the default
`channel` metric on a detector-like and a logits output, the registry and plugin metrics."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.errors import UsageError
from graphopt.evaluation.evaluate import channel_axis, channel_score, compare, similarity
from graphopt.evaluation.metrics import (LABEL_BASIS, SOFT_BASIS, agreement_top1, gate_threshold, imagenet_top1, rankdata,
                              resolve_metric, soft_labels, soft_top1, spearman, sts_spearman)

RNG = np.random.default_rng(0)


def detector_outputs(n_samples: int = 4, anchors: int = 200) -> np.ndarray:
    """[samples, 1, 84, anchors]: 4 box coordinates in pixels (0-640), 80 sigmoid class scores."""
    boxes = RNG.uniform(0, 640, size=(n_samples, 1, 4, anchors))
    logits = RNG.normal(-4.0, 2.0, size=(n_samples, 1, 80, anchors))
    return np.concatenate([boxes, 1 / (1 + np.exp(-logits))], axis=2).astype(np.float32)


def int8_noise(x: np.ndarray) -> np.ndarray:
    """Round to a per-tensor int8 grid (scale = max |x| / 127), as int8 quantization does."""
    scale = np.abs(x).max() / 127.0
    return (np.round(x / scale) * scale).astype(x.dtype)


# ------------------------------------------------------------------------ the default metric
@pytest.mark.parametrize("threshold", [0.9, 0.95, 0.99, 0.999])
def test_detector_with_dead_class_scores_fails_the_default_gate(threshold):
    ref = detector_outputs()
    dead = ref.copy()
    dead[:, :, 4:, :] = 0.0  # every class score 0: a dead detector
    fid, _ = similarity({"out": ref}, {"out": dead}, "channel")
    assert fid < threshold
    assert fid == 0.0  # the class channels lost all their energy
    # while the whole-output cosine still looks perfect (the 0.997): why cosine is not the default
    cos, _ = similarity({"out": ref}, {"out": dead}, "cosine")
    assert cos > 0.99


def test_detector_one_dead_class_fails_one_noisy_box_passes():
    ref = detector_outputs()
    one = ref.copy()
    one[:, :, 4 + 7, :] = 0.0  # one class channel dead
    assert channel_score(ref, one) < 0.9
    boxes = ref.copy()
    boxes[:, :, :4, :] += RNG.normal(0, 1.0, size=boxes[:, :, :4, :].shape)  # 1 px of box noise
    assert channel_score(ref, boxes) > 0.999


def test_transposed_detector_layout_uses_the_short_axis_as_channels():
    ref = np.moveaxis(detector_outputs(), 2, 3)  # [samples, 1, anchors, 84] (YOLOv5 style)
    assert channel_axis(ref.shape[1:]) == 2
    dead = ref.copy()
    dead[..., 4:] = 0.0
    assert channel_score(ref, dead) == 0.0


def test_logits_with_int8_noise_pass_the_default_gate():
    logits = RNG.normal(0.0, 3.0, size=(16, 1, 1000)).astype(np.float32)
    logits[:, :, 5] = 0.01 * RNG.normal(size=(16, 1))  # a nearly-silent class: floor at the median channel
    noisy = int8_noise(logits)
    assert not np.array_equal(noisy, logits)
    fid, per = similarity({"logits": logits}, {"logits": noisy}, "channel")
    assert fid >= 0.99 and per == {"logits": fid}
    # a candidate whose logits are scaled by 2 is not the same model
    assert channel_score(logits, 2 * logits) < 0.9


def test_channel_metric_exact_and_edge_cases():
    x = RNG.normal(size=(3, 1, 8, 5)).astype(np.float32)
    assert channel_score(x, x.copy()) == 1.0
    assert channel_score(x, x[:, :, :4]) == 0.0  # shape mismatch
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    assert channel_score(x, bad) == 0.0  # non-finite where the original is finite
    inf_ref = x.copy()
    inf_ref[1, 0, 2, 2] = np.inf
    assert channel_score(inf_ref, inf_ref.copy()) == 1.0  # the same inf: fine
    other = inf_ref.copy()
    other[1, 0, 2, 2] = 0.0
    assert channel_score(inf_ref, other) == 0.0
    zeros = np.zeros((2, 1, 4), np.float32)
    assert channel_score(zeros, zeros) == 1.0
    assert channel_score(zeros, zeros + 1) == 0.0
    ints = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    assert channel_score(ints, np.array([[1, 2, 3], [4, 5, 0]])) == pytest.approx(5 / 6)
    assert channel_score(np.float32(1.0)[None], np.float32(1.0)[None]) == 1.0  # scalar output per sample
    # ragged outputs (dynamic shapes): compared per sample
    assert channel_score([np.ones(3), np.ones(4)], [np.ones(3), np.ones(4)]) == 1.0
    assert channel_score([np.ones(3), np.ones(4)], [np.ones(3)]) == 0.0


@pytest.mark.parametrize("metric", ["cosine", "top1", "rel_l2", "channel"])
def test_similarity_metrics_identical_mismatch_nonfinite(metric):
    ref = [[RNG.normal(size=(1, 10)).astype(np.float32)] for _ in range(4)]
    same = compare(ref, [[r[0].copy()] for r in ref], ["y"], metric)
    assert same.value == pytest.approx(1.0) and same.per_output == {"y": pytest.approx(1.0)}
    assert compare(ref, [[r[0][:, :5]] for r in ref], ["y"], metric).value == 0.0
    nan = [[np.full_like(r[0], np.nan)] for r in ref]
    assert compare(ref, nan, ["y"], metric).value == 0.0


def test_hand_made_values_of_cosine_top1_rel_l2():
    ref = [[np.array([[1.0, 0.0]], np.float32)], [np.array([[0.0, 2.0]], np.float32)]]
    cand = [[np.array([[1.0, 1.0]], np.float32)], [np.array([[0.0, 1.0]], np.float32)]]
    assert compare(ref, cand, ["y"], "cosine").value == pytest.approx((1 / np.sqrt(2) + 1.0) / 2)
    assert compare(ref, cand, ["y"], "rel_l2").value == pytest.approx(((1 - 1.0) + (1 - 0.5)) / 2)
    assert compare(ref, cand, ["y"], "top1").value == pytest.approx(1.0)  # argmax [0, 1] both times
    flipped = [[np.array([[0.0, 1.0]], np.float32)], [np.array([[0.0, 1.0]], np.float32)]]
    assert compare(ref, flipped, ["y"], "top1").value == pytest.approx(0.5)
    # two outputs: the worst one counts
    two = compare([[np.ones(3), np.ones(3)]], [[np.ones(3), -np.ones(3)]], ["a", "b"], "cosine")
    assert two.value == pytest.approx(-1.0) and two.per_output["a"] == pytest.approx(1.0)


# ------------------------------------------------------------------------ task metrics
def test_imagenet_top1_with_and_without_labels():
    logits = np.zeros((4, 1, 10), np.float32)
    for i, c in enumerate([3, 1, 4, 1]):
        logits[i, 0, c] = 5.0
    out = {"logits": logits}
    assert imagenet_top1(out, out, np.array([3, 1, 4, 9])) == pytest.approx(75.0)
    assert imagenet_top1(out, out, [3, None, 4, 9]) == pytest.approx(100 * 2 / 3)  # None = unlabelled
    conf = np.exp(5.0) / (np.exp(5.0) + 9)  # the original's softmax probability of its own top-1
    # no labels: the top-1 estimated from the original's soft labels (its mean confidence for itself)
    assert imagenet_top1(out, out, None) == pytest.approx(100 * conf)
    assert imagenet_top1(out, out, [None] * 4) == pytest.approx(100 * conf)
    cand = logits.copy()
    cand[0, 0, 3], cand[0, 0, 7] = 0.0, 6.0  # sample 0 flips from class 3 to class 7 (p_orig = 1 / (e^5 + 9))
    assert imagenet_top1(out, {"logits": cand}, None) == pytest.approx(100 * (3 * conf + (1 - conf) / 9) / 4)
    assert agreement_top1(out, {"logits": cand}) == pytest.approx(75.0)  # the old unlabelled behaviour
    assert imagenet_top1(out, {"logits": cand}, np.array([7, 1, 4, 9])) == pytest.approx(75.0)  # labels win
    assert imagenet_top1(out, {"logits": cand[:, :, :5]}, None) == 0.0  # shape mismatch
    assert imagenet_top1(out, {"logits": np.full_like(cand, np.nan)}, None) == 0.0
    m = resolve_metric("imagenet_top1")
    assert m.basis(None) == SOFT_BASIS and m.basis([None, 3]) == LABEL_BASIS and m.basis([None]) == SOFT_BASIS
    assert m.describe(None)["basis"] == SOFT_BASIS and resolve_metric("channel").basis(None) is None


def test_soft_top1_closed_form():
    # two classes, the original's softmax (0.7, 0.3), (0.6, 0.4), (0.9, 0.1), (0.2, 0.8)
    p = np.array([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.2, 0.8]])
    orig = {"y": np.log(p) + 3.0}  # logits: softmax is shift-invariant
    assert soft_top1(orig, orig) == pytest.approx(100 * (0.7 + 0.6 + 0.9 + 0.8) / 4)
    flip = {"y": orig["y"][:, ::-1].copy()}  # every prediction flipped
    assert soft_top1(orig, flip) == pytest.approx(100 * (0.3 + 0.4 + 0.1 + 0.2) / 4)
    one = orig["y"].copy()
    one[1] = one[1, ::-1]  # only the unsure sample (0.6 / 0.4) flips: costs 0.2 / 4 = 5 points
    assert soft_top1(orig, {"y": one}) == pytest.approx(100 * (0.7 + 0.4 + 0.9 + 0.8) / 4)
    probs = {"y": p}  # an output that already is a distribution is used as it is
    assert soft_top1(probs, probs) == pytest.approx(75.0)
    np.testing.assert_allclose(soft_labels(np.log(p)), p)
    np.testing.assert_allclose(soft_labels(np.log(p), temperature=2.0), np.sqrt(p) / np.sqrt(p).sum(1, keepdims=True))
    assert soft_top1(orig, {"y": np.full_like(p, np.inf)}) == 0.0
    assert resolve_metric("soft_top1").basis([1, 2]) == SOFT_BASIS  # label-free even when labels exist


def test_low_confidence_flips_pass_a_one_point_gate_that_agreement_fails():
    """100 samples: 95 the original is sure of (p = 0.99), 5 it is not (0.40 vs 0.38). A candidate that
    flips the 5 unsure ones loses 5 points of agreement but ~0.1 point of estimated top-1: it passes
    --max-drop 1 under imagenet_top1 on unlabelled data; one that flips 2 sure samples fails it."""
    k, n = 10, 100
    p = np.full((n, k), 0.01 / (k - 1))
    p[:, 0] = 0.99
    p[95:] = 0.22 / (k - 2)
    p[95:, 0], p[95:, 1] = 0.40, 0.38
    orig = {"logits": np.log(p).astype(np.float32)[:, None, :]}
    unsure = orig["logits"].copy()
    unsure[95:, 0, 1] += 0.1  # class 1 now wins on the 5 unsure samples
    sure = orig["logits"].copy()
    sure[:2, 0, 2] += 10.0  # 2 confident samples flip to class 2
    top1, agree = resolve_metric("imagenet_top1"), resolve_metric("agreement_top1")
    for metric, unsure_passes in ((top1, True), (agree, False)):
        base = metric(orig, orig)[0]
        need = gate_threshold(None, 1.0, base, similarity=False)
        assert (metric(orig, {"logits": unsure})[0] >= need) is unsure_passes, metric.name
        assert metric(orig, {"logits": sure})[0] < need, metric.name
    assert top1(orig, orig)[0] - top1(orig, {"logits": unsure})[0] == pytest.approx(5 * (0.40 - 0.38), abs=1e-4)
    assert agree(orig, orig)[0] - agree(orig, {"logits": unsure})[0] == pytest.approx(5.0)


def test_rankdata_and_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    a = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0])
    b = np.array([2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0, 2.0])
    np.testing.assert_allclose(rankdata(a), stats.rankdata(a))
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert spearman(a, np.ones_like(a)) == 0.0  # constant: defined as 0


def test_sts_spearman_pairs_from_labels_and_fallback():
    rng = np.random.default_rng(3)
    n_pairs = 40
    emb = rng.normal(size=(2 * n_pairs, 1, 16))
    a, b = emb[0::2, 0], emb[1::2, 0]
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    labels = [np.array([k // 2, 5 * (cos[k // 2] + 1) / 2]) for k in range(2 * n_pairs)]  # gold = cosine
    out = {"e": emb}
    assert sts_spearman(out, out, labels) == pytest.approx(100.0)
    # shuffled sample order: pairs are found through their ids
    perm = rng.permutation(2 * n_pairs)
    assert sts_spearman({"e": emb[perm]}, {"e": emb[perm]}, [labels[i] for i in perm]) == pytest.approx(100.0)
    # unlabelled samples and half pairs are skipped
    extra = [None, np.array([99, 3.0])]
    emb2 = np.concatenate([emb, rng.normal(size=(2, 1, 16))])
    assert sts_spearman({"e": emb2}, {"e": emb2}, labels + extra) == pytest.approx(100.0)
    # no labels: consecutive pairs ranked against the original's cosines
    noisy = emb + 0.05 * rng.normal(size=emb.shape)
    v = sts_spearman(out, {"e": noisy}, None)
    assert 90.0 < v < 100.0
    assert sts_spearman(out, {"e": emb[:, :, :8]}, labels) == 0.0


# ------------------------------------------------------------------------ registry, plugins, gate
def test_resolve_builtin_plugin_and_errors(tmp_path):
    m = resolve_metric("channel")
    assert m.similarity and m.name == "channel" and "own scale" in m.description
    assert resolve_metric("imagenet_top1").units == "%"
    f = tmp_path / "mymetric.py"
    f.write_text('def worst_abs(original, candidate, labels=None, extras=None):\n'
                 '    """minus the largest absolute difference"""\n'
                 '    return -max(float(abs(original[k] - candidate[k]).max()) for k in original)\n')
    pm = resolve_metric(f"{f}:worst_abs")
    assert pm.description == "minus the largest absolute difference"
    ref = {"y": np.zeros((2, 3))}
    assert pm(ref, {"y": np.full((2, 3), 0.5)}) == (-0.5, {})
    with pytest.raises(UsageError, match="unknown metric"):
        resolve_metric("nope")
    with pytest.raises(UsageError, match="has no attribute"):
        resolve_metric(f"{f}:missing")


def test_entry_point_metric_is_listed(monkeypatch):
    from graphopt.registry import METRICS

    METRICS.register("always_one", lambda o, c, labels=None, extras=None: 1.0)
    try:
        assert "always_one" in METRICS.names()
        assert resolve_metric("always_one")({}, {}) == (1.0, {})
    finally:
        METRICS.unregister("always_one")


def test_gate_threshold_absolute_and_relative():
    assert gate_threshold(None, None, 1.0, similarity=True) == 0.99
    assert gate_threshold(None, None, 87.4, similarity=False) == pytest.approx(86.4)
    # a plugin function that declares no units is on a 0..1 scale: 1 point is 0.01, not the whole range
    assert gate_threshold(None, None, 0.93, similarity=False, units="") == pytest.approx(0.92)
    assert gate_threshold(None, 0.5, 81.97, similarity=False) == pytest.approx(81.47)
    assert gate_threshold(0.9, 0.05, 1.0) == pytest.approx(0.95)  # both: the stricter
    assert gate_threshold(85.0, 0.5, 87.4, similarity=False) == pytest.approx(86.9)
