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
def _sessions(log: str) -> list[tuple[float, float, int]]:
    """(start, end, modules loaded) of each RPC session in a TVM rpc_server log: from "connected from"
    to "finish serving", timestamps to the millisecond (TVM's RPCServer log format)."""
    import re
    from datetime import datetime

    out, start, loads = [], None, 0
    for line in log.splitlines():
        m = re.match(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO (.*)$", line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        if m.group(2).startswith("connected from"):
            start, loads = t, 0
        elif m.group(2).startswith("load_module") and start is not None:
            loads += 1
        elif m.group(2).startswith("finish serving") and start is not None:
            out.append((start, t, loads))
            start = None
    return out


@pytest.mark.slow  # ~1-4 min: measurements are made long on purpose (see the docstring)
def test_two_rpc_devices_under_one_key_measure_in_parallel(tmp_path):
    """`graphopt run --jobs 2` through a tracker with 2 servers under one key: a measurement session
    on one device overlaps in time one on the other (from the servers' own logs), and the run
    records every candidate once. A measurement lasts longer than a compile here (number x repeat
    runs of ~0.5-1.5 ms), so with --jobs 2 the next candidate is compiled and sent to the free device
    while the first still measures; with --jobs 1 the sessions never overlap."""
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
                    "--target-opt", "repeat=30", "--target-opt", "number=600", "--jobs", "2", "--search-exact",
                    "--budget", "3", "--out", tmp_path / "out", "--json", timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        logs = [(cluster.log_dir / f"server{i}.log").read_text(errors="replace") for i in range(2)]
    assert cluster.leftover_processes() == []
    rep = json.loads(r.stdout)
    assert rep["latency_method"] == "rpc"
    measured = [[s for s in _sessions(log) if s[2] >= 1] for log in logs]  # sessions that loaded a module
    assert all(measured), ([len(_sessions(log)) for log in logs], logs[0][-1500:], logs[1][-1500:])
    overlaps = [(a, b) for a in measured[0] for b in measured[1] if max(a[0], b[0]) < min(a[1], b[1])]
    assert overlaps, ("no measurement on one device overlapped one on the other", measured)
    with sqlite3.connect(tmp_path / "out" / "runs.sqlite") as db:
        rows = db.execute("SELECT genotype, status, measurement FROM candidates").fetchall()
    assert len(rows) == 4 and len({g for g, _, _ in rows}) == 4  # original + 3, each once
    assert {json.loads(m)["method"] for _, st, m in rows if st == "ok"} == {"rpc"}
