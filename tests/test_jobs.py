"""--jobs N: candidates measured at once on remote devices while the next ones compile.

The pipelined loop is checked with a fake target whose measurements sleep (so they overlap) and
count how many run at once; the real thing (two RPC servers under one tracker key) is in
tests/test_rpc.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import conv_bn_model, run_cli
from graphopt import optimize
from graphopt.errors import UsageError
from graphopt.registry import TARGETS


def _overlap_target(sleep_s: float = 0.15):
    from graphopt.plugin import Artifact, LatencyStats, Measurement, Target

    class Overlap(Target):
        name = "overlap"
        state = {"now": 0, "peak": 0, "calls": 0, "threads": set()}
        lock = threading.Lock()

        @property
        def concurrent_measure(self):
            return True

        def compile(self, model, workdir):
            return Artifact(target=self.name, handle=len(model.graph.node))

        def measure(self, artifact, inputs):
            st = type(self).state
            with type(self).lock:
                st["now"] += 1
                st["calls"] += 1
                st["peak"] = max(st["peak"], st["now"])
                st["threads"].add(threading.get_ident())
            time.sleep(sleep_s)
            with type(self).lock:
                st["now"] -= 1
            return Measurement(latency=LatencyStats.from_samples([float(artifact.handle)]), method="estimated",
                               tuned=None)

    return Overlap


@pytest.fixture
def overlap():
    cls = _overlap_target()
    TARGETS.register("overlap", cls)
    try:
        yield cls
    finally:
        TARGETS.unregister("overlap")


def test_jobs_measure_candidates_at_once_and_record_each_once(tmp_path, overlap):
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=4), path)  # 4 conv_bn sites: 16 genotypes
    res = optimize(path, "overlap", budget=6, jobs=3, out=tmp_path / "o", strategy="random", search_exact=True)
    recs = res.records
    new = [r for r in recs if r.duplicate_of is None]
    st = overlap.state
    assert st["peak"] >= 2, st  # measurements overlapped
    # every measured candidate is one record; the budget counts candidates, not launches
    assert res.report["search"]["candidates"]["total_in_store"] == 7, res.report["search"]["candidates"]
    assert res.report["search"]["stopped_because"] == "budget (candidates)"
    assert len({r.genotype for r in recs}) == len(recs)
    measured = [r for r in new if r.status == "ok"]
    assert len({r.graph_hash for r in measured}) == len(measured)  # no graph measured twice
    assert st["calls"] >= len(measured)
    assert all(r.status in ("ok", "infeasible") for r in recs), [(r.status, r.error) for r in recs]


def test_jobs_need_a_target_that_measures_concurrently(convbn_path, tmp_path):
    with pytest.raises(UsageError, match=r"--jobs 2: target ort measures on one device.*tracker"):
        optimize(convbn_path, "ort", budget=1, jobs=2, out=tmp_path / "o")
    with pytest.raises(UsageError, match="--jobs 0"):
        optimize(convbn_path, "ort", budget=1, jobs=0, out=tmp_path / "o2")


def test_cli_jobs_flag_error_names_the_fix(convbn_path, tmp_path):
    r = run_cli("run", str(convbn_path), "--target", "ort", "--jobs", "2", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert "--jobs 2" in r.stderr and "--target-opt tracker=HOST:PORT" in r.stderr


# ------------------------------------------------------------------ the real thing, on loopback
def test_two_rpc_devices_under_one_key_measure_in_parallel(tmp_path):
    """`graphopt run --jobs 2` through a tracker with 2 servers under one key: both servers load
    and time candidates, and the run records every candidate once."""
    import importlib.util
    import json
    import sqlite3

    import onnx

    if importlib.util.find_spec("tvm") is None:
        pytest.skip("apache-tvm not installed")
    from rpc_cluster import RpcCluster

    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=3), path)
    cluster = RpcCluster(servers=2, key="pool", log_dir=tmp_path / "logs")
    with cluster:
        r = run_cli("run", path, "--target", "x86", "--threads", "1", "--tune-trials", "0",
                    "--target-opt", f"tracker={cluster.tracker}", "--target-opt", "key=pool",
                    "--target-opt", "repeat=20", "--jobs", "2", "--search-exact", "--budget", "5", "--out", tmp_path / "out",
                    "--json", timeout=500)
        assert r.returncode == 0, r.stderr[-3000:]
        logs = [(cluster.log_dir / f"server{i}.log").read_text(errors="replace") for i in range(2)]
    assert cluster.leftover_processes() == []
    rep = json.loads(r.stdout)
    assert rep["latency_method"] == "rpc"
    loads = [log.count("load_module") for log in logs]
    assert all(n >= 1 for n in loads), (loads, logs[0][-1500:], logs[1][-1500:])  # both devices measured
    with sqlite3.connect(tmp_path / "out" / "runs.sqlite") as db:
        rows = db.execute("SELECT genotype, status, measurement FROM candidates").fetchall()
    assert len(rows) == 6 and len({g for g, _, _ in rows}) == 6  # original + 5, each once
    assert {json.loads(m)["method"] for _, st, m in rows if st == "ok"} == {"rpc"}
