"""MetaSchedule tuning shared by the TVM targets, with one persistent database per target.

Tuning is the expensive part of a compiler-in-the-loop search (16 tasks x 8 trials took 689 s
on this 2-core machine), and candidates of one model share most of their workloads (a conv's
kernel changed from 3x3 to 5x5 leaves 15 of 16 tasks the same). So:

- one JSON MetaSchedule database per *target* (llvm mcpu, cores, features...) lives in a cache
  directory shared by every candidate, run and model: `$GRAPHOPT_TUNING_DB`, else
  `$XDG_CACHE_HOME/graphopt/tuning` (default `~/.cache/graphopt/tuning`), one sub-folder per
  target key (`db_dir_for`);
- a candidate's workloads are extracted from its fused Relax module; only those the database
  does not have yet are tuned, each with `trials_per_task` trials (a per-task cap, so one big
  task cannot eat the whole budget: TVM_NOTES trap 3);
- tuning stops at a deadline (the run's time budget) or after `max_new_tasks`; what it could
  not tune is built with TVM's default schedules and the stats say so (`untuned` > 0).

The flow (TVM_NOTES traps 1 and 2): prepare the raw module (DecomposeOpsForInference,
CanonicalizeBindings) -> fuse it with the "zero" pipeline -> extract and tune tasks from the
*fused* module -> `compile_relax(db, prepared_raw)` (the *raw* one; it fuses again itself, with
the same passes, so the database keys match).

Importing this module does not import tvm.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import CompileError

from . import in_model, tuning_ms
from . import tvm_common as tc
# MetaSchedule plumbing (loggers, strategy, timeouts, builder/runner, database reads) lives in tuning_ms (split for size)
from .tuning_ms import (RECYCLE_BUILDS, _ms_logger_handlers_fixup, _quiet_meta_schedule,  # noqa: F401
                        build_with_db, estimate_seconds, local_builder, local_runner, search_strategy,
                        task_best_seconds, timeout_s)

log = logging.getLogger("graphopt.tuning")

DB_ENV = "GRAPHOPT_TUNING_DB"


def default_db_root() -> Path:
    """$GRAPHOPT_TUNING_DB, else $XDG_CACHE_HOME/graphopt/tuning, else ~/.cache/graphopt/tuning."""
    env = os.environ.get(DB_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "graphopt" / "tuning"


def target_key(target_json: dict[str, Any]) -> str:
    """A folder name for one compilation target, e.g. 'llvm-znver3-2c-1a2b3c4d'.

    Schedules tuned for one mcpu/feature set/core count are not valid for another, so each
    gets its own database; the hash covers the whole target dict.
    """
    blob = json.dumps(target_json, sort_keys=True)
    h = hashlib.sha256(blob.encode()).hexdigest()[:8]
    kind = str(target_json.get("kind", "target"))
    cpu = str(target_json.get("mcpu") or target_json.get("arch") or "")
    cores = target_json.get("num-cores")
    parts = [kind] + ([cpu] if cpu else []) + ([f"{cores}c"] if cores else []) + [h]
    return "-".join(p.replace("/", "_") for p in parts)


def db_dir_for(target_json: dict[str, Any], root: str | Path | None = None) -> Path:
    """The database folder of one target: <root or default_db_root()>/<target_key>."""
    return (Path(root).expanduser() if root is not None else default_db_root()) / target_key(target_json)


@dataclass
class TuningStats:
    """What tuning did for one compile; goes into Artifact.info["tuning"] and the report."""

    db: str = ""
    trials_per_task: int = 0
    workloads_seen: int = 0  # distinct tuning tasks in this candidate
    workloads_reused: int = 0  # already in the database before this compile
    workloads_tuned: int = 0  # tuned now
    workloads_untuned: int = 0  # new, not tuned (deadline / max_new_tasks / skipped by policy)
    trials: int = 0  # trials spent now
    tuning_s: float = 0.0
    extract_s: float = 0.0
    build_s: float = 0.0
    stopped_because: str = ""
    untuned_tasks: list[str] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)  # tune_budget's log when a budget was spent
    prepacked: int = 0  # kernels built on pre-packed weights (the prepack option)
    in_model: dict[str, Any] = field(default_factory=dict)  # in_model.build: picks used, refine's log

    @property
    def partly_untuned(self) -> bool:
        return self.workloads_untuned > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["partly_untuned"] = self.partly_untuned
        d["untuned_tasks"] = d["untuned_tasks"][:20]
        return d


def prepare(raw_mod, target, prepack: bool = False):
    """(prepared raw module, fused module): the two forms tuning and build_with_db (tuning_ms) need.

    prepack: mark each fused kernel's constant weights layout-free (AttachAttrLayoutFreeBuffers),
    so MetaSchedule's RewriteLayout postproc may choose their memory layout; build_with_db then
    transforms the weights once, at compile time (relax's static_shape_tuning_pipeline with
    cpu_weight_prepack, as onnxruntime/MLAS pre-packs its GEMM weights)."""
    tvm = tc.load_tvm()
    from tvm import relax

    with target:
        prepared = tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
        ])(raw_mod)
        fused = relax.get_pipeline("zero")(prepared)
        if prepack:
            fused = relax.transform.AttachAttrLayoutFreeBuffers()(fused)
    return prepared, fused


def open_db(db_dir: Path):
    tc.load_tvm()
    import tvm.s_tir.meta_schedule as ms

    from . import x86_int8

    x86_int8.register()  # its records name x86_int8's intrinsics: parsing them needs them registered
    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(db_dir), module_equality="structural")


def task_failed_trials(db, task, limit: int) -> int:
    """How many failed trials (1e10 s) the database holds for the task's workload, counted up to
    `limit`; 0 when it does not know the workload or has a successful record for it.
    (get_top_k leaves failed records out, so this scans all records.)"""
    mod = task.dispatched[0]
    if limit <= 0 or not db.has_workload(mod):
        return 0
    wl = db.commit_workload(mod)
    n = 0
    for rec in db.get_all_tuning_records():
        if not rec.workload.same_as(wl):
            continue
        secs = [float(s) for s in (rec.run_secs or [])]
        if secs and sum(secs) / len(secs) < 1e9:
            return 0
        n += 1
    return min(n, limit)


def record_failed_trials(ms, db, task, target, trials: int) -> None:
    """Make the database say that `trials` trials of the task's workload failed.

    MetaSchedule commits a 1e10 s record for a trial that fails to run, but nothing when every
    sampled schedule is rejected before it is built (on cuda: over the GPU's thread or shared-memory
    limits; 16 of EfficientNet-Lite0's 47 workloads at 2 trials). Without a record such a workload
    looks new at every compile and is tuned again (27-89 s a compile here). The records added carry the
    workload's unscheduled trace and 1e10 s: get_top_k never returns them, so no build applies them;
    task_failed_trials counts them, so the next compile with this budget skips the workload."""
    missing = trials - task_failed_trials(db, task, trials)
    if missing <= 0:
        return
    from tvm.s_tir import Schedule

    mod = task.dispatched[0]
    workload = db.commit_workload(mod)
    trace = Schedule(mod).trace
    (func,) = mod.functions.values()  # a task's workload is one PrimFunc
    args = ms.arg_info.ArgInfo.from_prim_func(func)
    for _ in range(missing):
        db.commit_tuning_record(ms.database.TuningRecord(trace, workload, run_secs=[1e10], target=target,
                                                         args_info=args))


def retry_failed() -> bool:
    """$GRAPHOPT_MS_RETRY_FAILED=1: tune again the workloads whose earlier trials all failed."""
    return os.environ.get("GRAPHOPT_MS_RETRY_FAILED", "") not in ("", "0")


def tune_and_build(raw_mod, target, *, db_dir: str | Path, **kwargs: Any):
    """Tune the workloads of `raw_mod` the database lacks, then build with the database: see
    _tune_and_build. The database lock it takes (db_lock) is released on every way out."""
    try:
        return _tune_and_build(raw_mod, target, db_dir=db_dir, **kwargs)
    finally:
        unlock_db(db_dir)


def _tune_and_build(
    raw_mod,
    target,
    *,
    db_dir: str | Path,
    trials_per_task: int,
    work_dir: str | Path,
    max_new_tasks: int | None = None,
    deadline: float | None = None,
    runner: Any = None,
    builder: Any = None,
    num_threads: int | None = None,
    seed: int = 0,
    skip_if_known_exceeds_s: float | None = None,
    budget: Any = None,
    prepack: bool = False,
    vector_bits: int = 0,
    refine: int = 0,
    exec_mode: str = "bytecode",
):
    """Tune the workloads of `raw_mod` the database lacks, then build with the database.

    Returns (executable, TuningStats). `deadline` is a time.monotonic() value: no new batch of
    tasks starts when it would likely end after it. `runner`/`builder` default to MetaSchedule's
    local ones (an RPCRunner measures on a remote device instead). Raises CompileError when the
    build fails. `skip_if_known_exceeds_s`: when the workloads the database already knows add up
    (best time x calls) to more than this, the candidate cannot beat the incumbent: tune nothing.
    `prepack`: weights in the layout the schedules chose, transformed at build time (prepare()).
    `vector_bits`: tune in tuning_ms.space's full-width-vector space (0: TVM's default space).
    `refine` >= 2: re-time the top-`refine` records of the heavy workloads in the model (in_model.py).
    `exec_mode`: the Relax VM form of the executable returned (build_with_db; refine times bytecode).
    """
    tc.load_tvm(num_threads)
    import tvm.s_tir.meta_schedule as ms

    _quiet_meta_schedule()
    db_dir = Path(db_dir)
    stats = TuningStats(db=str(db_dir), trials_per_task=int(trials_per_task))
    t0 = time.monotonic()
    try:
        prepared, fused = prepare(raw_mod, target, prepack=prepack)
        tasks = ms.relax_integration.extract_tasks(fused, target)
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"MetaSchedule task extraction failed: {type(e).__name__}: {tc._first_line(e)}") from e
    stats.extract_s = time.monotonic() - t0
    db = open_db_locked(db_dir)  # exclusive until unlock_db below (or this call's end): see db_lock
    todo = [t for t in tasks if task_best_seconds(db, t) is None]
    stats.workloads_seen = len(tasks)
    stats.workloads_reused = len(tasks) - len(todo)
    # a workload that already failed at least this many trials (MiniLM has 3 such on this CPU) is
    # not tuned again at every compile (~35 s each here): it runs TVM's default schedule, untuned
    known_bad: list[str] = []
    if not retry_failed() and trials_per_task > 0:
        bad = [task_failed_trials(db, t, int(trials_per_task)) >= trials_per_task for t in todo]
        known_bad = [t.task_name for t, b in zip(todo, bad) if b]
        todo = [t for t, b in zip(todo, bad) if not b]
    # most weighted (most often called) tasks first: they matter most when time runs out
    todo.sort(key=lambda t: -float(t.weight))
    if todo and skip_if_known_exceeds_s is not None:
        known_s, _ = estimate_seconds(db, tasks)
        if known_s > skip_if_known_exceeds_s:
            stats.untuned_tasks = [t.task_name for t in todo]
            stats.stopped_because = (f"cannot win: its known workloads alone take {known_s * 1000:.3f} ms "
                                     f"> {skip_if_known_exceeds_s * 1000:.3f} ms (1.1x the best so far)")
            todo = []
    if max_new_tasks is not None and len(todo) > max_new_tasks:
        stats.untuned_tasks += [t.task_name for t in todo[max_new_tasks:]]
        stats.stopped_because = f"max_new_tasks={max_new_tasks}"
        todo = todo[:max_new_tasks]

    per_task_s: float | None = None
    failed: list[str] = []
    i = 0
    t_tune = time.monotonic()
    if budget is not None and todo:  # a per-model budget, spent where the latency is (tune_budget.py)
        failed, done = _spend_budget(ms, todo, len(tasks), budget, target, db, Path(work_dir), runner, builder,
                                     num_threads, seed, deadline, stats, vector_bits=vector_bits,
                                     prepared=prepared, prepack=prepack)
        i = len(todo) if done else 0
        todo = todo if done else []
    while budget is None and i < len(todo) and trials_per_task > 0:
        if deadline is not None:
            left = deadline - time.monotonic()
            guess = per_task_s if per_task_s is not None else 0.0
            if left <= 0 or left < 0.5 * guess:
                stats.stopped_because = "deadline"
                break
            batch = len(todo) - i if guess == 0 else max(1, min(len(todo) - i, int(left // max(guess, 1e-3))))
            if per_task_s is None:
                batch = 1  # learn what one task costs first
        else:
            batch = len(todo) - i
        chunk = todo[i:i + batch]
        tb = time.monotonic()
        _tune_tasks(ms, chunk, target, db, Path(work_dir), trials_per_task, runner, builder, num_threads, seed + i,
                    vector_bits)
        spent = time.monotonic() - tb
        per_task_s = spent / len(chunk) if per_task_s is None else 0.5 * per_task_s + 0.5 * spent / len(chunk)
        stats.trials += len(chunk) * int(trials_per_task)
        for t in chunk:
            if task_best_seconds(db, t) is None:
                failed.append(t.task_name)
                record_failed_trials(ms, db, t, target, int(trials_per_task))
            else:
                stats.workloads_tuned += 1
        i += len(chunk)
    if failed:
        stats.stopped_because = (stats.stopped_because + "; " if stats.stopped_because else "") + \
            f"{len(failed)} task(s) had no successful trial"
    if known_bad:
        stats.stopped_because = (stats.stopped_because + "; " if stats.stopped_because else "") + \
            (f"{len(known_bad)} task(s) failed all of >= {trials_per_task} earlier trials; not retried "
             "(GRAPHOPT_MS_RETRY_FAILED=1 retries them)")
    stats.untuned_tasks = failed + known_bad + [t.task_name for t in todo[i:]] + stats.untuned_tasks
    stats.workloads_untuned = len(stats.untuned_tasks)
    stats.tuning_s = time.monotonic() - t_tune
    unlock_db(db_dir)  # compile_relax reads the records loaded above: builds need no lock

    tb = time.monotonic()
    try:
        built: dict[str, int] = {}
        ex, stats.in_model = in_model.build(db, db_dir, prepared, tasks, target, k=refine, deadline=deadline,
                                            build_fn=lambda d: build_with_db(d, prepared, target, prepack, built),
                                            final_fn=None if exec_mode == "bytecode" else
                                            lambda d: build_with_db(d, prepared, target, prepack, built, exec_mode))
        stats.prepacked = built.get("prepacked", 0)
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"TVM build with the tuning database failed: {type(e).__name__}: {tc._first_line(e)}") from e
    stats.build_s = time.monotonic() - tb
    return ex, stats


def _spend_budget(ms, todo, n_all, budget, target, db, work_dir: Path, runner, builder, num_threads, seed,
                  deadline, stats: TuningStats, on_round=None, vector_bits: int = 0, prepared=None,
                  prepack: bool = False) -> tuple[list[str], bool]:
    """Spend this compile's share of a per-model budget (tune_budget.BudgetPlan) on the new
    workloads `todo`, by rounds; returns (names of workloads with no successful trial, True).
    `budget.in_model` with `prepared`: rounds weigh workloads by their kernels' time in the model."""
    import dataclasses

    from . import tune_budget as tb

    plan = dataclasses.replace(
        budget,
        budget_trials=tb.share_of_budget(budget.budget_trials, len(todo), n_all, budget.warm),
        budget_s=tb.share_of_budget(None if budget.budget_s is None else float(budget.budget_s), len(todo), n_all,
                                    budget.warm),
    )
    keyed = {f"{k}:{t.task_name}": t for k, t in enumerate(todo)}
    states = [tb.TaskState(name=k, weight=float(t.weight)) for k, t in keyed.items()]
    for st in states:  # a workload the database knows (a resumed budget) counts as warmed up
        st.best_s = task_best_seconds(db, keyed[st.name])
        st.trials = int(plan.warm) if st.best_s is not None else 0
        st.history = [] if st.best_s is None else [st.best_s]  # its next round is compared with that
    rnd = [0]

    def tune(given: dict[str, int]) -> dict[str, float | None]:
        groups: dict[int, list] = {}
        for k, n in given.items():
            groups.setdefault(int(n), []).append(keyed[k])
        for n, chunk in groups.items():
            _tune_tasks(ms, chunk, target, db, work_dir, n, runner, builder, num_threads, seed + 1000 * rnd[0],
                        vector_bits)
        rnd[0] += 1
        return {k: task_best_seconds(db, keyed[k]) for k in given}

    profile = None if not (plan.in_model and prepared is not None) else in_model.profiler(  # alloc_in_model
        lambda: build_with_db(db, prepared, target, prepack), prepared, {k: t.task_name for k, t in keyed.items()})

    blog = tb.run_budget(states, tune, plan, deadline=deadline, on_round=on_round, profile=profile)
    stats.trials += blog.trials
    stats.budget = dict(blog.summary(), budget_trials=plan.budget_trials, budget_s=plan.budget_s,
                        warm=plan.warm, step=plan.step)
    failed: list[str] = []
    for s in states:
        t = keyed[s.name]
        if s.failed:
            failed.append(t.task_name)
            record_failed_trials(ms, db, t, target, int(plan.warm))
        elif s.best_s is not None:
            stats.workloads_tuned += 1
        else:
            stats.untuned_tasks.append(t.task_name)
    if blog.stopped_because == "time budget spent" and any(s.trials == 0 for s in states):
        stats.stopped_because = "time budget spent before every new workload had its warm-up"
    return failed, True


