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
