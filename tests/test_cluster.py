"""--cluster: candidate compiles as Ray tasks on a real local Ray cluster (a head and two worker
nodes on 127.0.0.1, each in its own process group, started once for this module: ~30 s).

The fake target is test_compile_workers.SlowCompile (its compile sleeps and logs pid/start/end);
the tuning database lease is checked with the real actor and hook and a fake "tuning" that
appends lines the way MetaSchedule's JSON database does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from graphopt import optimize
from graphopt.errors import UsageError

# the tests with the `cluster` fixture are `slow`: the module's cluster takes ~30 s to start
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed (graphopt[cluster])")

from test_compile_workers import _compiles, _model, _opts, slow_target  # noqa: E402,F401 - the fixture


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray_cluster import RayCluster

    c = RayCluster(workers=2, log_dir=tmp_path_factory.mktemp("ray-logs"))
    with c:
        yield c
    assert c.leftover_processes() == []


def _disconnect():
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_compiles_run_as_ray_tasks_on_both_workers(tmp_path, slow_target, cluster):
    out = tmp_path / "o"
    res = optimize(_model(tmp_path), "slowcompile", budget=6, jobs=2, cluster=cluster.address, search_exact=True,
                   out=out, target_options=_opts(slow_target, sleep_s=1.0))
    recs = res.records
    assert all(r.status == "ok" for r in recs), [(r.status, r.error) for r in recs]
    assert len(recs) == 7 and len({r.genotype for r in recs}) == 7
    new = [r for r in recs if r.genotype and r.duplicate_of is None]
    where = [r.measurement["compiled_in"] for r in new]
    assert all(w["process"] == "compile worker" and w["pid"] != os.getpid() for w in where)
    assert len({w["node"] for w in where}) == 2, where  # both worker nodes compiled
    workers = [c for c in _compiles(slow_target) if c["pid"] != os.getpid()]
    assert any(a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]
               for a in workers for b in workers), "no two compiles overlapped"
    # the job was shipped, not shared: the worker compiled a copy in its own temp folder
    assert all("graphopt-cluster-" in c["model_file"] for c in workers)
    assert res.report["search"]["stopped_because"] == "budget (candidates)"
    assert (out / "best.onnx").exists()
    import ray

    assert not ray.is_initialized()  # the pool disconnected at the end


@pytest.mark.slow
def test_a_compile_that_raises_on_a_worker_is_a_failed_record(tmp_path, slow_target, cluster):
    res = optimize(_model(tmp_path, blocks=2), "slowcompile", budget="120s", cluster=cluster.address,
                   search_exact=True, out=tmp_path / "o", target_options=_opts(slow_target, sleep_s=0.2, fail_nodes=8))
    failed = [r for r in res.records if r.status == "failed"]
    assert len(failed) == 2 and all(r.error == "compile: RuntimeError: boom: cannot compile 8 nodes"
                                    for r in failed), [(r.status, r.error) for r in res.records]
    assert res.report["search"]["stopped_because"] == "search space exhausted"
    assert sum(r.status == "ok" for r in res.records) == 2


@pytest.mark.slow
def test_no_worker_with_the_resource_is_a_usage_error(tmp_path, slow_target, cluster, monkeypatch):
    from graphopt.parallel import cluster_pool

    monkeypatch.setattr(cluster_pool, "RESOURCE", "no_such_resource")
    with pytest.raises(UsageError, match=r"--cluster .*: no worker declares the resource 'no_such_resource'.*"
                                         r"--resources"):
        optimize(_model(tmp_path), "slowcompile", budget=2, cluster=cluster.address, out=tmp_path / "o",
                 target_options=_opts(slow_target))
    _disconnect()


def test_a_target_that_measures_here_is_a_usage_error(tmp_path, convbn_path):
    # checked before Ray is contacted: no cluster needed
    with pytest.raises(UsageError, match=r"--cluster 127.0.0.1:1: target ort cannot measure on devices behind an "
                                         r"RPC tracker.*or drop --cluster"):
        optimize(convbn_path, "ort", budget=1, cluster="127.0.0.1:1", out=tmp_path / "o")


def test_cli_cluster_nobody_answers_is_exit_2(tmp_path):
    from conftest import run_cli

    r = run_cli("run", _model(tmp_path), "--target", "ort", "--cluster", "127.0.0.1:1", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--cluster 127.0.0.1:1: target ort" in r.stderr and "Traceback" not in r.stderr
    h = run_cli("run", "--help")
    assert "--cluster ADDRESS" in h.stdout and "tvm_compiler" in h.stdout
    from graphopt.parallel.cluster_pool import connect

    t = time.monotonic()
    with pytest.raises(UsageError, match=r"--cluster 127.0.0.1:1: nothing answers there .*ray start --head"):
        connect("127.0.0.1:1")
    assert time.monotonic() - t < 15


@pytest.mark.slow
def test_tuning_lease_serializes_tuning_and_merges_every_record(tmp_path, cluster):
    """Two workers 'tune' at once into replicas; the owner's database ends with every line, in
    whole blocks, and the second tune started from the first one's records (nothing re-tuned)."""
    import ray

    from graphopt.parallel import cluster_pool
    from graphopt.parallel.cluster_pool import DB_FILES, TuningDbOwner, _LeaseClient

    master = tmp_path / "master"
    (master / "llvm-x").mkdir(parents=True)
    (master / "llvm-x" / DB_FILES[0]).write_text("w0\n")
    replicas = str(tmp_path)  # the local cluster's workers share this file system
    cluster_pool.connect(cluster.address)
    try:
        owner = ray.remote(num_cpus=0, max_concurrency=8)(TuningDbOwner).remote(str(master), 5.0)

        @ray.remote(num_cpus=0, resources={"tvm_compiler": 1}, max_retries=0)
        def tune(name: str, owner, die: bool):
            import tempfile

            from graphopt.targets import tuning

            tuning.REMOTE_DB = _LeaseClient(owner)
            replica = Path(tempfile.mkdtemp(dir=replicas)) / "llvm-x"
            db = tuning.open_db_locked(replica, and_open=False)  # noqa: F841 - takes the lease
            t0 = time.time()
            seen = (replica / DB_FILES[0]).read_text().splitlines()
            if die:
                os._exit(3)  # a worker lost while it holds the lease
            for i in range(3):
                with open(replica / DB_FILES[0], "a") as f:
                    f.write(f"{name}-w{i}\n")
                with open(replica / DB_FILES[1], "a") as f:
                    f.write(f"{name}-r{i}\n")
                time.sleep(0.3)
            t1 = time.time()  # before the unlock: the next holder may start the moment it returns
            tuning.unlock_db(replica)
            return seen, t0, t1

        (seen_a, a0, a1), (seen_b, b0, b1) = ray.get([tune.remote("a", owner, False), tune.remote("b", owner, False)])
        assert a1 <= b0 or b1 <= a0, "two tunes held the database at once"
        first, second = (seen_a, seen_b) if a0 < b0 else (seen_b, seen_a)
        assert first == ["w0"] and len(second) == 4  # the second saw the first one's 3 new workloads
        lines = (master / "llvm-x" / DB_FILES[0]).read_text().splitlines()
        assert lines[0] == "w0" and sorted(lines[1:4]) == lines[1:4] and sorted(lines[4:]) == lines[4:]
        assert {ln[0] for ln in lines[1:4]} != {ln[0] for ln in lines[4:]}  # whole blocks, not interleaved
        assert len((master / "llvm-x" / DB_FILES[1]).read_text().splitlines()) == 6
        # a holder that dies: its lease expires (ttl 5 s), nothing of it is merged, the next one gets in
        with pytest.raises(ray.exceptions.RayError):
            ray.get(tune.remote("x", owner, True))
        t = time.monotonic()
        seen_c, _, _ = ray.get(tune.remote("c", owner, False), timeout=60)
        assert len(seen_c) == 7 and time.monotonic() - t < 30
        history = ray.get(owner.history.remote())
        assert [h["expired"] for h in history] == [False, False, True, False]
    finally:
        _disconnect()


