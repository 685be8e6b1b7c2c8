"""onnxruntime timed next to a target that times on this CPU (graphopt.reporting.ort_reference): report.json's
"ort_reference", its ratios, its verdict and the CLI line; off over RPC, for onnxruntime itself
and with --no-ort-reference."""

from __future__ import annotations

import json
import statistics

import onnx
import pytest

from conftest import run_cli
from graphopt.api import optimize
from graphopt.materialize import materialize
from graphopt.plugin import LatencyStats, Measurement
from graphopt.reporting.ort_reference import verdict
from graphopt.registry import TARGETS
from graphopt.targets.ort import OrtTarget

MS_PER_NODE = 0.5


class NodeClock(OrtTarget):
    """A target timed on this CPU whose latency is MS_PER_NODE per node of the compiled graph: a
    deterministic stand-in for a compiler, so the kept graph is the fused one in every round."""

    name = "nodeclock"
    ort_comparable = True

    def compile(self, model, workdir):
        art = super().compile(model, workdir)
        art.info["nodes"] = len(model.graph.node)
        return art

    def measure_feeds(self, artifact, feeds):
        ms = MS_PER_NODE * artifact.info["nodes"]
        return Measurement(latency=LatencyStats.from_samples([ms] * 3), method="measured", tuned=True)


@pytest.fixture
def nodeclock():
    TARGETS.register("nodeclock", NodeClock)
    yield
    TARGETS.unregister("nodeclock")


def test_the_kept_graph_is_timed_on_onnxruntime_next_to_the_target(nodeclock, convbn_path, tmp_path, monkeypatch):
    import graphopt.conclude as conclude

    built = []  # the end of the run materializes the kept graph once: timing the original does not displace it
    monkeypatch.setattr(conclude, "materialize", lambda base, space, g, *a: built.append(g) or materialize(
        base, space, g, *a))
    res = optimize(convbn_path, "nodeclock", passes="conv_bn", budget=4, out=tmp_path / "o", search_exact=True,
                   target_options={"threads": 1})
    rep = res.report
    assert res.exit_code == 0 and res.best is not None and res.best.genotype  # BN fused: fewer nodes
    b = rep["ort_reference"]
    kept = onnx.load(tmp_path / "o" / "best.onnx")
    assert b["target_ms"] == pytest.approx(MS_PER_NODE * len(kept.graph.node))
    assert b["is_original"] is False and b["candidate_id"] == res.best.id
    assert built.count(res.best.genotype) == 1 and len(built) == 2  # the kept graph, and the original once
    assert b["threads"] == 1 and b["rounds"] == 3
    assert all(len(b[k]) == 3 for k in ("target_rounds_ms", "ort_kept_rounds_ms", "ort_original_rounds_ms"))
    assert all(t > 0 for t in b["ort_kept_rounds_ms"] + b["ort_original_rounds_ms"])
    assert b["same_graph"] == pytest.approx(b["ort_kept_ms"] / b["target_ms"])
    assert b["vs_original"] == pytest.approx(b["ort_original_ms"] / b["target_ms"])
    # a 0.5 ms-per-node stand-in against onnxruntime on a 16x16 conv net: onnxruntime wins
    assert b["same_graph"] < 1 and b["verdict"].startswith("onnxruntime is x")
    assert "deploy best.onnx with onnxruntime" in b["verdict"] and "on the original: x" in b["verdict"]
    assert b["runtime"].startswith("onnxruntime ")
    on_disk = json.loads((tmp_path / "o" / "report.json").read_text())
    assert on_disk["ort_reference"]["target_ms"] == b["target_ms"]
    html = (tmp_path / "o" / "report.html").read_text()
    assert 'id="card-ort-reference"' in html and f"\u00d7{b['same_graph']:.2f}" in html
    assert "deploy best.onnx with onnxruntime" in html
    assert f"{b['runtime']}, 1 threads:" in html  # the how-table row


