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
    assert f"(the best: {raw:.3f} ms measured, the original " in html
    # and its candidate table shows the paired latencies report.json has, tagged with what was measured
    row = html.split(f'data-id="{res.best.id}">', 1)[1].split("</tr>", 1)[0]
    assert '<td class="num">7.000 ms</td>' in row and f"paired (measured {raw:.3f} ms)" in row


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


def test_no_pairing_over_devices_that_may_differ(drifting, convbn_path, tmp_path):
    """A target whose measurements go to separate devices (concurrent_measure: RPC) is not paired even
    with --jobs 1: the original timed again could land on another device."""
    class Remote(Drifting):
        name = "remote"
        concurrent_measure = True

    TARGETS.register("remote", Remote)
    try:
        res = optimize(convbn_path, "remote", passes="conv_bn", search_exact=True, budget=3, out=tmp_path / "o",
                       confirm_rounds=0)
    finally:
        TARGETS.unregister("remote")
    cands = [r for r in res.records if r.genotype and r.status == "ok"]
    assert len(cands) == 3 and Remote.calls == 4  # no second measurement of the original
    assert all("paired" not in r.measurement["extra"] for r in cands)


def test_a_resumed_run_builds_the_original_in_full_before_pairing(drifting, convbn_path, tmp_path):
    """Resumed, the original comes from the store without a build: it is compiled once, before the
    search, and the new candidates are paired with it. A build of a stored record at the end (here the
    confirmation's, unpaired) is made without the best-so-far shortcut (incumbent_ms)."""
    class Counting(Drifting):
        name = "counting"
        incumbent_ms = None
        originals: list = []

        def compile(self, model, workdir):
            if len(model.graph.node) == 9:
                type(self).originals.append(self.incumbent_ms)
            return super().compile(model, workdir)

    TARGETS.register("counting", Counting)
    kw = dict(passes="conv_bn", search_exact=True, out=tmp_path / "o", confirm_rounds=0)
    try:
        first = optimize(convbn_path, "counting", budget=1, **kw)
        assert Counting.originals == [None] and first.best.latency_ms in (7.0, 8.0)
        Counting.originals = []
        second = optimize(convbn_path, "counting", budget=3, **kw)
        assert second.report["search"]["resumed"] is True
        assert Counting.originals == [None]  # built once, for pairing
        new = [r for r in second.records if r.genotype and r.status == "ok" and r.id > first.records[-1].id]
        assert len(new) == 2 and all(r.measurement["extra"]["paired"]["factor"] < 1 for r in new)
        assert all(r.latency_ms in (pytest.approx(7.0), pytest.approx(8.0)) for r in new)  # the window cancels
        Counting.originals = []
        kw.update(confirm_rounds=3, paired_timing=False)
        third = optimize(convbn_path, "counting", budget=4, **kw)
    finally:
        TARGETS.unregister("counting")
    assert third.report["confirmed"] is not None
    assert Counting.originals == [None]  # built at the end for the confirmation, in full
