"""--compile-workers M: candidates compiled in M spawned worker processes while devices measure.

The pipelined loop is checked with a fake target (`SlowCompile`, defined at module level so a
spawned worker can import it: the worker gets this process's sys.path, which holds tests/)
whose compile sleeps and logs its pid and start/end time to a folder; the real thing (x86
through a loopback RPC tracker with two servers) is at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import onnx
import pytest

from conftest import ROOT, conv_bn_model, run_cli
from graphopt import optimize
from graphopt.errors import UsageError
from graphopt.plugin import Artifact, LatencyStats, Measurement, Target
from graphopt.registry import TARGETS

_COMPILES_HERE = 0  # compiles done by this process (a worker's own count)


class SlowCompile(Target):
    """Compiles by sleeping; writes {pid, start, end, ...} per compile to log_dir. Latency = node count.

    fail_nodes=K: a compile of a K-node graph raises; die_nodes=K: the worker process dies (os._exit);
    slow_after=N: a worker's compiles after its N-th sleep 60 s.
    """

    name = "slowcompile"
    description = "test target: compile sleeps in worker processes"

    def __init__(self, log_dir: str = "", sleep_s: float = 0.5, fail_nodes: int = -1, die_nodes: int = -1,
                 slow_after: int = -1, **options):
        super().__init__(**options)
        self.log_dir, self.sleep_s = Path(log_dir), float(sleep_s)
        self.fail_nodes, self.die_nodes = int(fail_nodes), int(die_nodes)
        self.slow_after = int(slow_after)
        self.deadline = None  # the driver's cheap-first inputs, as x86 has them
        self.incumbent_ms = None

    @property
    def concurrent_measure(self):
        return True

    @property
    def portable_artifacts(self):
        return True

    def compile(self, model, workdir):
        global _COMPILES_HERE
        in_worker = os.getpid() != self.options.get("main_pid")
        _COMPILES_HERE += in_worker
        nodes = len(model.graph.node)
        start = time.time()
        if nodes == self.die_nodes and in_worker:
            os._exit(3)
        if nodes == self.fail_nodes:
            raise RuntimeError(f"boom: cannot compile {nodes} nodes")
        slow = in_worker and self.slow_after >= 0 and _COMPILES_HERE > self.slow_after
        (self.log_dir / f"{uuid.uuid4().hex}.start").write_text(str(os.getpid()))
        time.sleep(60 if slow else self.sleep_s)
        entry = {"pid": os.getpid(), "start": start, "end": time.time(), "nodes": nodes,
                 "incumbent_ms": self.incumbent_ms,
                 "deadline_left": None if self.deadline is None else self.deadline - time.monotonic(),
                 "model_file": str(Path(workdir) / "candidate.onnx")}
        (self.log_dir / f"{uuid.uuid4().hex}.json").write_text(json.dumps(entry))
        return Artifact(target=self.name, info={"nodes": nodes})

    def measure(self, artifact, inputs):
        time.sleep(0.05)
        return Measurement(latency=LatencyStats.from_samples([float(artifact.info["nodes"])]), method="estimated",
                           tuned=None)


class NotPortable(SlowCompile):
    name = "notportable"

    @property
    def portable_artifacts(self):
        return False


@pytest.fixture
def slow_target(tmp_path):
    TARGETS.register("slowcompile", SlowCompile)
    TARGETS.register("notportable", NotPortable)
    log_dir = tmp_path / "compiles"
    log_dir.mkdir()
    try:
        yield log_dir
    finally:
        TARGETS.unregister("slowcompile")
        TARGETS.unregister("notportable")


def _model(tmp_path, blocks=3) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=blocks), path)  # 12 nodes; each conv-bn fusion removes one
    return path


def _compiles(log_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(log_dir.glob("*.json"))]


def _opts(log_dir, **kw):
    return {"log_dir": str(log_dir), "main_pid": os.getpid(), **kw}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie not reaped yet is gone too
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


# ------------------------------------------------------------------------------------ the loop
def test_compiles_run_in_two_worker_processes_at_once(tmp_path, slow_target):
    out = tmp_path / "o"
    res = optimize(_model(tmp_path), "slowcompile", budget=6, jobs=2, compile_workers=2, search_exact=True, out=out,
                   target_options=_opts(slow_target, sleep_s=1.0))
    logs = _compiles(slow_target)
    main = os.getpid()
    workers = [c for c in logs if c["pid"] != main]
    assert len(logs) - len(workers) == 1  # only the original compiles in the search's process
    pids = {c["pid"] for c in workers}
    assert len(pids) == 2, logs
    overlapped = any(a["pid"] != b["pid"] and a["start"] < b["end"] and b["start"] < a["end"]
                     for a in workers for b in workers)
    assert overlapped, [(c["pid"], round(c["start"] % 100, 2), round(c["end"] % 100, 2)) for c in workers]
    # the candidate went as a file in its candidate folder, with the best latency so far
    assert all(c["model_file"].endswith("candidate.onnx") and c["incumbent_ms"] is not None for c in workers)
    recs = res.records
    assert len(recs) == 7 and len({r.genotype for r in recs}) == 7  # original + 6, each once
    assert res.report["search"]["candidates"]["total_in_store"] == 7
    assert res.report["search"]["stopped_because"] == "budget (candidates)"
    assert all(r.status == "ok" for r in recs), [(r.status, r.error) for r in recs]
    new = [r for r in recs if r.genotype and r.duplicate_of is None]
    assert {r.measurement["compiled_in"]["pid"] for r in new} <= pids
    assert all(r.measurement["compiled_in"]["process"] == "compile worker" for r in new)
    assert "compiled_in" not in recs[0].measurement  # the original: compiled in this process
    measured = [r for r in new if r.status == "ok"]
    assert len({r.graph_hash for r in measured}) == len(measured)  # no graph measured twice
    assert (out / "report.json").exists() and (out / "best.onnx").exists()


def test_a_compile_that_raises_in_a_worker_is_a_failed_record(tmp_path, slow_target):
    # 2 conv-bn sites: 3 candidates; the two with one fusion (7 nodes) fail to compile
    res = optimize(_model(tmp_path, blocks=2), "slowcompile", budget="120s", compile_workers=2, search_exact=True,
                   out=tmp_path / "o", target_options=_opts(slow_target, sleep_s=0.2, fail_nodes=8))
    by_nodes: dict[int, list] = {}
    for r in res.records:
        by_nodes.setdefault(9 - sum(v == "applied" for v in r.applied.values()), []).append(r)
    failed = [r for r in res.records if r.status == "failed"]
    assert len(failed) == 2 and by_nodes[8] == failed, [(r.applied, r.status, r.error) for r in res.records]
    assert all(r.error == "compile: RuntimeError: boom: cannot compile 8 nodes" for r in failed), failed[0].error
    assert res.report["search"]["stopped_because"] == "search space exhausted"  # the run went on
    assert [r.status for r in by_nodes[7]] == ["ok"]
    # with a time budget the deadline travels with each job (as seconds left, here < 120 s)
    assert all(0 < c["deadline_left"] <= 120 for c in _compiles(slow_target) if c["pid"] != os.getpid())


def test_a_worker_that_dies_fails_its_candidates_and_the_run_goes_on(tmp_path, slow_target, caplog):
    caplog.set_level("WARNING", logger="graphopt")
    res = optimize(_model(tmp_path, blocks=2), "slowcompile", budget=3, compile_workers=2, search_exact=True,
                   out=tmp_path / "o", target_options=_opts(slow_target, sleep_s=0.2, die_nodes=7))
    died = [r for r in res.records if r.status == "failed"]
    assert died and all("compile worker process died" in r.error for r in died), [r.error for r in res.records]
    assert any("compile worker process died" in m for m in caplog.messages), caplog.messages
    assert len(res.records) == 4 and len({r.genotype for r in res.records}) == 4  # every candidate, once
    assert any(r.status == "ok" and r.genotype for r in res.records)  # compiled by the fresh workers


def test_ctrl_c_ends_the_workers_without_waiting_for_their_compiles(tmp_path, slow_target):
    """Ctrl-C (KeyboardInterrupt in the main thread) while both workers are in a 60 s compile: the
    run stops at once, writes its report, and the worker processes are gone."""
    import _thread
    import threading

    done, fired = threading.Event(), []

    def ctrl_c_when_both_workers_are_in_their_second_compile():
        end = time.monotonic() + 60
        while time.monotonic() < end and not done.is_set():
            if len(list(slow_target.glob("*.start"))) >= 1 + 2 + 2:  # the original, 2 fast, 2 slow
                time.sleep(0.5)
                if not done.is_set():
                    fired.append(time.monotonic())
                    _thread.interrupt_main()
                return
            time.sleep(0.05)

    # a test run started in the background (`make test &`, CI runners) inherits SIGINT as ignored,
    # and then interrupt_main() does nothing: give this test Python's own Ctrl-C handler
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=ctrl_c_when_both_workers_are_in_their_second_compile, daemon=True).start()
    try:
        res = optimize(_model(tmp_path), "slowcompile", budget=6, jobs=2, compile_workers=2, search_exact=True,
                       out=tmp_path / "o", target_options=_opts(slow_target, sleep_s=0.3, slow_after=1))
    finally:
        done.set()
        signal.signal(signal.SIGINT, previous)
    assert fired, "the workers never started their second compile"
    assert time.monotonic() - fired[0] < 15  # not the 60 s the compiles in flight would take
    assert res.report["search"]["stopped_because"] == "interrupted"
    assert (tmp_path / "o" / "report.json").exists()
    worker_pids = {int(p.read_text()) for p in slow_target.glob("*.start")} - {os.getpid()}
    assert len(worker_pids) == 2
    time.sleep(0.5)
    assert all(_gone(pid) for pid in worker_pids), worker_pids


# -------------------------------------------------------------------------------- usage errors
def test_usage_errors_name_the_fix(tmp_path, slow_target, convbn_path):
    with pytest.raises(UsageError, match=r"--compile-workers 0: must be a positive number"):
        optimize(convbn_path, "ort", budget=1, compile_workers=0, out=tmp_path / "a")
    with pytest.raises(UsageError, match=r"--compile-workers 2: target ort measures on this machine.*tracker"):
        optimize(convbn_path, "ort", budget=1, compile_workers=2, out=tmp_path / "b")
    with pytest.raises(UsageError, match=r"--compile-workers 2: target notportable cannot move a compiled "
                                         r"candidate.*use --compile-workers 1"):
        optimize(convbn_path, "notportable", budget=1, compile_workers=2, out=tmp_path / "c",
                 target_options=_opts(slow_target))

    class Local(SlowCompile):
        pass

    TARGETS.register("local", Local)
    try:
        with pytest.raises(UsageError, match=r"defined inside a function.*module level"):
            optimize(convbn_path, "local", budget=1, compile_workers=2, out=tmp_path / "d",
                     target_options=_opts(slow_target))
    finally:
        TARGETS.unregister("local")


def test_cli_compile_workers_flag(tmp_path, convbn_path):
    r = run_cli("run", convbn_path, "--target", "ort", "--compile-workers", "2", "--out", tmp_path / "o")
    assert r.returncode == 2, r.stderr
    assert "--compile-workers 2" in r.stderr and "--target-opt tracker=HOST:PORT" in r.stderr
    assert "Traceback" not in r.stderr
    h = run_cli("run", "--help")
    assert "--compile-workers M" in h.stdout and "worker" in h.stdout


# ---------------------------------------------------------------------- the tuning database lock
def test_tuning_db_lock_excludes_another_process(tmp_path):
    from graphopt.targets.tuning import LOCK_FILE, db_lock

    code = ("import sys, time; from graphopt.targets.tuning import db_lock\n"
            "t = time.monotonic()\nwith db_lock(sys.argv[1]): print(time.monotonic() - t)\n")
    with db_lock(tmp_path / "db"):
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "db")], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT)
        time.sleep(2.0)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert float(out) > 0.5  # it waited for this process to let go (python's own start counts too)
    assert (tmp_path / "db" / LOCK_FILE).exists()


def test_tune_and_build_releases_the_lock_when_it_raises(tmp_path, monkeypatch):
    import fcntl

    from graphopt.targets import tuning

    class Task:
        task_name, weight = "t", 1

    pytest.importorskip("tvm")
    import tvm.s_tir.meta_schedule as ms

    # one task to tune, which fails after the lock was taken
    monkeypatch.setattr(ms.relax_integration, "extract_tasks", lambda fused, target: [Task()])
    monkeypatch.setattr(tuning, "prepare", lambda mod, target, prepack=False: (mod, mod))
    monkeypatch.setattr(tuning, "open_db", lambda d: object())
    monkeypatch.setattr(tuning, "task_best_seconds", lambda db, t: None)
    monkeypatch.setattr(tuning, "task_failed_trials", lambda db, t, limit: 0)

    def tune(*a, **k):
        raise tuning.CompileError("tuning failed")

    monkeypatch.setattr(tuning, "_tune_tasks", tune)
    db = tmp_path / "db"
    with pytest.raises(tuning.CompileError):
        tuning.tune_and_build(None, None, db_dir=db, trials_per_task=1, work_dir=tmp_path)
    with open(db / tuning.LOCK_FILE) as f:  # free again: another holder gets it at once
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---------------------------------------------------------------- the real thing, on loopback
def test_x86_compiles_in_workers_and_measures_on_two_rpc_devices(tmp_path):
    """x86 through a tracker with 2 servers under one key, --jobs 2 --compile-workers 2, untuned:
    the candidates compile in worker processes, measure over RPC, and the best is exported."""
    import importlib.util

    if importlib.util.find_spec("tvm") is None:
        pytest.skip("apache-tvm not installed")
    from rpc_cluster import RpcCluster

    cluster = RpcCluster(servers=2, key="pool", log_dir=tmp_path / "logs")
    out = tmp_path / "out"
    with cluster:
        res = optimize(_model(tmp_path), "x86", budget=4, jobs=2, compile_workers=2, search_exact=True, out=out,
                       target_options={"threads": 1, "trials": 0, "tracker": cluster.tracker, "key": "pool",
                                       "repeat": 5})
        assert res.exit_code == 0
        # a worker's artifact, loaded here, measures over RPC and exports without the executable
        from graphopt.targets.x86 import X86Target

        t = X86Target(threads=1, trials=0, tracker=cluster.tracker, key="pool", repeat=2)
        art = t.portable(t.compile(conv_bn_model(), tmp_path / "w"), tmp_path / "w")
        art = t.load_portable(art)
        assert art.handle is None and Path(art.info["rpc_lib"]).exists()
        import numpy as np

        m = t.measure(art, {"x": np.zeros((1, 3, 16, 16), np.float32)})
        assert m.method == "rpc"
        (lib,) = t.export(art, tmp_path / "exp")
        assert lib.read_bytes() == Path(art.info["library"]).read_bytes()
        t.close()
        # rpi4 shares the code path: its portable library is the aarch64 one a Pi loads
        from graphopt.targets.rpi4 import Rpi4Target

        pi = Rpi4Target(tracker=cluster.tracker, key="pool", cc="tar", trials=0)
        art = pi.load_portable(pi.portable(pi.compile(conv_bn_model(), tmp_path / "p"), tmp_path / "p"))
        assert art.handle is None and art.info["rpc_lib"].endswith(".tar")
        lib, script = pi.export(art, tmp_path / "pi")
        assert lib.name == "model.tar" and lib.read_bytes() == Path(art.info["library"]).read_bytes()
        pi.close()
    assert cluster.leftover_processes() == []
    recs = res.records
    assert len(recs) == 5 and len({r.genotype for r in recs}) == 5
    ok = [r for r in recs if r.status == "ok"]
    assert {r.measurement["method"] for r in ok} == {"rpc"}, [(r.status, r.error) for r in recs]
    pids = {r.measurement["compiled_in"]["pid"] for r in ok if r.genotype and r.duplicate_of is None}
    assert pids and os.getpid() not in pids and len(pids) <= 2
    assert res.report["latency_method"] == "rpc"
    art_files = res.report["outputs"].get("artifact") or []
    assert art_files and all(Path(p).exists() for p in art_files), res.report["outputs"]
    assert (out / "model.so").exists()
