"""In-model selection of tuned schedules: the x86 option `refine` (docs/compiler.md).

MetaSchedule ranks a workload's schedules by timing each kernel alone, in a loop, on warm
caches. Inside a model the same kernel reads weights the previous kernels pushed out of the
cache and inputs the other core just wrote: EfficientNet-Lite0's kernels took ~1.3x their
records there, and the order of a workload's top records was not the same (measured
2026-11-28: 13 of 35 workloads had a faster record than the database's best, in the model).

`build` re-times the top-K records of the workloads that matter *inside the compiled model*:
K builds, build k using the k-th record of every workload being checked (and the current pick
of every other one), each kernel timed per model run by the VM's instrument hook (median of
RUNS runs, the builds taking turns). Per workload it keeps the record fastest there when it beats the database's best
by MARGIN, builds the model with those picks, and keeps them only if the whole model is
faster than with the database's best records, timed alternately in this process.

The picks live next to the database, in `in_model.json` (keyed by the workload's structural
hash; each holds the chosen record and the run time of the database record it displaced). A
pick holds while the database's best record for its workload is still that one: a newer best
record (more tuning) invalidates it, and the workload is checked again at the next refine.
Workloads checked without a better record are stored too (no record), so they are not re-timed.

Measuring in the compile is safe because `refine` runs only for a target that measures on
this machine, and graphopt refuses --compile-workers > 1 there (driver._check_compile_workers).
Importing this module does not import tvm.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from graphopt.runstore.outputs import atomic_write_json

from .qdq_lower import _ty  # a Relax expr's tensor type (`ty` in TVM 0.27)

log = logging.getLogger("graphopt.tuning")

PICKS_FILE = "in_model.json"
MIN_MS = 0.5  # refine only when the unchecked workloads' records add up to this much per model run...
MIN_SHARE = 0.2  # ...and to this share of the model's kernel time (a mutated candidate's few new workloads: no)
MARGIN = 0.03  # a record replaces the database's best only when this much faster in the model
SETTLE_S = 1.0  # untimed runs after building, before timing (see _settle)
RUNS = 100  # instrumented model runs per build (median per kernel), in turns with the other builds
PROFILE_RUNS = 50  # instrumented runs of the budget's in-model profile (tune_budget: alloc_in_model)


def _key(task) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(task.dispatched[0]))


def _mean(rec) -> float:
    secs = [float(s) for s in rec.run_secs] if rec.run_secs else [1e10]
    return sum(secs) / len(secs)


def top_records(db, task, k: int) -> list:
    """The workload's best k records that ran (MetaSchedule stores 1e10 s for a failed trial)."""
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return []
    return [r for r in db.get_top_k(db.commit_workload(mod), k) if _mean(r) < 1e9]