def test_no_ort_reference_and_targets_that_are_not_comparable(nodeclock, convbn_path, tmp_path):
    rep = optimize(convbn_path, "nodeclock", passes="conv_bn", budget=2, out=tmp_path / "a",
                   ort_reference=False).report
    assert "ort_reference" not in rep
    rep = optimize(convbn_path, "ort", passes="conv_bn", budget=2, out=tmp_path / "b").report
    assert "ort_reference" not in rep  # onnxruntime is the reference itself


def test_no_block_when_nothing_was_kept(nodeclock, convbn_path, tmp_path):
    res = optimize(convbn_path, "nodeclock", passes="conv_bn", budget=2, out=tmp_path / "o", max_size_mb=1e-6)
    assert res.best is None and res.report["status"] == "infeasible"
    assert "ort_reference" not in json.loads((tmp_path / "o" / "report.json").read_text())


@pytest.mark.parametrize("same, whole, original, tuned, expect", [
    (1.25, 1.5, False, True, "nodeclock is x1.25 as fast as onnxruntime on the kept graph; nodeclock's kept "
                             "graph against onnxruntime on the original: x1.50"),
    (0.5, 0.5, True, False, "onnxruntime is x2.00 as fast as nodeclock on the original: deploy best.onnx with "
                            "onnxruntime, or tune (--target-opt tune_time=20m; this build is untuned)"),
    (0.8, 1.1, False, True, "onnxruntime is x1.25 as fast as nodeclock on the kept graph: deploy best.onnx with "
                            "onnxruntime, or tune longer (--target-opt tune_time=20m); nodeclock's kept graph "
                            "against onnxruntime on the original: x1.10"),
])
def test_verdict(same, whole, original, tuned, expect):
    assert verdict("nodeclock", {"same_graph": same, "vs_original": whole, "is_original": original},
                   tuned=tuned) == expect


def test_x86_run_reports_onnxruntime_on_the_same_host(convbn_path, tmp_path):
    """Through the CLI on the real x86 target (untuned: fast to build): the block, its CLI line, and
    --no-ort-reference."""
    r = run_cli("run", convbn_path, "--target", "x86", "--tune-trials", "0", "--threads", "2", "--budget", "1",
                "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("vs onnxruntime (2 threads, 3 alternating rounds): x86 ")]
    assert len(line) == 1, r.stdout
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    b = rep["ort_reference"]
    assert b["threads"] == 2 and b["target_ms"] > 0 and b["ort_kept_ms"] > 0
    assert b["candidate_id"] == rep["best"]["candidate_id"] and b["is_original"] == rep["best"]["is_original"]
    assert b["target_ms"] == statistics.median(b["target_rounds_ms"]) and len(b["target_rounds_ms"]) == 3
    assert b["ort_kept_ms"] == statistics.median(b["ort_kept_rounds_ms"])
    assert b["same_graph"] == pytest.approx(b["ort_kept_ms"] / b["target_ms"])
    assert f"x86 {b['target_ms']:.3f} ms, onnxruntime {b['ort_kept_ms']:.3f} ms" in line[0]
    assert ("this build is untuned" in b["verdict"]) == (b["same_graph"] < 1)
    assert "(measured, UNTUNED, " in r.stdout  # --tune-trials 0: every workload on TVM's default schedules
    from graphopt.cli import summary  # a build with some workloads untuned says how many

    rep["best"]["notes"]["tuning"] = {"workloads_untuned": 3, "workloads_seen": 25,
                                      "stopped_because": "3 task(s) had no successful trial"}
    assert ("(measured, PARTLY UNTUNED (3 of 25 workloads on TVM's default schedules: 3 task(s) had no "
            "successful trial), ") in summary(rep)
    original = next(x for x in summary(rep).splitlines() if x.startswith("original: "))
    assert "(measured, UNTUNED, " in original  # the original's line tells of the original's build
    r = run_cli("run", convbn_path, "--target", "x86", "--tune-trials", "0", "--threads", "2", "--budget", "1",
                "--out", tmp_path / "p", "--no-ort-reference")
    assert r.returncode == 0, r.stderr
    assert "vs onnxruntime" not in r.stdout
    assert "ort_reference" not in json.loads((tmp_path / "p" / "report.json").read_text())