@pytest.mark.slow
def test_x86_compiles_on_the_cluster_and_measures_on_two_rpc_devices(tmp_path, cluster):
    """The real thing on loopback: x86 (untuned) compiled by Ray tasks on the two worker nodes, the
    library shipped back and measured through a tracker with 2 servers, the best exported."""
    if importlib.util.find_spec("tvm") is None:
        pytest.skip("apache-tvm not installed")
    from conftest import conv_bn_model  # noqa: F401 - _model's
    from rpc_cluster import RpcCluster

    rpc = RpcCluster(servers=2, key="pool", log_dir=tmp_path / "logs")
    out = tmp_path / "out"
    with rpc:
        res = optimize(_model(tmp_path), "x86", budget=4, jobs=2, cluster=cluster.address, search_exact=True,
                       out=out, target_options={"threads": 1, "trials": 0, "tracker": rpc.tracker, "key": "pool",
                                       "repeat": 5})
    assert rpc.leftover_processes() == []
    assert res.exit_code == 0
    ok = [r for r in res.records if r.status == "ok"]
    assert len(res.records) == 5 and {r.measurement["method"] for r in ok} == {"rpc"}, \
        [(r.status, r.error) for r in res.records]
    remote = [r.measurement["compiled_in"] for r in ok if r.genotype and r.duplicate_of is None]
    assert remote and all(w["pid"] != os.getpid() and w["node"] for w in remote)
    assert (out / "model.so").exists()