def _tune_tasks(ms, tasks, target, db, work_dir: Path, trials: int, runner, builder, num_threads, seed,
                vector_bits: int = 0) -> None:
    wd = Path(tempfile.mkdtemp(prefix="ms-", dir=work_dir))
    _ms_logger_handlers_fixup()
    try:
        for space, group in tuning_ms.spaces(ms, tasks, target, vector_bits):  # int8 kernels: x86_int8's space
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                group, work_dir=str(wd), num_threads=num_threads or "physical", seed=seed,
                strategy=search_strategy(ms, trials), space=space)
            if not ctxs:
                continue
            ms.tune.tune_tasks(
                tasks=ctxs, task_weights=weights, work_dir=str(wd), max_trials_global=int(trials) * len(ctxs),
                max_trials_per_task=int(trials), num_trials_per_iter=max(1, min(int(trials), 16)),
                builder=builder if builder is not None else local_builder(ms),
                runner=runner if runner is not None else local_runner(ms),
                database=db,
            )
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"MetaSchedule tuning failed: {type(e).__name__}: {tc._first_line(e)}") from e
    finally:
        shutil.rmtree(wd, ignore_errors=True)


# ------------------------------------------------------------------------- the database lock
LOCK_FILE = ".graphopt-db.lock"
_held = threading.local()  # db dir -> the open lock file this thread holds
# --cluster: a Ray worker's lease on the database the search's node owns (graphopt.parallel.cluster_pool):
# acquire(db_dir) after the local lock fills db_dir (a replica) with the owner's records;
# release(db_dir) before unlocking sends back the records appended meanwhile. None: local only.
REMOTE_DB: Any = None


