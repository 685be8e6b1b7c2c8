"""MetaSchedule plumbing of graphopt.targets.tuning: its loggers, the search strategy sized to the
trial budget, the schedule space (full-width vectors on x86), the per-trial timeout, the
per-process builder and runner, the build with a database (build_with_db, optionally with
pre-packed weights), and the reads of a workload's best time (task_best_seconds, estimate_seconds).

Importing this module does not import tvm."""

from __future__ import annotations

import logging
import math
import os

from . import tvm_common as tc

log = logging.getLogger("graphopt.tuning")


def _quiet_meta_schedule() -> None:
    # MetaSchedule logs every task's progress at INFO on the root handlers; keep it to warnings
    for name in ("tvm.s_tir.meta_schedule", "tvm.meta_schedule"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _ms_logger_handlers_fixup() -> None:
    """Drop handlers MetaSchedule cannot re-configure from its global logger.

    Each tuning call runs MetaSchedule's create_loggers, which lists the global logger's
    handlers *by name* in a logging.dictConfig: a handler without a name crashes it
    ("'NoneType' object has no attribute 'format'"), and a named one it did not define makes
    dictConfig fail. Seen here in the test suite: after a first tuning call in the process,
    pytest's unnamed LogCaptureHandler sat on that logger and the next tuning call crashed.
    An application that attaches its own handler there would hit the same. MetaSchedule's own
    handlers (".console", ".file") are kept.
    """
    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    own = ("tvm.s_tir.meta_schedule.console", "tvm.s_tir.meta_schedule.file")
    for h in list(lg.handlers):
        if h.get_name() not in own:
            log.debug("removing handler %r from the MetaSchedule logger (MetaSchedule cannot re-configure it)", h)
            lg.removeHandler(h)


def search_strategy(ms, trials: int):
    """MetaSchedule's evolutionary search, sized to the per-task trial budget.

    Its defaults (population 512, 50 unmeasured initial samples, 4 genetic rounds) are sized for
    hundreds of trials per task; with a handful of trials that sampling, not the measurements,
    dominates: on this 2-core machine it took ~60 s per task at 2 trials. A population of a few
    times the trial count keeps the search's shape at a fraction of the cost.
    """
    if os.environ.get("GRAPHOPT_MS_STRATEGY") == "replay-trace":
        return "replay-trace"
    if trials >= 64:
        return "evolutionary"
    pop = max(16, 4 * int(trials))
    return ms.search_strategy.EvolutionarySearch(
        population_size=pop, init_measured_ratio=0.2, init_min_unmeasured=max(8, pop // 2),
        genetic_num_iters=2,
    )


def vector_bits(target) -> int:
    """The widest float vector an llvm x86 `target` has: 512 with AVX-512F, 256 with AVX2 or AVX;
    0 for any other target (aarch64 included: not measured there, so its space stays TVM's)."""
    try:
        from tvm.target import codegen

        if str(target.kind.name) != "llvm":
            return 0
        triple = str(target.attrs.get("mtriple", "") or "")
        if triple and not triple.startswith(("x86_64", "i686")):
            return 0
        feats = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    except Exception:  # noqa: BLE001 - no LLVM feature query: keep TVM's space
        return 0
    return 512 if "avx512f" in feats else 256 if feats & {"avx2", "avx"} else 0


def llvm_rules(ms, bits: int = 0) -> list:
    """TVM's llvm schedule rules; with `bits`, its MultiLevelTiling replaced by
    MultiLevelTilingWideVector, which always vectorizes the innermost spatial axis of a tiled
    kernel's output at `bits` (16 float32 lanes at 512). TVM's own rule samples that tile freely:
    of the 33 kernels of EfficientNet-Lite0 tuned 20 minutes on this AVX-512 CPU, 13 ran on 256-bit
    and 7 on 128-bit FMAs; with the wide rule its top 1x1 convs ran 1.3-2.3x faster at 48 trials
    each (docs/compiler.md)."""
    rules = list(ms.ScheduleRule.create("llvm"))
    if not bits:
        return rules
    reuse = ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")  # the rule TVM creates
    return [ms.schedule_rule.MultiLevelTilingWideVector("SSRSRS", vector_length_in_bits=int(bits),
                                                        max_innermost_factor=64, reuse_write=reuse)
            if type(r).__name__ == "MultiLevelTiling" else r for r in rules]


def space(ms, target, bits: int = 0, int8: bool = False):
    """The MetaSchedule space graphopt tunes a task for `target` in: TVM's llvm rules with
    full-width vectors when `bits` (llvm_rules); x86_int8's space (TVM's rules, its AVX2 int8
    intrinsics first) for a task with its packed int8 matmul (`int8`: with the wide rule added to
    that space, tests/test_x86_int8.py's tuned int8 kernel had no vpmaddwd left), and for every
    task when `bits` is 0 on an AVX2 CPU, as before; else TVM's default."""
    from . import x86_int8

    if x86_int8.available(target) and (int8 or not bits):
        return x86_int8.space(target)
    if not bits:
        return "post-order-apply"
    return ms.space_generator.PostOrderApply(sch_rules=llvm_rules(ms, bits), postprocs=list(ms.Postproc.create("llvm")),
                                             mutator_probs="llvm")


def spaces(ms, tasks, target, bits: int = 0) -> list:
    """[(space, tasks)]: `tasks` grouped by the space() each is tuned in (with `bits`, a task whose
    kernel holds x86_int8's packed int8 matmul keeps x86_int8's space)."""
    from .x86_int8 import has_packed_matmul

    groups: dict[bool, list] = {}
    for t in tasks:
        groups.setdefault(bool(bits) and has_packed_matmul(t.dispatched[0]), []).append(t)
    return [(space(ms, target, bits, int8=int8), group) for int8, group in groups.items()]


def timeout_s() -> float:
    """Per-trial build/run timeout. MetaSchedule's 30 s default counts the worker's start, and a
    worker imports tvm (and, through tvm_ffi, torch): on a loaded 2-core machine that alone took
    over 30 s, so every trial 'failed' with a timeout. $GRAPHOPT_MS_TIMEOUT overrides."""
    try:
        return float(os.environ.get("GRAPHOPT_MS_TIMEOUT", "180"))
    except ValueError:
        return 180.0


_BUILDER = None
_RUNNER = None


def local_builder(ms):
    """One MetaSchedule builder per process, whose worker processes outlive a build() call.

    MetaSchedule's LocalBuilder starts a fresh pool of worker processes for every batch, and each
    worker's first build imports tvm.s_tir.tensor_intrin, which took 45-80 s on this 2-core
    machine: it dominated tuning (~60 s per workload at 2 trials, for a trivial build). The
    pool here is kept and recycled every RECYCLE_BUILDS batches (TVM restarts it per batch
    because of a memory leak in long-lived workers).
    """
    global _BUILDER
    if _BUILDER is None:
        _BUILDER = _persistent_builder_class(ms)(timeout_sec=timeout_s())
    return _BUILDER


def alloc_in_bounds(device, args_info, alloc_repeat: int) -> list:
    """MetaSchedule's argument allocation for a trial, run in the runner's worker process: int32 and
    int64 tensors zero, the rest random as MetaSchedule fills them. Random integers are out of bounds as
    indices: every trial of a gather (MiniLM's three embedding `take`s) failed, so those workloads
    ran TVM's default schedules and a compile spent ~40 s on trials that could not succeed. Zero is
    in bounds for any table; a gather then reads one row (cache-hot), which flatters it a little."""
    import tvm
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    random_fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")
    return alloc_argument_common(_in_bounds(random_fill), device, args_info, alloc_repeat)


def rpc_alloc_in_bounds(session, device, args_info, alloc_repeat: int) -> list:
    """The same for MetaSchedule's RPCRunner (rpc.ms_runner): the tensors live on the remote device."""
    from tvm.s_tir.meta_schedule.runner.rpc_runner import get_global_func_on_rpc_session
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    random_fill = get_global_func_on_rpc_session(session, "tvm.contrib.random.random_fill_for_measure",
                                                 "the RPC server's TVM runtime lacks random_fill (USE_RANDOM)")
    return alloc_argument_common(_in_bounds(random_fill), device, args_info, alloc_repeat)


def _in_bounds(random_fill):
    import numpy as np

    def fill(arg) -> None:
        # index types: zero is in bounds for any gather (random int64s are not, and crash the trial);
        # 8-bit integer data stays random. A workload dividing by an int32/int64 input would trap on a
        # zero: none in the bundled models (static shapes fold such arithmetic away); such a workload
        # would stay on TVM's default schedule, reported as untuned, never run wrong
        if str(arg.dtype) in ("int32", "int64"):
            arg.copyfrom(np.zeros(tuple(int(d) for d in arg.shape), dtype=str(arg.dtype)))
        else:
            random_fill(arg)

    return fill


def local_runner(ms, cache_flush: bool = False):
    """One LocalRunner per process and cache-flush setting (its single worker process is kept by
    TVM itself). `cache_flush`: flush the CPU caches before each timed call of a candidate, so a
    kernel is tuned with its weights coming from memory, as they do inside the model
    (docs/compiler.md); MetaSchedule's default (and graphopt's before) times it with hot caches."""
    global _RUNNER
    if not isinstance(_RUNNER, dict):
        _RUNNER = {}
    if cache_flush not in _RUNNER:
        ev = ms.runner.EvaluatorConfig(number=1 if cache_flush else 3, repeat=5 if cache_flush else 1,
                                       min_repeat_ms=0 if cache_flush else 100, enable_cpu_cache_flush=cache_flush)
        _RUNNER[cache_flush] = ms.runner.LocalRunner(timeout_sec=timeout_s(), evaluator_config=ev,
                                                     f_alloc_argument=alloc_in_bounds)
    return _RUNNER[cache_flush]


RECYCLE_BUILDS = 64


def _persistent_builder_class(ms):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PersistentLocalBuilder(ms.builder.PyBuilder):
        def __init__(self, timeout_sec: float, max_workers: int | None = None) -> None:
            super().__init__()
            self.timeout_sec = timeout_sec
            self.max_workers = max_workers or lb.cpu_count(logical=True)
            self._pool = None
            self._uses = 0

        def build(self, build_inputs):
            if self._pool is None or self._uses >= RECYCLE_BUILDS:
                if self._pool is not None:
                    self._pool.shutdown()
                self._pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec)
                self._uses = 0
            self._uses += 1
            results = []
            args = [(None, None, b.mod, b.target, lb._serialize_params(b.params)) for b in build_inputs]
            for r in self._pool.map_with_error_catching(lambda x: lb._worker_func(*x), args):
                if r.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(
                        None, f"LocalBuilder: Timeout, killed after {self.timeout_sec} seconds"))
                else:
                    results.append(ms.builder.BuilderResult(None, "LocalBuilder: An exception occurred\n"
                                                            + str(r.value)))
            return results

    return PersistentLocalBuilder


