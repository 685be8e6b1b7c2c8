"""MetaSchedule tuning *through TVM RPC*, for real, on loopback (tests/rpc_cluster.py).

The x86 target with tracker/key options tunes with `targets.rpc.ms_runner` (MetaSchedule's
RPCRunner): every trial's module is uploaded to the tracker's device, loaded and timed there.
A one-workload model and one trial keep it short (the cost is the builder pool's start).
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
from conftest import embedding_model, matmul_model
from rpc_cluster import RpcCluster

pytestmark = [pytest.mark.tvm,
              pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="apache-tvm not installed")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = RpcCluster(servers=1, key="local", threads=2, log_dir=tmp_path_factory.mktemp("rpc-logs"))
    with c:
        yield c
    assert not c.leftover_processes()


def _records(db_dir):
    """(run_secs mean) of every tuning record in a MetaSchedule JSON database folder."""
    out = []
    for path in db_dir.glob("database_tuning_record.json"):
        for line in path.read_text().splitlines():
            if line.strip():
                run_secs = json.loads(line)[1][1]
                out.append(sum(float(s) for s in run_secs) / len(run_secs) if run_secs else math.inf)
    return out


def test_tuning_through_rpc_measures_on_the_device(cluster, tmp_path):
    from graphopt.targets.x86 import X86Target

    model = matmul_model(k=24, n=8, rows=4)
    target = X86Target(threads=2, trials=1, tuning_db=str(tmp_path / "db"), tracker=cluster.tracker, key="local")
    assert target.rpc_config is not None and target.rpc_config.tracker == ("127.0.0.1", cluster.tracker_port)
    try:
        art = target.compile(model, tmp_path)  # tune_and_build(..., runner=rpc.ms_runner(cfg))
        stats = art.info["tuning"]
        assert stats["workloads_seen"] >= 1 and stats["trials"] == stats["workloads_seen"], stats
        # every workload got a successful trial (MetaSchedule stores 1e10 s for a failed one)
        assert stats["workloads_tuned"] == stats["workloads_seen"] and not stats["partly_untuned"], stats
        times = _records(target.tuning_db_dir)
        ok = [t for t in times if math.isfinite(t) and t < 1e9]
        assert ok, f"no successful trial in the database: {times}"
        # the trials ran on the RPC server: it loaded MetaSchedule's build artifacts
        log = (cluster.log_dir / "server0.log").read_text(errors="replace")
        assert "tvm_tmp_mod.tar" in log, log[-2000:]

        # numerics: the tuned module (run on the device) computes what onnxruntime computes
        x = np.random.default_rng(1).standard_normal((1, 4, 24)).astype(np.float32)
        want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        got = target.run_once(art, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert art.info["tuned"] is True
    finally:
        target.close()


def test_a_gather_tunes_through_rpc_with_in_bounds_indices(cluster, tmp_path):
    """The RPCRunner's trials get int64 indices in bounds too (tuning_ms.rpc_alloc_in_bounds): with
    MetaSchedule's random fill every trial of a gather failed on the device."""
    from graphopt.targets.x86 import X86Target

    target = X86Target(threads=2, trials=1, tuning_db=str(tmp_path / "db"), tracker=cluster.tracker, key="local")
    try:
        art = target.compile(embedding_model(), tmp_path)
        stats = art.info["tuning"]
        assert stats["workloads_untuned"] == 0 and stats["workloads_tuned"] >= 1, stats
        ids = np.array([[999, 0, 5, 77] * 4], dtype=np.int64)
        want = ort.InferenceSession(embedding_model().SerializeToString()).run(None, {"ids": ids})[0]
        np.testing.assert_allclose(target.run_once(art, {"ids": ids})[0], want)
    finally:
        target.close()
