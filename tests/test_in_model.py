"""targets/in_model.py: the x86 `refine` option re-times a workload's top records inside the
compiled model and keeps the fastest there; its picks hold until the database's best changes."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from conftest import matmul_model

from graphopt.errors import UsageError

pytest.importorskip("tvm")

from graphopt.targets import in_model, tuning  # noqa: E402
from graphopt.targets.x86 import X86Target  # noqa: E402


def test_a_record_must_beat_the_databases_best_by_the_margin():
    times = [{"a": 100e-6, "b": 50e-6, "c": 10e-6},  # build 0: each workload's best database record
             {"a": 90e-6, "b": 49e-6, "c": 12e-6},
             {"a": 95e-6, "b": 60e-6}]  # c has two records only: build 2 reused its rank-1 record
    got = in_model.pick_fastest(times, {"a": 3, "b": 3, "c": 2, "gone": 3}, margin=0.03)
    assert got == {"a": 1, "b": 0, "c": 0}  # b: 2% faster is within the margin; "gone" was never timed
    assert in_model.pick_fastest(times, {"b": 3}, margin=0.0) == {"b": 1}


def test_the_option_is_checked():
    assert X86Target(threads=1).refine == 4
    assert X86Target(threads=1, refine=0).options["refine"] == 0
    with pytest.raises(UsageError, match="refine='many': a count of records"):
        X86Target(threads=1, refine="many")


def test_a_pick_applies_to_a_workload_whose_blocks_are_named_differently(tmp_path):
    """A mutated candidate's workload can equal the original's in structure but not in names (block
    names come from the model's variable names: "lv17_red" there, "lv24_red" here). The database
    matches it structurally; the build must replay the trace on the workload it was tuned on.
    (Found by a MiniLM search: 3 of its 6 candidates failed to compile with "Cannot find a block
    with the name: lv17_red" once the original's picks existed.)"""
    from types import SimpleNamespace

    from graphopt.targets import tvm_common as tc

    tvm = tc.load_tvm()
    import tvm.s_tir.meta_schedule as ms
    from tvm import te, topi

    def reduction(name: str):
        a = te.placeholder((1, 128, 1), "float32", name=name)
        return tvm.IRModule({"main": te.create_prim_func([a, topi.sum(a, axis=1)])})

    tuned_on, candidate = reduction("lv17"), reduction("lv24")
    sch = tvm.s_tir.Schedule(tuned_on)
    *_, inner = sch.get_loops(sch.get_sblock("lv17_red"))
    sch.split(inner, [None, 16])
    llvm = tvm.target.Target({"kind": "llvm"})
    db = tuning.open_db(tmp_path / "db")
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(tuned_on), [1e-5], llvm,
                                                     ms.arg_info.ArgInfo.from_prim_func(tuned_on["main"])))
    (rec,) = db.get_top_k(db.commit_workload(candidate), 1)  # found: structurally equal
    picked = in_model.choice_db(db, [SimpleNamespace(dispatched=[candidate])], lambda _t: rec)
    got = picked.query_schedule(candidate, llvm, "main")  # raised ScheduleError before the fix
    assert got is not None and "lv17_red" in got.mod.script()
    assert len(got.get_loops(got.get_sblock("lv17_red"))) == 4  # the split is there


def _only_task(model, target):
    import tvm.s_tir.meta_schedule as ms

    _, fused = tuning.prepare(target.relax_module(model), target.target)
    (task,) = ms.relax_integration.extract_tasks(fused, target.target)
    return task


