"""The TargetContext (plugin.py): what the driver tells a target before each compile."""

from __future__ import annotations

import time

from graphopt.api import optimize
from graphopt.plugin import TargetContext, inform_target
from graphopt.registry import TARGETS
from graphopt.targets.ort import OrtTarget


def test_the_driver_tells_the_target_its_deadline_and_best_latency(convbn_path, tmp_path):
    seen: list[tuple[TargetContext, float]] = []

    class Told(OrtTarget):
        name = "told"

        def inform(self, context):
            super().inform(context)
            seen.append((context, time.monotonic()))

        def compile(self, model, workdir):
            assert seen and self.context is seen[-1][0]  # told before each compile
            return super().compile(model, workdir)

    TARGETS.register("told", Told)
    try:
        res = optimize(convbn_path, "told", passes="conv_bn", budget="60s", out=tmp_path / "o", search_exact=True)
    finally:
        TARGETS.unregister("told")
    assert res.exit_code == 0 and len(seen) >= 2
    first, t = seen[0]
    assert first.incumbent_ms is None  # nothing measured yet
    assert first.deadline is not None and 0 < first.deadline - t <= 60.0
    later = [c for c, _ in seen[1:]]
    assert all(c.incumbent_ms is not None and c.incumbent_ms > 0 for c in later)
    best = [c.incumbent_ms for c in later]
    assert best == sorted(best, reverse=True)  # the best so far only improves


def test_the_older_attributes_still_work():
    class Old:  # not a Target: attributes set where it has them
        deadline = None
        incumbent_ms = None

    class New(OrtTarget):
        deadline = None

    old, new = Old(), New()
    inform_target(old, TargetContext(deadline=5.0, incumbent_ms=1.5))
    inform_target(new, TargetContext(deadline=7.0, incumbent_ms=2.5))
    assert (old.deadline, old.incumbent_ms) == (5.0, 1.5)
    assert new.deadline == 7.0 and new.context.incumbent_ms == 2.5 and not hasattr(new, "incumbent_ms")


def test_the_driver_asks_for_per_layer_latency_of_the_best_only(convbn_path, tmp_path):
    """TargetContext.profile_layers: off while the search measures, on for the one per-layer
    measurement of the best at the end (graphopt.conclude), whose layers reach report.json."""
    import json

    from graphopt.reporting.html_report import best_layers

    told: list[bool] = []

    class Profiled(OrtTarget):
        name = "profiled"

        def measure_feeds(self, artifact, feeds):
            told.append(self.context.profile_layers)
            return super().measure_feeds(artifact, feeds)

    TARGETS.register("profiled", Profiled)
    try:
        res = optimize(convbn_path, "profiled", passes="conv_bn", budget="60s", out=tmp_path / "o", search_exact=True,
                       target_options={"repeat": 2, "number": 2})
    finally:
        TARGETS.unregister("profiled")
    assert res.exit_code == 0 and len(told) >= 3
    assert told[-1] is True and not any(told[:-1]), told
    layers, facts = best_layers(json.loads((tmp_path / "o" / "report.json").read_text())["best"])
    assert layers and facts["layers_count"] >= len(layers) and "onnxruntime" in facts["layers_how"]
