"""TVM RPC measurement for real, on loopback: a tracker and servers on 127.0.0.1 (tests/rpc_cluster.py)."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, conv_bn_model, run_cli
from graphopt.targets.rpc import RpcConfig, check_reachable
from rpc_cluster import RpcCluster, free_port, group_members

from graphopt.errors import TargetUnreachable, UsageError

needs_tvm = pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="apache-tvm not installed")


# ------------------------------------------------------------------------- config (no tvm)
def test_config_from_options_and_env():
    env = {"GRAPHOPT_RPC_TRACKER": "10.0.0.1:9190", "GRAPHOPT_RPC_KEY": "pi4"}
    c = RpcConfig.from_options({}, env=env)
    assert c.tracker == ("10.0.0.1", 9190) and c.key == "pi4" and c.server is None
    c = RpcConfig.from_options({"tracker": "127.0.0.1:9000", "session_timeout": 5}, env=env)  # options win
    assert c.tracker == ("127.0.0.1", 9000) and c.key == "pi4" and c.session_timeout == 5.0
    assert RpcConfig.from_options({}, env={}) is None
    assert RpcConfig.from_options({"server": "pi.local:9090"}, env={}).server == ("pi.local", 9090)
    with pytest.raises(UsageError, match="key=NAME"):
        RpcConfig.from_options({"tracker": "127.0.0.1:9190"}, env={})
    with pytest.raises(UsageError, match="HOST:PORT"):
        RpcConfig.from_options({"tracker": "9190", "key": "k"}, env={})
    with pytest.raises(UsageError, match="not both"):
        RpcConfig.from_options({"tracker": "a:1", "key": "k", "server": "b:2"}, env={})
    with pytest.raises(UsageError, match="without a device"):
        RpcConfig.from_options({"key": "k"}, env={})
    with pytest.raises(UsageError, match="session_timeout"):
        RpcConfig.from_options({"server": "a:1", "session_timeout": -1}, env={})


def test_check_reachable_refused_names_the_fix():
    port = free_port()  # nothing listens there
    with pytest.raises(TargetUnreachable) as e:
        check_reachable(RpcConfig(tracker=("127.0.0.1", port), key="local"), timeout=2)
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "connection refused" in msg
    assert "tvm.exec.rpc_tracker" in msg and "query_rpc_tracker" in msg
    with pytest.raises(TargetUnreachable, match=f"RPC server 127.0.0.1:{port} is unreachable"):
        check_reachable(RpcConfig(server=("127.0.0.1", port)), timeout=2)


@needs_tvm
def test_cli_unreachable_tracker_exits_4(tmp_path):
    model = tmp_path / "m.onnx"
    import onnx

    onnx.save(conv_bn_model(), model)
    port = free_port()
    t = time.monotonic()
    r = run_cli("run", model, "--target", "x86", "--target-opt", f"tracker=127.0.0.1:{port}", "--target-opt",
                "key=local", "--out", tmp_path / "out", "--budget", "1", timeout=120)
    assert r.returncode == 4, r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and f"RPC tracker 127.0.0.1:{port} is unreachable (connection refused)" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t < 60  # no 60 s retry loop


# ------------------------------------------------------------------------- a real cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if importlib.util.find_spec("tvm") is None:
        pytest.skip("apache-tvm not installed")
    c = RpcCluster(servers=1, key="local", log_dir=tmp_path_factory.mktemp("rpc-logs"))
    with c:
        yield c
    assert c.leftover_processes() == [], "RPC tracker/server processes (or popen_worker children) left running"


def _x86(cluster, **kw):
    from graphopt.targets.x86 import X86Target

    return X86Target(threads=1, tracker=cluster.tracker, key=cluster.key, **kw)


def test_x86_over_rpc_matches_onnxruntime(cluster, tmp_path):
    import onnxruntime as ort

    model = conv_bn_model()
    t = _x86(cluster, repeat=3)
    t.check()
    art = t.compile(model, tmp_path)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (got,) = t.run_once(art, {"x": x})
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    m = t.measure(art, {"x": x})
    assert m.method == "rpc" and m.latency.repeats == 3 and m.latency.median_ms > 0
    assert m.threads == 1  # the server's TVM_NUM_THREADS, read on the device
    assert "key 'local'" in m.device
    assert t.describe()["device"] == "TVM RPC device 'local'"
    t.close()


def test_cli_run_over_rpc(cluster, tmp_path):
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), model)
    r = run_cli("run", model, "--target", "x86", "--threads", "1", "--target-opt", f"tracker={cluster.tracker}",
                "--target-opt", "key=local", "--target-opt", "repeat=2", "--out", tmp_path / "out", "--budget", "2",
                "--json", timeout=400)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["latency_method"] == "rpc"
    assert rep["target"]["rpc"]["tracker"] == cluster.tracker
    assert "ort_reference" not in rep  # timed on another device: onnxruntime here is no comparison
    with sqlite3.connect(tmp_path / "out" / "runs.sqlite") as db:
        methods = {json.loads(m)["method"] for (m,) in db.execute(
            "SELECT measurement FROM candidates WHERE measurement IS NOT NULL")}
    assert methods == {"rpc"}
    assert (tmp_path / "out" / "model.so").exists()


def test_session_timeout_is_unreachable_with_the_fix(cluster, tmp_path):
    t = _x86(cluster, session_timeout=1, number=200000, repeat=3, warmup=0)
    art = t.compile(conv_bn_model(), tmp_path)
    x = np.zeros((1, 3, 16, 16), np.float32)
    t0 = time.monotonic()
    with pytest.raises(TargetUnreachable, match="session_timeout=1 s .*raise --target-opt session_timeout"):
        t.measure(art, {"x": x})
    assert time.monotonic() - t0 < 30
    assert cluster.registered() == 1  # the server survives an expired session
    t.close()


def test_rpi4_code_goes_through_rpc(cluster, tmp_path):
    """rpi4 with a tracker measures over RPC: an x86 server cannot load aarch64 code, and says so
    as a failed candidate (RuntimeError), not as an unreachable device."""
    from graphopt.targets.rpi4 import Rpi4Target

    t = Rpi4Target(tracker=cluster.tracker, key=cluster.key, cc="tar")
    t.check()
    art = t.compile(conv_bn_model(), tmp_path)
    with pytest.raises(RuntimeError, match="failed on the device") as e:
        t.measure(art, {"x": np.zeros((1, 3, 16, 16), np.float32)})
    assert not isinstance(e.value, TargetUnreachable)
    assert cluster.registered() == 1
    t.close()


def _store_rows(out: Path) -> list[tuple]:
    db_path = out / "runs.sqlite"
    if not db_path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT genotype, status FROM candidates").fetchall()
    except sqlite3.Error:
        return []


def test_server_dies_mid_run_then_resume(cluster, tmp_path):
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), model)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "graphopt", "run", str(model), "--target", "x86", "--threads", "1", "--passes",
            "conv_bn,kernel", "--search-exact", "--allow-synthetic", "--budget", "30", "--target-opt",
            f"tracker={cluster.tracker}", "--target-opt",
            "key=local", "--target-opt", "repeat=2", "--target-opt", "request_timeout=10", "--out", str(out),
            "--json"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        end = time.monotonic() + 300
        while sum(s == "ok" for _, s in _store_rows(out)) < 2:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < end, "the run measured fewer than 2 candidates in 300 s"
            time.sleep(0.2)
        pgid = cluster.servers[0].pid
        cluster.kill_server(0)
        assert group_members(pgid) == []  # the server and its popen_worker children are gone
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, stderr
    rep = json.loads(stdout)
    assert rep["status"] == "unreachable"
    assert "RPC" in rep["search"]["stopped_because"]
    first = _store_rows(out)
    assert sum(s == "ok" for _, s in first) >= 2
    assert (out / "report.json").exists()

    cluster.start_server()  # the device is back, under the same key
    done = len([g for g, _ in first if g != "{}"])
    resume = args[3:]
    resume[resume.index("--budget") + 1] = str(done + 2)  # two more candidates than stored
    r = run_cli(*resume, timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["search"]["resumed"] is True and rep["latency_method"] == "rpc"
    assert rep["search"]["candidates"]["from_store"] == done
    assert rep["search"]["candidates"]["new"] == 2  # exactly the two the budget leaves
    rows = _store_rows(out)
    assert len(rows) == len(first) + 2
    assert rows[:len(first)] == first  # every finished candidate kept as it was
    genotypes = [g for g, _ in rows]
    assert len(genotypes) == len(set(genotypes)), "a stored candidate was measured again"
