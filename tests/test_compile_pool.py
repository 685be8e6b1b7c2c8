"""graphopt/parallel/compile_pool.py on its own: spawned workers, each with its own target built once from
the class path and options; jobs are files; errors come back as values (one line plus the
worker's traceback), TargetUnreachable keeps its class; a dead worker is replaced by restart();
close(kill=True) does not wait for a long compile. (The driver's use of it: test_compile_workers.py.)"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import onnx
import pytest

from conftest import conv_bn_model
from graphopt.parallel.compile_pool import CompilePool, WorkerCompileError, class_path
from graphopt.errors import CompileError, TargetUnreachable, UsageError
from graphopt.plugin import Artifact, Target

_INSTANCES = 0  # targets built in this process


class ModeTarget(Target):
    """Compiles as workdir/mode.txt says: ok | raise | long | graphopt | unreachable | die | sleep:S."""

    name = "modetarget"

    def __init__(self, tag: str = "", **options):
        global _INSTANCES
        super().__init__(**options)
        _INSTANCES += 1
        self.instance = _INSTANCES
        self.tag = tag
        self.deadline = None  # cheap-first knobs the pool sets before each compile
        self.incumbent_ms = None

    def compile(self, model, workdir):
        mode = (Path(workdir) / "mode.txt").read_text().strip() if (Path(workdir) / "mode.txt").exists() else "ok"
        if mode == "raise":
            raise ValueError("bad weights\nsecond line never shown")
        if mode == "long":
            raise ValueError("x" * 2000)
        if mode == "graphopt":
            raise CompileError("op Frob (node 'f0') has no lowering")
        if mode == "unreachable":
            raise TargetUnreachable("the device went away: restart it")
        if mode == "die":
            os._exit(7)
        if mode.startswith("sleep:"):
            time.sleep(float(mode.split(":")[1]))
        return Artifact(target=self.name, info={
            "pid": os.getpid(), "instance": self.instance, "instances_here": _INSTANCES, "tag": self.tag,
            "nodes": len(model.graph.node), "incumbent_ms": self.incumbent_ms,
            "deadline_left": None if self.deadline is None else self.deadline - time.monotonic()})


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("m") / "candidate.onnx"
    onnx.save(conv_bn_model(blocks=2), p)
    return p


@pytest.fixture
def pool():
    pools = []

    def make(workers=1, **options):
        p = CompilePool(workers, "modetarget", class_path(ModeTarget), options)
        pools.append(p)
        return p

    yield make
    for p in pools:
        p.close(kill=True)


def _job(tmp_path: Path, name: str, mode: str = "ok") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "mode.txt").write_text(mode)
    return d


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie of an ended child counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------ no workers
def test_class_path():
    assert class_path(ModeTarget) == "test_compile_pool:ModeTarget"

    class Local(Target):
        pass

    with pytest.raises(UsageError, match=r"Local is defined inside a function.*--compile-workers 1"):
        class_path(Local)


def test_worker_compile_error_pickles_with_its_traceback():
    e = WorkerCompileError("ValueError: bad", "Traceback ...\nValueError: bad\n")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is WorkerCompileError and str(back) == "ValueError: bad"
    assert back.remote_traceback == e.remote_traceback


def test_import_is_cheap():
    code = ("import sys, graphopt.parallel.compile_pool\n"
            "bad = [m for m in ('onnx', 'tvm', 'torch', 'onnxruntime') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------- workers
def test_compiles_in_a_worker_with_its_own_target_and_the_knobs(pool, model_path, tmp_path):
    p = pool(1, tag="from-options")
    wall_deadline = time.time() + 100.0
    art = p.submit(model_path, _job(tmp_path, "a"), {"incumbent_ms": 1.5, "deadline_wall": wall_deadline,
                                                     "no_such_knob": 1}).result(timeout=120)
    info = art.info
    assert info["pid"] != os.getpid() and info["pid"] in p.pids()
    assert info["tag"] == "from-options" and info["nodes"] == len(conv_bn_model(blocks=2).graph.node)
    assert info["incumbent_ms"] == 1.5
    assert 90.0 < info["deadline_left"] <= 100.0  # wall clock turned into the worker's monotonic clock
    where = info["compiled_in"]
    assert where["pid"] == info["pid"] and where["started"] <= where["ended"] and where["compile_s"] >= 0
    # the target is built once per worker: a second job finds the same instance
    again = p.submit(model_path, _job(tmp_path, "b"), {"deadline_wall": None}).result(timeout=120).info
    assert again["pid"] == info["pid"] and again["instance"] == info["instance"] and again["instances_here"] == 1
    assert again["deadline_left"] is None and again["incumbent_ms"] == 1.5  # a knob not sent keeps its value
    assert _INSTANCES == 0  # nothing was built in this process


def test_two_workers_compile_at_once(pool, model_path, tmp_path):
    p = pool(2)
    t0 = time.monotonic()
    futs = [p.submit(model_path, _job(tmp_path, f"s{i}", "sleep:3"), {}) for i in range(2)]
    pids = {f.result(timeout=180).info["pid"] for f in futs}
    assert len(pids) == 2 and set(p.pids()) == pids
    # both slept 3 s: at once, not one after the other (worker start-up is not part of this)
    starts = [f.result().info["compiled_in"]["started"] for f in futs]
    ends = [f.result().info["compiled_in"]["ended"] for f in futs]
    assert max(starts) < min(ends), (starts, ends, time.monotonic() - t0)


@pytest.mark.parametrize("mode,message", [
    ("raise", "ValueError: bad weights"),            # type named, first line only
    ("graphopt", "op Frob (node 'f0') has no lowering"),  # a GraphoptError's own message, as in-process
])
def test_a_compile_that_raises_comes_back_as_one_line(pool, model_path, tmp_path, mode, message):
    p = pool(1)
    fut = p.submit(model_path, _job(tmp_path, "e", mode), {})
    with pytest.raises(WorkerCompileError) as e:
        fut.result(timeout=120)
    assert str(e.value) == message
    assert "Traceback" in e.value.remote_traceback and "in compile" in e.value.remote_traceback
    # the worker survives: the next job compiles
    assert p.submit(model_path, _job(tmp_path, "ok"), {}).result(timeout=120).info["nodes"] > 0


def test_long_messages_are_cut(pool, model_path, tmp_path):
    p = pool(1)
    with pytest.raises(WorkerCompileError) as e:
        p.submit(model_path, _job(tmp_path, "l", "long"), {}).result(timeout=120)
    assert str(e.value) == "ValueError: " + "x" * 500


def test_target_unreachable_keeps_its_class(pool, model_path, tmp_path):
    p = pool(1)
    with pytest.raises(TargetUnreachable, match="the device went away: restart it"):
        p.submit(model_path, _job(tmp_path, "u", "unreachable"), {}).result(timeout=120)


def test_a_dead_worker_breaks_the_pool_until_restart(pool, model_path, tmp_path):
    p = pool(1)
    first = p.submit(model_path, _job(tmp_path, "a"), {}).result(timeout=120).info["pid"]
    with pytest.raises(BrokenProcessPool):
        p.submit(model_path, _job(tmp_path, "d", "die"), {}).result(timeout=120)
    p.restart()
    info = p.submit(model_path, _job(tmp_path, "b"), {}).result(timeout=120).info
    assert info["pid"] != first and info["instance"] == 1  # a fresh worker with a fresh target
    assert _gone(first)


def test_close_kill_does_not_wait_for_a_long_compile(pool, model_path, tmp_path):
    p = pool(1)
    p.submit(model_path, _job(tmp_path, "w"), {}).result(timeout=120)  # the worker is up
    (pid,) = p.pids()
    fut = p.submit(model_path, _job(tmp_path, "s", "sleep:30"), {})
    time.sleep(1.0)
    t0 = time.monotonic()
    p.close(kill=True)
    assert time.monotonic() - t0 < 15
    end = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < end:
        time.sleep(0.1)
    assert _gone(pid)
    # it never finished its 30 s compile: still pending, cancelled or failed, never a result
    assert not fut.done() or fut.cancelled() or fut.exception() is not None
    p.close()  # closing again is a no-op


def test_workers_ignore_ctrl_c(pool, model_path, tmp_path):
    """SIGINT is the search process's to handle: a worker it reaches goes on compiling."""
    p = pool(1)
    p.submit(model_path, _job(tmp_path, "w"), {}).result(timeout=120)  # the worker is up (its initializer ran)
    fut = p.submit(model_path, _job(tmp_path, "s", "sleep:2"), {})
    time.sleep(0.5)
    (pid,) = p.pids()
    os.kill(pid, signal.SIGINT)
    info = fut.result(timeout=120).info
    assert info["pid"] == pid and p.pids() == [pid]