def load_picks(db_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(db_dir) / PICKS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("picks", {}) if isinstance(data, dict) and data.get("format") == 1 else {}


def _valid(entry: dict | None, best) -> bool:
    """A pick holds while the database's best record is the one it displaced."""
    return bool(entry) and best is not None and math.isclose(entry["displaced_s"], _mean(best), rel_tol=1e-6)


def current_choice(db, task, picks: dict[str, Any]):
    """The record a build uses for `task`: its valid in-model pick, else the database's best (None: none ran)."""
    top = top_records(db, task, 1)
    best = top[0] if top else None
    entry = picks.get(_key(task))
    if _valid(entry, best) and entry.get("record") is not None:
        import tvm.s_tir.meta_schedule as ms

        return ms.database.TuningRecord.from_json(entry["record"], db.commit_workload(task.dispatched[0]))
    return best


def choice_db(db, tasks, choose: Callable[[Any], Any]):
    """A MemoryDatabase holding, per task, the one record `choose(task)` returns (None: no record).

    Each record keeps the workload it was tuned on, not the task's module: the two are only
    structurally equal. A trace names blocks (`get_sblock("lv17_red")`), and block names come from
    the model's variable names, so a mutated candidate's otherwise identical workload has
    "lv24_red"; MetaSchedule replays a trace on the record's own workload, which then fits."""
    import tvm.s_tir.meta_schedule as ms

    mdb = ms.database.MemoryDatabase(module_equality="structural")
    for t in tasks:
        r = choose(t)
        if r is not None:
            w = mdb.commit_workload(r.workload.mod)
            mdb.commit_tuning_record(ms.database.TuningRecord(r.trace, w, r.run_secs, r.target, r.args_info))
    return mdb


def pick_fastest(times: list[dict[str, float]], n_records: dict[str, int], margin: float = MARGIN) -> dict[str, int]:
    """Per workload name, the rank (0: the database's best) whose in-model time is lowest, when
    it beats rank 0 by `margin`; times[k][name] is the kernel's time per model run in build k."""
    out = {}
    for name, n in n_records.items():
        base = times[0].get(name)
        ranks = [k for k in range(min(n, len(times))) if times[k].get(name) is not None]
        if base is None or not ranks:
            continue
        k = min(ranks, key=lambda r: times[r][name])
        out[name] = k if times[k][name] < (1.0 - margin) * base else 0
    return out


def _inputs(prepared, seed: int = 0) -> list:
    """Random inputs in the signature of the module's main (static shapes; weights are constants)."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(seed)
    out = []
    for p in prepared["main"].params:
        si = _ty(p)
        shape = [int(d) for d in si.shape]
        dt = str(si.dtype)
        a = rng.standard_normal(shape).astype(dt) if dt.startswith("float") else np.zeros(shape, dt)
        out.append(tvm.runtime.tensor(a))
    return out


def _settle(fs: list, args, seconds: float = SETTLE_S) -> None:
    """Run the functions in turns (5 times each at least) until `seconds` have passed: a model
    timed within ~0.5 s of a build ran 1.2-2x slower here (measured 2026-11-28), whichever it was."""
    t_end = time.monotonic() + seconds
    for i in range(10**6):
        for f in fs:
            f(*args)
        if i >= 4 and time.monotonic() >= t_end:
            return


def _instrumented(ex):
    """(vm, per_run): a VM whose kernel calls add their time to per_run[PrimFunc name] (seconds)."""
    import tvm
    import tvm_ffi
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(ex, tvm.cpu())
    per_run: dict[str, float] = {}
    t0 = [0.0]

    def instr(_func, sym, before, _ret, *_a):
        if before:
            t0[0] = time.perf_counter()
        else:
            per_run[sym] = per_run.get(sym, 0.0) + time.perf_counter() - t0[0]
        return 0

    vm.set_instrument(tvm_ffi.convert(instr))
    return vm, per_run


def kernel_times(exes: list, args, runs: int = RUNS, rounds: int = 5) -> list[dict[str, float]]:
    """Per executable, per kernel (PrimFunc name): the median over `runs` model runs of the
    kernel's time per run (s). The executables take turns, `rounds` times, so a disturbance on
    this machine is shared by all of them rather than charged to one."""
    import statistics

    vms = [_instrumented(ex) for ex in exes]
    acc: list[dict[str, list[float]]] = [{} for _ in exes]
    _settle([vm["main"] for vm, _ in vms], args)
    for _ in range(rounds):
        for (vm, per_run), a in zip(vms, acc):
            for _ in range(max(1, runs // rounds)):
                per_run.clear()
                vm["main"](*args)
                for k, v in per_run.items():
                    a.setdefault(k, []).append(v)
    return [{k: statistics.median(v) for k, v in a.items()} for a in acc]


def profiler(build: Callable[[], Any], prepared, names: dict[str, str]) -> Callable[[Any], dict[str, float]]:
    """tune_budget's `profile` (the x86 option alloc_in_model): build() the model from the database
    as it stands and time each kernel in it (PROFILE_RUNS runs); returns {state name: seconds per
    model run}, `names` mapping each budget state's name to its workload's PrimFunc name."""
    def profile(_states) -> dict[str, float]:
        times = kernel_times([build()], _inputs(prepared), runs=PROFILE_RUNS)[0]
        return {k: times[n] for k, n in names.items() if n in times}

    return profile


def model_ms(exes: list, args, rounds: int = 5) -> list[float]:
    """Each executable's median model time (ms), timed alternately `rounds` times; the median round."""
    import statistics

    import tvm
    from tvm.runtime.vm import VirtualMachine

    fs = [VirtualMachine(ex, tvm.cpu())["main"] for ex in exes]
    _settle(fs, args)
    s = time.perf_counter()
    fs[0](*args)
    n = max(10, min(300, int(0.3 / max(time.perf_counter() - s, 1e-5))))
    got: list[list[float]] = [[] for _ in fs]
    for _ in range(rounds):
        for i, f in enumerate(fs):
            ts = []
            for _ in range(n):
                s = time.perf_counter()
                f(*args)
                ts.append(time.perf_counter() - s)
            got[i].append(statistics.median(ts) * 1e3)
    return [statistics.median(g) for g in got]


def build(db, db_dir: Path, prepared, tasks, target, build_fn: Callable, k: int = 0, deadline: float | None = None,
          min_ms: float | None = None, min_share: float | None = None,
          final_fn: Callable | None = None) -> tuple[Any, dict[str, Any]]:
    """(executable, info): the model built with the database's records and its valid in-model
    picks; with k >= 2, first refine the picks of the workloads not yet checked (module doc).
    `build_fn(database)` builds `prepared` with a database (tuning_ms.build_with_db) in a form the
    VM's instrument hook sees (bytecode); `final_fn(database)`, when given, builds the executable
    returned (the x86 option vm_exec=compiled: the refine's builds are timed, then the model is
    built again with the picks)."""
    db_dir = Path(db_dir)
    final = final_fn or build_fn
    min_ms, min_share = MIN_MS if min_ms is None else min_ms, MIN_SHARE if min_share is None else min_share
    picks = load_picks(db_dir)
    choice = {t.task_name: current_choice(db, t, picks) for t in tasks}
    base_db = choice_db(db, tasks, lambda t: choice[t.task_name])
    info: dict[str, Any] = {"picks_used": sum(1 for t in tasks if _valid(picks.get(_key(t)), _top1(db, t))
                                              and picks[_key(t)].get("record") is not None)}
    if k == 0:  # refine=0: the database's best records, no picks
        return final(db), {"picks_used": 0}
    if k < 2:
        return final(base_db if info["picks_used"] else db), info
    t_start = time.monotonic()
    recs = {t.task_name: top_records(db, t, k) for t in tasks}
    todo = [t for t in tasks if len(recs[t.task_name]) >= 2 and not _valid(picks.get(_key(t)), _top1(db, t))]
    est = {t.task_name: _mean(recs[t.task_name][0]) * float(t.weight) for t in tasks if recs[t.task_name]}
    todo_s, all_s = sum(est.get(t.task_name, 0.0) for t in todo), sum(est.values())
    info["refine"] = ref = {"k": k, "workloads": len(todo), "their_ms": round(todo_s * 1e3, 3)}
    if todo_s * 1e3 < min_ms or todo_s < min_share * all_s:
        ref["skipped"] = f"the unchecked workloads are {todo_s * 1e3:.3f} ms of {all_s * 1e3:.3f} ms " \
                         f"(refine needs >= {min_ms} ms and >= {min_share:.0%})"
        return final(base_db if info["picks_used"] else db), info
    try:
        ex, info, used = _refine(db, db_dir, prepared, tasks, build_fn, k, deadline, picks, choice, recs, todo, info,
                                 t_start)
    except Exception as e:  # noqa: BLE001 - an optimization: never the reason a compile fails
        ref["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        log.warning("in-model selection failed (%s); building with the database's best records", ref["error"])
        return final(base_db if info["picks_used"] else db), info
    return (ex if final_fn is None else final_fn(used)), info


def _refine(db, db_dir: Path, prepared, tasks, build_fn, k, deadline, picks, choice, recs, todo, info, t_start):
    """build()'s refine step (module doc): K builds timed in the model, the picks kept or not, stored.
    Returns (executable, info, the database it was built with)."""
    ref = info["refine"]
    args = _inputs(prepared)
    names = {t.task_name for t in todo}
    exes: list = []
    dbs: list = []
    for rank in range(k):
        if rank and deadline is not None and time.monotonic() + (time.monotonic() - t_start) / rank > deadline:
            ref["stopped"] = "deadline"
            break
        log.info("in-model selection: build %d/%d (rank-%d records of %d workloads)", rank + 1, k, rank, len(todo))
        dbs.append(choice_db(db, tasks, lambda t, r=rank: recs[t.task_name][min(r, len(recs[t.task_name]) - 1)]
                             if t.task_name in names else choice[t.task_name]))
        exes.append(build_fn(dbs[-1]))
    times = kernel_times(exes, args) if len(exes) >= 2 else []
    if len(times) < 2:  # nothing compared: nothing learned
        return exes[0], info, dbs[0]
    ranks = pick_fastest(times, {t.task_name: len(recs[t.task_name]) for t in todo})
    ref["timed"] = len(ranks)  # workloads whose kernel the instrumented runs saw (by PrimFunc name)
    switched = {n: r for n, r in ranks.items() if r}
    ref["switched"] = len(switched)
    ex, used, kept = exes[0], dbs[0], False
    if switched:
        new_db = choice_db(db, tasks, lambda t: recs[t.task_name][switched[t.task_name]]
                           if t.task_name in switched else choice[t.task_name])
        new = build_fn(new_db)
        base_ms, new_ms = model_ms([exes[0], new], args)
        ref.update(base_ms=round(base_ms, 4), picked_ms=round(new_ms, 4))
        kept = new_ms < base_ms
        if kept:
            ex, used = new, new_db
            info["picks_used"] += len(switched)  # the checked workloads had no valid pick before
    ref["kept"] = kept
    for t in todo:  # checked: a kept pick's record, else none (the database's best stays)
        n = t.task_name
        if n not in ranks:
            continue
        r = ranks[n] if kept else 0
        picks[_key(t)] = {"task": n, "displaced_s": _mean(recs[n][0]), "rank": r,
                          "in_model_us": [round(times[0][n] * 1e6, 2), round(times[r][n] * 1e6, 2)],
                          "record": recs[n][r].as_json() if r else None}
    merged = load_picks(db_dir)  # another process may have written its picks meanwhile: keep them
    merged.update({_key(t): picks[_key(t)] for t in todo if _key(t) in picks})
    atomic_write_json(db_dir / PICKS_FILE, {"format": 1, "picks": merged})
    ref["seconds"] = round(time.monotonic() - t_start, 1)
    log.info("in-model selection: %d of %d workloads switched records; model %s -> %s ms (%s)", len(switched),
             len(todo), ref.get("base_ms"), ref.get("picked_ms"), "kept" if kept else "not kept")
    return ex, info, used


def _top1(db, task):
    top = top_records(db, task, 1)
    return top[0] if top else None
