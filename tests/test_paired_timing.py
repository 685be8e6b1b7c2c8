"""Paired timing (graphopt.timing, the driver's _pair): the original is timed again right after each
candidate and the candidate ranked in the original's window of the host's load."""

from __future__ import annotations

import pytest

from graphopt.api import optimize
from graphopt.plugin import Artifact, LatencyStats, Measurement, Target
from graphopt.registry import TARGETS

# the host's speed in successive windows; a window holds two measurements (a candidate, then the
# original again), the original's first measurement has a window of its own (factor 1)
WINDOWS = [1.0, 3.0, 1.5, 2.5, 1.2, 4.0, 2.0, 1.1]


class Drifting(Target):
    """latency = node count x the current window's slowdown."""

    name = "drifting"
    calls = 0

    def compile(self, model, workdir):
        return Artifact(target=self.name, handle=len(model.graph.node))

    def measure(self, artifact, inputs):
        window = (type(self).calls + 1) // 2
        type(self).calls += 1
        ms = artifact.handle * WINDOWS[window % len(WINDOWS)]
        return Measurement(latency=LatencyStats.from_samples([ms * 0.9, ms, ms * 1.1]), method="measured",
                           tuned=None)


@pytest.fixture
def drifting():
    Drifting.calls = 0
    TARGETS.register("drifting", Drifting)
    yield Drifting
    TARGETS.unregister("drifting")


def test_each_candidate_is_ranked_in_the_original_s_window(drifting, convbn_path, tmp_path):
    res = optimize(convbn_path, "drifting", passes="conv_bn", search_exact=True, budget=3, out=tmp_path / "o",
                   confirm_rounds=0)
    recs = [r for r in res.records if r.status == "ok" and r.duplicate_of is None]
    base = next(r for r in recs if not r.genotype)
    assert base.latency_ms == 9.0 and "paired" not in base.measurement["extra"]  # 9 nodes, window 1.0
    cands = [r for r in recs if r.genotype]
    assert len(cands) == 3 and drifting.calls == 1 + 2 * 3  # each candidate, then the original again
    assert sorted(r.latency_ms for r in cands) == pytest.approx([7.0, 8.0, 8.0])  # 2 BNs fused, or 1
    for r in cands:
        p = r.measurement["extra"]["paired"]
        slow = p["original_ms"] / 9.0  # the window it was measured in
        assert slow > 1.0 and p["factor"] == pytest.approx(1 / slow)
        assert p["raw_ms"] == pytest.approx(r.latency_ms * slow)  # what it measured, unpaired
    rep = res.report
    assert rep["best"]["median_ms"] == pytest.approx(7.0) and rep["speedup"] == pytest.approx(9 / 7)
    assert rep["best"]["spread"]["min_ms"] == pytest.approx(7.0 * 0.9)
    html = (tmp_path / "o" / "report.html").read_text()  # the page says how the best's latency was obtained
    raw = rep["best"]["notes"]["paired"]["raw_ms"]
    assert "paired timing" in html and f"{raw:.3f} ms" in html


def test_without_paired_timing_the_drift_decides(drifting, convbn_path, tmp_path):
    res = optimize(convbn_path, "drifting", passes="conv_bn", search_exact=True, budget=3, out=tmp_path / "o",
                   confirm_rounds=0, paired_timing=False)
    cands = [r for r in res.records if r.genotype and r.status == "ok"]
    assert drifting.calls == 4 and all("paired" not in r.measurement["extra"] for r in cands)
    # window 1 (x3.0) makes the first candidate (8 nodes) slower than the original: 24 ms
    assert sorted(r.latency_ms for r in cands)[-1] == pytest.approx(24.0)
    assert res.report["speedup"] != pytest.approx(9 / 7)


def test_an_original_that_fails_to_time_again_leaves_the_candidate_unpaired(drifting, convbn_path, tmp_path,
                                                                              caplog):
    class Flaky(Drifting):
        name = "flaky"

        def measure(self, artifact, inputs):
            if artifact.handle == 9 and type(self).calls > 0:
                type(self).calls += 1
                raise RuntimeError("device busy")
            return super().measure(artifact, inputs)

    TARGETS.register("flaky", Flaky)
    try:
        res = optimize(convbn_path, "flaky", passes="conv_bn", budget=2, out=tmp_path / "o", confirm_rounds=0)
    finally:
        TARGETS.unregister("flaky")
    cand = next(r for r in res.records if r.genotype)
    assert cand.status == "ok" and "paired" not in cand.measurement["extra"]
    assert cand.latency_ms == cand.measurement["latency"]["median_ms"]
    assert "paired timing: could not time the original again (RuntimeError: device busy)" in caplog.text