@contextlib.contextmanager
def db_lock(db_dir: str | Path):
    """Hold an exclusive lock on the tuning database in `db_dir` (fcntl.flock on a lock file in
    it) while reading and writing it. Compiles in several processes (--compile-workers) share one
    JSON database: MetaSchedule appends records to its files and reads them all when a database is
    opened, so two writers at once could interleave lines, and a database opened while another
    process tunes would not see those records and tune the same workloads again. The lock is
    released when the holder's file closes, so a worker that dies does not leave it held."""
    open_db_locked(db_dir, and_open=False)
    try:
        yield
    finally:
        unlock_db(db_dir)


def open_db_locked(db_dir: str | Path, and_open: bool = True):
    """Take db_lock on db_dir (waiting for another process to finish), then open the database,
    so it holds every record written before. Held until unlock_db(db_dir); tune_and_build also
    releases it when it returns or raises."""
    import fcntl

    db_dir = Path(db_dir)
    db_dir.mkdir(parents=True, exist_ok=True)
    held = _held.__dict__
    key = str(db_dir.resolve())
    if key not in held:
        f = open(db_dir / LOCK_FILE, "a+")  # noqa: SIM115 - closed by unlock_db
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for the tuning database lock %s (another compile is tuning)", db_dir / LOCK_FILE)
                t = time.monotonic()
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                log.info("tuning database lock taken after %.1f s", time.monotonic() - t)
            if REMOTE_DB is not None:
                REMOTE_DB.acquire(db_dir)
        except BaseException:
            f.close()
            raise
        held[key] = f
    return open_db(db_dir) if and_open else None


def unlock_db(db_dir: str | Path) -> None:
    """Release the lock this thread holds on db_dir (no-op when it holds none)."""
    f = _held.__dict__.pop(str(Path(db_dir).resolve()), None)
    if f is not None:
        import fcntl

        try:
            if REMOTE_DB is not None:
                REMOTE_DB.release(Path(db_dir))
        finally:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            finally:
                f.close()
