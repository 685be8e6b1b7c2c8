"""MetaSchedule tuning with a persistent database (targets/tuning.py, X86Target with trials > 0).

Tuning is slow (tens of seconds per workload on 2 cores even at 2 trials), so these tests use
one-workload models and share one database across the module: the first test tunes, the later
ones must reuse it.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import embedding_model, matmul_model, run_cli

pytest.importorskip("tvm")

from graphopt.targets import tuning  # noqa: E402
from graphopt.targets.x86 import X86Target  # noqa: E402

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def db_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tuning-db")


def test_db_dir_is_per_target_and_overridable(tmp_path, monkeypatch):
    a = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
    b = {"kind": "llvm", "mcpu": "znver3", "num-cores": 4}
    assert tuning.target_key(a) == tuning.target_key(dict(a))
    assert tuning.target_key(a) != tuning.target_key(b)
    assert tuning.target_key(a).startswith("llvm-znver3-2c-")
    monkeypatch.setenv("GRAPHOPT_TUNING_DB", str(tmp_path / "env"))
    assert tuning.db_dir_for(a) == tmp_path / "env" / tuning.target_key(a)
    assert tuning.db_dir_for(a, tmp_path / "flag") == tmp_path / "flag" / tuning.target_key(a)


def test_tuned_compile_then_database_reuse(db_root, tmp_path):
    model = matmul_model()
    target = X86Target(threads=2, trials=2, tuning_db=str(db_root))
    try:
        art = target.compile(model, tmp_path)
        first = art.info["tuning"]
        assert first["workloads_seen"] >= 1
        assert first["workloads_tuned"] == first["workloads_seen"], first
        assert first["workloads_reused"] == 0 and first["trials"] == 2 * first["workloads_seen"]
        assert art.info["tuned"] is True
        # numerics: the tuned code computes what onnxruntime computes
        x = np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)
        want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(target.run_once(art, {"x": x})[0], want, rtol=1e-4, atol=1e-5)
        m = target.measure(art, {"x": x})
        assert m.tuned is True and m.extra["tuning"]["workloads_tuned"] == first["workloads_tuned"]
        assert "note" not in m.extra  # no "untuned" warning on tuned code

        # the same model again: everything comes from the database, nothing is tuned
        again = target.compile(model, tmp_path).info["tuning"]
        assert again["workloads_tuned"] == 0 and again["workloads_reused"] == again["workloads_seen"]
        assert again["tuning_s"] < 1.0
    finally:
        target.close()


def test_new_workloads_over_the_cap_are_measured_and_marked_partly_untuned(db_root, tmp_path):
    target = X86Target(threads=2, trials=2, tuning_db=str(db_root), max_new_tasks=0)
    try:
        art = target.compile(matmul_model(k=48), tmp_path)  # another shape: a workload the db lacks
        stats = art.info["tuning"]
        assert stats["workloads_untuned"] >= 1 and stats["partly_untuned"] is True
        assert stats["workloads_tuned"] == 0
        assert art.info["tuned"] is False
        m = target.measure(art, {"x": np.zeros((1, 8, 48), np.float32)})
        assert m.latency.median_ms > 0
        assert m.extra["note"].startswith("partly untuned: 1 of 1 workloads"), m.extra["note"]
    finally:
        target.close()


def test_cli_run_reports_tuning_and_reuse(db_root, tmp_path):
    """Through the CLI: the original's workload is already in the database (tuned above)."""
    model = matmul_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    r = run_cli("run", path, "--target", "x86", "--tune-trials", "2", "--tuning-db", db_root, "--budget", "1",
                "--out", out, "--json", "--threads", "2")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["tuned"] is True
    t = rep["tuning"]
    assert t["workloads_seen"] >= 1 and t["workloads_reused"] == t["workloads_seen"], t
    assert t["workloads_tuned"] == 0 and t["reuse_ratio"] == 1.0
    assert rep["target"]["tuning"]["trials_per_workload"] == 2