@pytest.mark.tvm
def test_refine_times_the_records_in_the_model_and_its_picks_hold_until_the_best_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(in_model, "MIN_MS", 0.0)  # this one-matmul model is far below the real threshold
    model = matmul_model(k=64, n=64, rows=64)
    x = np.random.default_rng(1).standard_normal((1, 64, 64)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    target = X86Target(threads=2, trials=4, refine=3, tuning_db=str(tmp_path / "db"))
    try:
        art = target.compile(model, tmp_path)
        ref = art.info["tuning"]["in_model"]["refine"]
        db_dir = target.tuning_db_dir
        db = tuning.open_db(db_dir)
        task = _only_task(model, target)
        assert len(in_model.top_records(db, task, 3)) >= 2, "4 trials should leave at least 2 records that ran"
        assert ref["workloads"] == 1 and ref["timed"] == 1, ref  # the kernel was found in the model by name
        assert ("base_ms" in ref) == (ref["switched"] == 1), ref  # a switch is confirmed on the whole model
        assert art.info["tuning"]["in_model"]["picks_used"] == (1 if ref["kept"] else 0)
        (entry,) = in_model.load_picks(db_dir).values()
        assert entry["task"] == task.task_name
        assert entry["displaced_s"] == pytest.approx(tuning.task_best_seconds(db, task), rel=1e-6)
        assert (entry["record"] is not None) == ref["kept"]
        np.testing.assert_allclose(target.run_once(art, {"x": x})[0], want, rtol=1e-4, atol=1e-5)
        assert "vm_tir_func" in art.handle.as_text()  # timed as bytecode, built with the picks compiled (vm_exec)

        # checked: the next compile does not time it again
        again = target.compile(model, tmp_path).info["tuning"]["in_model"]
        assert again["refine"]["workloads"] == 0 and "skipped" in again["refine"]

        # a pick of the rank-1 record is used (refine=1: use picks, time nothing) and computes the same
        second = in_model.top_records(db, task, 2)[1]
        entry.update(rank=1, record=second.as_json())
        (db_dir / in_model.PICKS_FILE).write_text(json.dumps({"format": 1, "picks": {in_model._key(task): entry}}))
        used = X86Target(threads=2, trials=4, refine=1, tuning_db=str(tmp_path / "db"))
        art1 = used.compile(model, tmp_path)
        assert art1.info["tuning"]["in_model"] == {"picks_used": 1}
        np.testing.assert_allclose(used.run_once(art1, {"x": x})[0], want, rtol=1e-4, atol=1e-5)
        choice = in_model.current_choice(db, task, in_model.load_picks(db_dir))
        assert str(choice.trace) == str(second.trace)
        # refine=0: the database's best, picks ignored
        off = X86Target(threads=2, trials=4, refine=0, tuning_db=str(tmp_path / "db"))
        assert off.compile(model, tmp_path).info["tuning"]["in_model"] == {"picks_used": 0}

        # a new best record in the database (more tuning) invalidates the pick: checked again
        import tvm.s_tir.meta_schedule as ms

        best = in_model.top_records(db, task, 1)[0]
        faster = [float(s) / 2 for s in best.run_secs]
        db.commit_tuning_record(ms.database.TuningRecord(best.trace, best.workload, faster, best.target,
                                                         best.args_info))
        db = tuning.open_db(db_dir)
        now = in_model.current_choice(db, task, in_model.load_picks(db_dir))
        assert str(now.trace) == str(best.trace) and float(now.run_secs[0]) == pytest.approx(faster[0])
        rechecked = target.compile(model, tmp_path).info["tuning"]["in_model"]
        assert rechecked["refine"]["workloads"] == 1  # the stale pick was not used: the workload was timed again
        assert rechecked["picks_used"] == (1 if rechecked["refine"]["kept"] else 0)

        # a refine that fails does not fail the compile: the database's best records are built
        (db_dir / in_model.PICKS_FILE).unlink()

        def broken(_prepared, seed=0):
            raise RuntimeError("no inputs today")

        monkeypatch.setattr(in_model, "_inputs", broken)
        art2 = target.compile(model, tmp_path)
        assert art2.info["tuning"]["in_model"]["refine"]["error"] == "RuntimeError: no inputs today"
        np.testing.assert_allclose(target.run_once(art2, {"x": x})[0], want, rtol=1e-4, atol=1e-5)
    finally:
        target.close()