def build_with_db(db, prepared, target, prepack: bool = False, info: dict | None = None, exec_mode: str = "bytecode"):
    """Executable of `prepared` (prepare()'s first form) with the database's schedules.

    Without prepack this is MetaSchedule's compile_relax (with exec_mode="compiled", its CPU pipeline:
    fusion as extract_tasks saw it, the database, lowering). With prepack, the same plus, between the database
    and lowering, SplitLayoutRewritePreproc + FoldConstant: each weight's layout transform becomes
    a kernel of its own on a constant, folded away at build time, so the model runs on
    pre-packed weights and its interface does not change. `info` (optional) gets "prepacked":
    how many kernels read pre-packed weights (0 when no tuned schedule chose another layout).
    `exec_mode`: Relax VM "bytecode" (interpreted; the VM's instrument hook sees each kernel, which
    in_model.py times by) or "compiled" (the model's main compiled to native code: no interpreter
    between kernels, no instrument hook; the x86 option `vm_exec`)."""
    tvm = tc.load_tvm()
    if not prepack and exec_mode == "bytecode":  # any target (cuda: its GPU lowering, dlight for the rest)
        import tvm.s_tir.meta_schedule as ms

        return ms.relax_integration.compile_relax(db, prepared, target, params=None)
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as rp  # llvm: x86 and rpi4 (0.27 does not export it)

    # prepack or vm_exec=compiled (x86/rpi4 options): compile_relax's CPU pipeline, which it cannot take
    # exec_mode for (its own lookup of the lowering passes fails on 0.27's llvm and falls back to these
    # same lists, without dispatch passes)
    fuse = rp.legalize_passes(target)  # the fusion extract_tasks saw: the database's keys
    after_db = []
    if prepack:
        fuse = [*rp.library_dispatch_passes(target), *fuse, relax.transform.AttachAttrLayoutFreeBuffers()]
        after_db = [relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant()]
    lower = rp.dataflow_lower_passes(target) + rp.finalize_passes(target)

    @tvm.transform.module_pass(opt_level=3)
    def _pipeline(mod, _ctx):
        mod = tvm.transform.Sequential([*fuse, relax.transform.MetaScheduleApplyDatabase(enable_warning=False),
                                        *after_db])(mod)
        if info is not None and prepack:
            info["prepacked"] = sum(1 for gv in mod.get_global_vars() if gv.name_hint.endswith("_prepacked"))
        return tvm.transform.Sequential(lower)(mod)

    with target, db, tvm.transform.PassContext(opt_level=3):
        return tc.relax_build(prepared, target, exec_mode, relax_pipeline=_pipeline)


def task_best_seconds(db, task) -> float | None:
    """The database's best measured run time of a task's workload (seconds), or None."""
    mod = task.dispatched[0]
    if not db.has_workload(mod):
        return None
    top = db.get_top_k(db.commit_workload(mod), 1)
    if not top or not top[0].run_secs:
        return None
    secs = [float(s) for s in top[0].run_secs]
    mean = sum(secs) / len(secs)
    return mean if mean < 1e9 else None  # MetaSchedule stores 1e10 s for a failed trial


def estimate_seconds(db, tasks) -> tuple[float, int]:
    """(estimated seconds, tasks without a record): the sum of each known task's best database
    time times its weight (how often the model calls it); tasks the database lacks are counted."""
    total = 0.0
    unknown = 0
    for t in tasks:
        s = task_best_seconds(db, t)
        if s is None or not math.isfinite(s):
            unknown += 1
            continue
        total += s * float(t.weight)
    return total, unknown