def test_tune_flags_rejected_for_a_target_that_does_not_tune(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(matmul_model().SerializeToString())
    r = run_cli("run", path, "--target", "ort", "--tune-trials", "4", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert "does not tune" in r.stderr and "x86" in r.stderr
    assert not (tmp_path / "o").exists()


def test_bad_trials_option():
    with pytest.raises(Exception, match="trials"):
        X86Target(trials="many")
    with pytest.raises(Exception, match=">= 0"):
        X86Target(trials=-1)


def test_workload_that_failed_every_trial_is_not_tuned_again(tmp_path, monkeypatch):
    """A workload whose earlier trials all failed (MetaSchedule records 1e10 s) is not tuned again
    at the next compile with the same budget; it is reported untuned, with why."""
    import tvm.s_tir.meta_schedule as ms
    from tvm.ir.utils import derived_object

    calls = [0]  # trials the runner was asked to run (derived_object hides class attributes)

    @derived_object
    class FailingRunner(ms.runner.PyRunner):
        def run(self, runner_inputs):
            calls[0] += len(runner_inputs)
            return [_Done(ms.runner.RunnerResult(run_secs=None, error_msg="test: device says no"))
                    for _ in runner_inputs]

    @derived_object
    class _Done(ms.runner.PyRunnerFuture):
        def __init__(self, result):
            super().__init__()
            self._result = result

        def done(self):
            return True

        def result(self):
            return self._result

    from graphopt.targets import tvm_common as tc

    tc.load_tvm(2)
    mod = tc.import_onnx(matmul_model(k=40))
    target = tc.llvm_target(tc.host_mcpu(), 2)
    db = tmp_path / "db"
    _, first = tuning.tune_and_build(mod, target, db_dir=db, trials_per_task=2, work_dir=tmp_path,
                                     runner=FailingRunner(), num_threads=2)
    assert calls[0] >= 1 and first.workloads_tuned == 0 and first.workloads_untuned == first.workloads_seen
    assert "no successful trial" in first.stopped_because
    before = calls[0]
    _, again = tuning.tune_and_build(mod, target, db_dir=db, trials_per_task=2, work_dir=tmp_path,
                                     runner=FailingRunner(), num_threads=2)
    assert calls[0] == before and again.trials == 0, again  # not tuned again
    assert again.workloads_untuned == again.workloads_seen and "not retried" in again.stopped_because
    monkeypatch.setenv("GRAPHOPT_MS_RETRY_FAILED", "1")
    _, third = tuning.tune_and_build(mod, target, db_dir=db, trials_per_task=2, work_dir=tmp_path,
                                     runner=FailingRunner(), num_threads=2)
    assert calls[0] > before and third.trials > 0


def test_workload_tuning_left_without_any_record_is_not_tuned_again(tmp_path, monkeypatch):
    """MetaSchedule records a trial that fails to run (1e10 s), but a task whose sampled schedules are
    all rejected before they are built (on cuda: schedules over the GPU's thread or shared-memory
    limits) leaves no record at all. Such a workload looked new at every compile and was tuned again:
    16 of EfficientNet-Lite0's 47 cuda workloads, 27-89 s per compile on this machine (likely also
    why a rerun on an H200 was slow). Here the tuner is stubbed to leave nothing behind; the next compile with the same budget must
    skip those workloads, and the build with the database must still run (TVM's default schedules)."""
    from graphopt.targets import tvm_common as tc

    tuned = []
    monkeypatch.setattr(tuning, "_tune_tasks", lambda ms, tasks, *a, **k: tuned.extend(t.task_name for t in tasks))
    tc.load_tvm(2)
    mod = tc.import_onnx(matmul_model(k=40))
    target = tc.llvm_target(tc.host_mcpu(), 2)
    db = tmp_path / "db"

    def compile_once():
        return tuning.tune_and_build(mod, target, db_dir=db, trials_per_task=2, work_dir=tmp_path, num_threads=2)

    ex, first = compile_once()
    assert tuned and first.workloads_tuned == 0 and first.workloads_untuned == first.workloads_seen
    assert "no successful trial" in first.stopped_because
    before = len(tuned)
    ex2, again = compile_once()
    assert len(tuned) == before and again.trials == 0, again  # not tuned again
    assert again.workloads_untuned == again.workloads_seen and "not retried" in again.stopped_because
    x = np.random.default_rng(0).standard_normal((1, 8, 40)).astype(np.float32)
    (want,) = ort.InferenceSession(matmul_model(k=40).SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for built in (ex, ex2):  # the recorded failures are never applied: TVM's default schedules run
        np.testing.assert_allclose(tc.run_vm(built, tc.load_tvm().cpu(), [x])[0], want, rtol=1e-5, atol=1e-5)
    _, bigger = tuning.tune_and_build(mod, target, db_dir=db, trials_per_task=4, work_dir=tmp_path, num_threads=2)
    assert len(tuned) > before  # a larger budget tries again
    monkeypatch.setenv("GRAPHOPT_MS_RETRY_FAILED", "1")
    n = len(tuned)
    compile_once()
    assert len(tuned) > n


def test_foreign_handlers_on_the_meta_schedule_logger_do_not_crash_tuning():
    """MetaSchedule re-configures its logger by handler name at every tuning call; an unnamed
    handler (pytest's LogCaptureHandler ended up there in this suite) crashed it."""
    import logging

    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    own, foreign = logging.StreamHandler(), logging.StreamHandler()
    own.set_name("tvm.s_tir.meta_schedule.console")
    lg.addHandler(own)
    lg.addHandler(foreign)
    try:
        tuning._ms_logger_handlers_fixup()
        assert own in lg.handlers and foreign not in lg.handlers
    finally:
        lg.removeHandler(own)
        lg.removeHandler(foreign)


def test_a_gather_is_tuned_with_in_bounds_indices(tmp_path):
    """MetaSchedule fills a trial's inputs at random; as indices, random int64 values are out of
    bounds and every trial of a gather failed (MiniLM's embedding takes ran untuned). The runner
    graphopt gives MetaSchedule fills int32/int64 tensors with zeros (tuning_ms.alloc_in_bounds)."""
    model = embedding_model()
    target = X86Target(threads=2, trials=2, tuning_db=str(tmp_path / "db"), refine=0)
    try:
        art = target.compile(model, tmp_path)
        stats = art.info["tuning"]
        assert stats["workloads_untuned"] == 0 and stats["workloads_tuned"] >= 1, stats
        assert art.info["tuned"] is True
        ids = np.array([[3, 999, 0, 512] * 4], dtype=np.int64)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(target.run_once(art, {"ids": ids})[0], sess.run(None, {"ids": ids})[0])
    finally:
        target.close()