def test_without_the_flag_ray_is_not_imported(tmp_path, slow_target):
    import subprocess
    import sys

    code = ("import sys, graphopt.cli, graphopt.driver, graphopt.parallel.compile_pool; "
            "print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.slow
def test_a_node_lost_mid_compile_fails_its_candidate_and_a_resumed_run_continues(tmp_path, slow_target, cluster):
    """SIGKILL a whole worker node (raylet and its worker processes) while it compiles: that
    candidate is a failed record naming the lost worker, the run goes on on the other node, the
    store keeps every finished candidate, and a resumed run continues from it. Runs last: the
    node stays dead."""
    import threading

    out = tmp_path / "o"
    killed: list[int] = []

    def kill_the_first_slow_compile():
        end = time.monotonic() + 90
        while time.monotonic() < end:
            for p in slow_target.glob("*.start"):
                pid = int(p.read_text())
                node = cluster.node_of(pid)
                if pid != os.getpid() and node is not None:
                    time.sleep(0.3)  # into its 1.5 s compile
                    cluster.kill_node(node)
                    killed.append(node)
                    return
            time.sleep(0.05)

    th = threading.Thread(target=kill_the_first_slow_compile, daemon=True)
    th.start()
    t0 = time.monotonic()
    res = optimize(_model(tmp_path), "slowcompile", budget=5, cluster=cluster.address, search_exact=True, out=out,
                   target_options=_opts(slow_target, sleep_s=1.5))
    th.join(1)
    assert killed, "no compile was seen on a worker node"
    assert time.monotonic() - t0 < 60
    lost = [r for r in res.records if r.status == "failed"]
    assert lost and all(r.error.startswith("compile: the Ray worker compiling this candidate was lost (")
                        for r in lost), [(r.status, r.error) for r in res.records]
    assert len(res.records) == 6 and res.report["search"]["stopped_because"] == "budget (candidates)"
    # resumed with a bigger budget on the one node left: the store's candidates are not redone
    res2 = optimize(_model(tmp_path), "slowcompile", budget=7, cluster=cluster.address, search_exact=True, out=out,
                    target_options=_opts(slow_target, sleep_s=0.2))
    assert res2.report["search"]["candidates"]["from_store"] >= 5, res2.report["search"]["candidates"]
    assert len(res2.records) == 8 and len({r.genotype for r in res2.records}) == 8
    assert [r.error for r in res2.records if r.status == "failed"] == [r.error for r in lost]
    nodes = {r.measurement["compiled_in"]["node"] for r in res2.records[6:] if r.status == "ok"}
    assert len(nodes) == 1
