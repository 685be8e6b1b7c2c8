"""Latency over K real samples (graphopt.timing): a data-dependent candidate is not timed on one feed."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from conftest import float_init, make_model
from graphopt import optimize
from graphopt.plugin import Artifact, LatencyStats, Measurement, Pass, Target
from graphopt.registry import PASSES, TARGETS
from graphopt.timing import TIMING_SAMPLES, how, measure_feeds, timing_indices

SEQ = 8


class MaskTime(Target):
    """A data-dependent fake device: latency = number of unmasked tokens of the feed (ms)."""

    name = "mask_time"

    def compile(self, model, workdir):
        return Artifact(target=self.name)

    def measure(self, artifact, inputs):
        return Measurement(latency=LatencyStats.from_samples([float(np.sum(inputs["attention_mask"]))]),
                           method="estimated", tuned=None)


class CycledMaskTime(MaskTime):
    """Like onnxruntime's target: cycles through the feeds in one timing loop."""

    name = "cycled_mask_time"

    def measure_feeds(self, artifact, feeds):
        return Measurement(latency=LatencyStats.from_samples([float(np.mean([f["attention_mask"].sum() for f in feeds]))]),
                           method="estimated", tuned=None)


class DynamicShapes(Pass):
    """A pass whose graphs would have value-dependent shapes (like trim_padding); no sites here."""

    name = "dyn_fake"
    dynamic_shapes = True

    def sites(self, graph):
        return []


class StaticMaskTime(MaskTime):
    name = "static_mask_time"
    static_shapes = True


def _feeds(lengths):
    return [{"attention_mask": (np.arange(SEQ) < n).astype(np.float32)[None]} for n in lengths]


def test_timing_indices_spread_over_the_split():
    assert timing_indices(100) == sorted(set(timing_indices(100))) and len(timing_indices(100)) == TIMING_SAMPLES
    assert timing_indices(100)[0] == 0 and timing_indices(100)[-1] == 99
    assert timing_indices(5) == [0, 1, 2, 3, 4] and timing_indices(1) == [0] and timing_indices(0) == [0]


def test_measure_feeds_reflects_every_sample():
    feeds = _feeds([1] + [8] * 15)  # sample 0 is short, the others long
    m = measure_feeds(MaskTime(), Artifact(target="mask_time"), feeds)
    assert m.latency.median_ms == np.mean([1] + [8] * 15)
    assert m.extra["latency_over"] == how(MaskTime(), 16) and "mean over 16 select samples" in m.extra["latency_over"]
    # a static-shape target takes the same time on any values: one measurement, and it says so
    s = measure_feeds(StaticMaskTime(), Artifact(target="x"), feeds)
    assert s.latency.median_ms == 1.0 and "static shapes" in s.extra["latency_over"]
    # no value-dependent move in the run: one measurement (K would cost K times the device time)
    s = measure_feeds(MaskTime(), Artifact(target="x"), feeds, value_dependent=False)
    assert s.latency.median_ms == 1.0 and "no move of this run" in s.extra["latency_over"]


def test_ort_cycles_through_the_feeds():
    from graphopt.targets.ort import OrtTarget

    seen = []

    class Sess:
        def run(self, _, feed):
            seen.append(int(feed["attention_mask"].sum()))

    t = OrtTarget(threads=1, warmup=2, number=10, repeat=3)
    m = t.measure_feeds(Artifact(target="ort", handle=Sess()), _feeds(range(1, 5)))
    assert m.latency.runs_per_repeat == 12 and m.latency.repeats == 3  # 10 runs rounded up to whole cycles of 4
    timed = seen[-36:]
    assert all(timed.count(n) == 9 for n in range(1, 5))  # every feed timed equally often
    assert seen[:4] == [1, 2, 3, 4]  # warm-up covers every feed
    seen.clear()
    t.measure(Artifact(target="ort", handle=Sess()), _feeds([3])[0])  # one feed: as before
    assert len(seen) == 2 + 3 * 10


def _mask_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Mul", ["attention_mask", "w"], ["y"], name="/mul")]
    return make_model(nodes, {"attention_mask": [1, SEQ]}, ["y"], [float_init("w", np.ones(SEQ))])


def _run(tmp_path, target, passes=()):
    p, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(_mask_model(), p)
    masks = np.ones((40, 1, SEQ), np.float32)
    masks[0, 0, 1:] = 0  # sample 0 of the data: one token; every other sample: eight
    np.savez(data, attention_mask=masks)
    TARGETS.register(target.name, target)
    PASSES.register("dyn_fake", DynamicShapes)
    try:
        return optimize(p, target.name, passes=list(passes), budget=1, data=data, metric="cosine", min_fidelity=0.5,
                        out=tmp_path / target.name).report
    finally:
        TARGETS.unregister(target.name)
        PASSES.unregister("dyn_fake")


def test_run_reports_latency_over_k_select_samples(tmp_path):
    """Timing on sample 0 alone (the driver before graphopt.timing) would report 1 ms."""
    from graphopt.cli import summary

    rep = _run(tmp_path, CycledMaskTime)
    k = min(TIMING_SAMPLES, rep["fidelity"]["samples"])
    assert rep["latency_over"] == f"latency: mean over {k} select samples (cycled in the timing loop), median of " \
                                  "the timed repeats"
    mean_k = (1.0 + 8.0 * (k - 1)) / k  # sample 0 is the select split's first; the K include it
    assert rep["baseline"]["median_ms"] == mean_k  # the mean over the K select samples, not sample 0's 1 ms
    assert f"mean over {k} select samples" in summary(rep)
    # a target that times one feed at a time: K measurements when a move's time depends on the values
    rep = _run(tmp_path, MaskTime, passes=["dyn_fake"])
    assert rep["latency_over"].startswith(f"latency: mean over {k} select samples of the per-sample medians")
    assert rep["baseline"]["median_ms"] == mean_k
