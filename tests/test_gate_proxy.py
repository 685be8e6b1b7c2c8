"""The label-free gate on a classifier (docs/gate_proxy.md): on unlabelled select data
`imagenet_top1` estimates top-1 from the original's soft labels, so a candidate that flips only
samples the original is unsure of passes `--max-drop 1`, where top-1 agreement (every flip costs a
point) rejects it; report.json, the summary and report.html say which quantity the gate measured and
that the held-out number is top-1 on labels. A small model built in code: the input is the logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import optimize
from graphopt.evaluation.metrics import LABEL_BASIS, SOFT_BASIS

K = 10


def head_model() -> onnx.ModelProto:
    """x [1, 10] -> x + bias (zeros) -> logits [1, 10]: the data sets the logits."""
    g = helper.make_graph([helper.make_node("Add", ["x", "bias"], ["logits"], name="head")], "cls",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, K])],
                          [onnx.numpy_helper.from_array(np.zeros(K, np.float32), "bias")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    return m


def logits(n: int, unsure: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n samples [n, 1, 10]: class c = i % 10 at p 0.99, except `unsure` samples where class 0 leads
    class 1 by 0.40 to 0.38; and labels drawn from those probabilities (a calibrated original)."""
    rng = np.random.default_rng(seed)
    p = np.full((n, K), 0.01 / (K - 1))
    p[np.arange(n), np.arange(n) % K] = 0.99
    idx = np.arange(0, n, n // unsure)[:unsure]
    p[idx] = 0.22 / (K - 2)
    p[idx, 0], p[idx, 1] = 0.40, 0.38
    labels = np.array([rng.choice(K, p=row / row.sum()) for row in p])
    return np.log(p).astype(np.float32)[:, None, :], labels


def _nudge_pass():
    from graphopt.genotype import Site
    from graphopt.plugin import Pass

    class Nudge(Pass):
        """Raises class 1's bias by 0.1: flips exactly the samples where class 0 led class 1 by < 0.1."""
        name = "nudge"

        def sites(self, graph):
            return [Site("nudge:head", "nudge", ("head",), ("keep", "nudge"))]

        def apply(self, graph, site, choice, ctx):
            node = next(n for n in graph.nodes if n.name == "head")
            b = node.inputs[1]
            v = b.values.copy()
            v[1] += 0.1
            b.values = v
            return True

    return Nudge


def test_low_confidence_flips_pass_the_soft_gate_and_the_report_says_so(tmp_path):
    from graphopt.cli import summary
    from graphopt.registry import PASSES

    p = tmp_path / "cls.onnx"
    onnx.save(head_model(), p)
    x, _ = logits(200, 20, 0)  # select: 20 of 200 unsure (10% flip: agreement 90%)
    np.savez(tmp_path / "photos.npz", x=x)
    ex, elab = logits(200, 20, 1)
    np.savez(tmp_path / "eval.npz", x=ex, labels=elab)
    PASSES.register("nudge", _nudge_pass())
    try:
        agree = optimize(p, "ort", passes="nudge", strategy="grid", budget=1, data=tmp_path / "photos.npz",
                         eval_data=tmp_path / "eval.npz", metric="agreement_top1", max_drop=1.0, out=tmp_path / "a")
        cand = next(r for r in agree.records if r.genotype)
        assert cand.status == "infeasible" and cand.fidelity == pytest.approx(90.0)
        res = optimize(p, "ort", passes="nudge", strategy="grid", budget=1, data=tmp_path / "photos.npz",
                       eval_data=tmp_path / "eval.npz", metric="imagenet_top1", max_drop=1.0, out=tmp_path / "s")
        cand = next(r for r in res.records if r.genotype)
        f = res.report["fidelity"]
        # the original's mean confidence: 180 x 0.99 + 20 x 0.40, over 200; the flips cost 20 x 0.02 / 200
        assert f["original"] == pytest.approx(100 * (180 * 0.99 + 20 * 0.40) / 200, abs=1e-3)
        assert f["original"] - cand.fidelity == pytest.approx(100 * 20 * 0.02 / 200, abs=1e-3)
        assert cand.status == "ok" and f["min_required"] == pytest.approx(f["original"] - 1.0)
        assert f["basis"] == SOFT_BASIS
        h = res.report["held_out"]
        assert h["metric"]["basis"] == LABEL_BASIS and h["samples"] == 200
        text = summary(res.report)
        assert f"gate: imagenet_top1 on 200 select samples = {SOFT_BASIS}: original {f['original']:.2f}%" in text
        assert f"({LABEL_BASIS})" in text
        html = (tmp_path / "s" / "report.html").read_text()
        assert "estimated top-1 from the original&#x27;s soft labels" in html and LABEL_BASIS in html
    finally:
        PASSES.unregister("nudge")
