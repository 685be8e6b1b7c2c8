"""The search driver: space -> strategy -> materialize -> fidelity -> compile -> measure -> store.

This is the one place with a try/except around a candidate: a move that does not apply, an
invalid graph or a compile error becomes a failed Record with its message, never a crash.
Order is cheap first: fidelity (onnxruntime, milliseconds) before compiling for the target,
and a candidate that fails the fidelity constraint is never compiled.
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .conclude import ConcludeSearch, SearchResult
from .config import Budget, RunConfig
from .errors import GraphoptError, TargetUnreachable, UsageError, first_line
from .genotype import Genotype
from .materialize import materialize, move_context
from .parallel.pipeline import PipelinedSearch, _Pending  # Search's mixin: the one core -> subsystem import at load
from .plugin import Artifact, Measurement, Strategy, Target
from .registry import STRATEGIES, TARGETS
from .world import _spec_path, open_world, run_config_meta, run_identity, split_calibration

if TYPE_CHECKING:
    from .runstore.store import Record

log = logging.getLogger("graphopt")


# ------------------------------------------------------------------------------------ search
class Search(PipelinedSearch, ConcludeSearch):
    """One run (graphopt.config.RunConfig): setup (graphopt.world), the serial search loop here, the
    pipelined one in graphopt.parallel.pipeline, confirm and report in graphopt.conclude."""

    def __init__(self, config: RunConfig):
        config.validate()
        self.cfg = config
        self.t_start = time.monotonic()
        self.timings: dict[str, float] = {"load": 0.0, "materialize": 0.0, "fidelity": 0.0, "compile": 0.0,
                                          "measure": 0.0}
        self.counts = {"new": 0, "cached": 0, "failed": 0, "infeasible": 0, "duplicates": 0, "from_store": 0}
        self.artifacts: dict[int, Artifact] = {}
        self.stopped_because = "budget"

    # -------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from .evaluation.data import CachedData
        from .evaluation.fidelity import FidelityChecker
        from .runstore import rundir
        from .runstore.store import RunStore

        cfg = self.cfg
        if not log.isEnabledFor(logging.DEBUG):  # onnxruntime's optimizer warnings are noise to a user
            import onnxruntime

            onnxruntime.set_default_logger_severity(3)
        # inputs are checked before --out is created or locked; an input is never a file a run writes
        rundir.check_inputs_not_outputs(cfg.out, {"model": cfg.model, "--data": _spec_path(cfg.data),
                                                  "--eval-data": _spec_path(cfg.eval_data)})
        t0 = time.monotonic()
        world = open_world(cfg)
        self.base, self.passes, self.space = world.base, world.passes, world.space
        self.data, self.trust_warning = world.data, world.trust_warning
        self.splits, self.data_moves = world.splits, world.data_moves
        self.not_applicable = world.not_applicable or {}
        self.target: Target = TARGETS.create(cfg.target, **cfg.target_options)
        self.target.check()
        if cfg.jobs > 1 and not self.target.concurrent_measure:
            raise UsageError(
                f"--jobs {cfg.jobs}: target {cfg.target} measures on one device here, and measurements run at "
                "once would disturb each other; --jobs > 1 needs devices behind an RPC tracker "
                "(--target-opt tracker=HOST:PORT --target-opt key=NAME, several devices under that key)")
        if cfg.compile_workers > 1 or cfg.cluster:
            self._check_compile_workers()
        self.out, self._lock, self._out_created = rundir.open_out_dir(cfg.out)  # created, locked, cleaned
        self.store = RunStore.in_dir(self.out)
        target_desc = self.target.describe()
        self.resumed = self.store.check_identity(run_identity(cfg, world, target_desc))
        self.store.set_meta("config", run_config_meta(cfg))
        # moves are fit on `fit`; candidates are judged (and chosen) on `select`; held-out is only reported
        self.fidelity_data = CachedData(self.splits.select)
        from .timing import how, timing_feeds  # every candidate is timed on the same K select samples

        self.timing_feeds = timing_feeds(self.fidelity_data)
        self.value_dependent = any(getattr(p, "dynamic_shapes", False) for n, p in self.passes.items()
                                   if n not in self.not_applicable)
        self.latency_over = how(self.target, len(self.timing_feeds), value_dependent=self.value_dependent)
        self.fit_data = self.splits.fit  # distillation (graphopt.recovery.recover) streams it
        self.fit_samples = self.splits.fit.num_samples
        self.checker = FidelityChecker(self.base.proto, self.fidelity_data, cfg.metric)
        from .evaluation.metrics import gate_threshold

        self.min_required = gate_threshold(cfg.min_fidelity, cfg.max_drop, self.checker.reference_value,
                                           self.checker.metric_obj.similarity, self.checker.metric_obj.units)
        self.ctx = move_context(self.base, self.splits, cfg.pass_options, cfg.finetune_steps, cfg.seed,
                                run_dir=self.out)
        try:
            self.strategy: Strategy = STRATEGIES.create(cfg.strategy, self.space, seed=cfg.seed, **cfg.strategy_options)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--strategy-opt for strategy {cfg.strategy!r}: {_one_line(e)}") from None
        # A resumed run replays the store: the strategy learns what was measured and the
        # budget counts those candidates as done.
        known = [r for r in self.store.records() if r.genotype and all(k in self.space for k in r.genotype)]
        if known:
            self._tell(known)
        self.counts["from_store"] = len(known)
        self.workdir = Path(tempfile.mkdtemp(prefix="work-", dir=self.out))
        self.timings["load"] = time.monotonic() - t0
        log.info("model %s: %d inputs, %d nodes; %d sites from %s (10^%.1f genotypes); target %s; data %s (%d samples)%s",
                 cfg.model, len(self.base.inputs), len(self.base.proto.graph.node), len(self.space),
                 ",".join(cfg.passes) or "no passes", self.space.log10_size(), cfg.target, self.data.source,
                 self.data.num_samples, "; resuming from the run store" if self.resumed else "")

    def _check_compile_workers(self) -> None:
        """--compile-workers M > 1: the target must measure elsewhere (compiles on this machine would
        disturb a measurement here) and hand its artifacts between processes."""
        cfg, target = self.cfg, self.target
        if cfg.cluster and not (target.concurrent_measure and target.portable_artifacts):
            raise UsageError(f"--cluster {cfg.cluster}: target {cfg.target} cannot measure on devices behind an RPC "
                             "tracker while compiled candidates move between machines (needs concurrent_measure "
                             "and Target.portable); use a TVM target with --target-opt tracker=HOST:PORT "
                             "--target-opt key=NAME, or drop --cluster")
        if not target.concurrent_measure:
            raise UsageError(
                f"--compile-workers {cfg.compile_workers}: target {cfg.target} measures on this machine here, and "
                "compiles running meanwhile in worker processes would disturb its measurements; --compile-workers > 1 "
                "needs devices behind an RPC tracker (--target-opt tracker=HOST:PORT --target-opt key=NAME); "
                "use --compile-workers 1")
        if not target.portable_artifacts:
            raise UsageError(
                f"--compile-workers {cfg.compile_workers}: target {cfg.target} cannot move a compiled candidate from a "
                "worker process to the search's process (Target.portable/load_portable); use --compile-workers 1")
        from .parallel.compile_pool import class_path

        self._target_class = class_path(type(target))

    def _tell(self, recs: list[Record]) -> None:
        """Tell the strategy: score, latency and fidelity of each record (plugin.Result)."""
        from .plugin import Result, tell_strategy

        base = getattr(self, "baseline", None) or self.store.get(Genotype())
        base_ms = base.latency_ms if base is not None and base.status == "ok" else None
        base_fid = base.fidelity if base is not None else None
        tell_strategy(self.strategy, [Result(r.genotype, self._score(r), r.status, r.latency_ms, r.fidelity, base_ms,
                                             self.min_required, base_fid) for r in recs])

    def _gate_words(self) -> str:
        cfg = self.cfg
        return " and ".join(w for w in (
            f"--min-fidelity {cfg.min_fidelity}" if cfg.min_fidelity is not None else "",
            f"--max-drop {cfg.max_drop} from the original's {self.checker.reference_value:.6g}"
            if cfg.max_drop is not None else "") if w) or "the default gate"

    def _score(self, rec: Record) -> float:
        """Latency if the record meets every constraint, else inf. Judged anew on each run, so a
        resumed run with other constraints re-ranks what is stored."""
        cfg = self.cfg
        if rec.status != "ok" or rec.latency_ms is None or rec.fidelity is None or rec.fidelity < self.min_required:
            return math.inf
        if cfg.max_latency_ms is not None and rec.latency_ms > cfg.max_latency_ms:
            return math.inf
        if cfg.max_size_mb is not None and rec.size_bytes is not None and rec.size_bytes > cfg.max_size_mb * 1e6:
            return math.inf
        return float(rec.latency_ms)

    # ---------------------------------------------------------------------- one candidate
    def evaluate(self, genotype: Genotype, model: Any = None) -> tuple[Record, bool]:
        """(record, cached). Never raises for a bad candidate; raises for an unreachable target.
        model: the genotype's graph when the caller already built it (graphopt.recovery.recover)."""
        pending = self._prepare(genotype, model=model)
        if not isinstance(pending, _Pending):
            return pending
        try:
            result: Any = self._measure(pending)
        except TargetUnreachable:
            raise
        except Exception as e:  # failure is a value
            result = e
        return self._finish(pending, result), False

    def _prepare(self, genotype: Genotype, defer_compile: bool = False, model: Any = None) -> "tuple[Record, bool] | _Pending":
        """Everything up to a compiled artifact: store lookup, materialize, dedup, fidelity,
        compile. Returns (record, cached) when the candidate is settled without a measurement,
        else a _Pending for _measure/_finish. defer_compile (--compile-workers): stop before the
        compile and return a _Pending holding the model, for a worker process to compile."""
        from .modelio.ir import model_hash
        from .runstore.store import Record

        cached = self.store.get(genotype)
        if cached is not None:
            self.counts["cached"] += 1
            return cached, True
        timings: dict[str, float] = {}
        rec = Record(genotype=genotype, status="failed")
        stage = "materialize"
        try:
            t = time.monotonic()
            if model is None:
                model, rec.applied = materialize(self.base, self.space, genotype, self.passes, self.ctx)
            else:
                rec.applied = {k: "applied" for k in genotype}
            timings["materialize"] = time.monotonic() - t
            rec.graph_hash = model_hash(model)
            rec.size_bytes = model.ByteSize()
            if genotype and all(v != "applied" for v in rec.applied.values()):
                raise GraphoptError("no move of this genotype applied")
            self._settle_graph(rec.graph_hash)  # pipelined: the same graph in flight lands first
            dup = self.store.by_graph_hash(rec.graph_hash)
            if dup is not None:
                self.counts["duplicates"] += 1
                rec.status, rec.fidelity, rec.fidelity_detail = dup.status, dup.fidelity, dup.fidelity_detail
                rec.latency_ms, rec.measurement, rec.error = dup.latency_ms, dup.measurement, dup.error
                rec.duplicate_of = dup.id
                rec.timings = timings
                return self.store.commit(rec), False
            stage = "fidelity"
            t = time.monotonic()
            fid = self.checker.score(model)
            timings["fidelity"] = time.monotonic() - t
            rec.fidelity, rec.fidelity_detail = fid.value, fid.to_dict()
            max_mb = self.cfg.max_size_mb
            if not fid.value >= self.min_required:
                rec.status = "infeasible"
                rec.error = f"fidelity {fid.value:.6f} < {self.min_required:.6g} ({self._gate_words()})"
            elif max_mb is not None and rec.size_bytes > max_mb * 1e6:
                rec.status = "infeasible"
                rec.error = f"size {rec.size_bytes / 1e6:.3f} MB > --max-size-mb {max_mb}"
            else:
                stage = "compile"
                t = time.monotonic()
                cand_dir = Path(tempfile.mkdtemp(prefix="cand-", dir=self.workdir))
                if defer_compile:
                    return _Pending(rec, timings, None, model=model, cand_dir=cand_dir)
                self._inform_target()
                artifact = self.target.compile(model, cand_dir)
                timings["compile"] = time.monotonic() - t
                return _Pending(rec, timings, artifact)
        except TargetUnreachable:
            raise
        except Exception as e:  # failure is a value
            rec.status = "failed"
            rec.error = f"{stage}: {type(e).__name__}: {_one_line(e)}" if not isinstance(e, GraphoptError) \
                else f"{stage}: {_one_line(e)}"
            log.debug("candidate failed", exc_info=True)
        return self._finish(_Pending(rec, timings, None), None), False

    def _measure(self, p: "_Pending") -> tuple[Measurement, float]:
        """Time the artifact on the device: (measurement, seconds). Safe to run in a worker
        thread for targets with concurrent_measure (nothing here touches the store)."""
        t = time.monotonic()
        from .timing import measure_feeds

        m = measure_feeds(self.target, p.artifact, self.timing_feeds, self.value_dependent)
        self._pair(p.rec, m)
        return m, time.monotonic() - t

    def _pair(self, rec: Record, m: Measurement) -> None:
        """Paired timing (graphopt.timing, `--no-paired-timing` turns it off): right after a candidate,
        time the original again, in the same window of the host's load, and put the candidate's
        latency in the original's terms: latency = candidate x original's search latency / original now.
        One device on this host measured at a time only (--jobs 1, not over RPC, where the next session
        may reach another device); not for a cost model. The original's build is the one made before
        the search (_pairs_with), never compiled here, in a measuring thread."""
        base = getattr(self, "baseline", None)
        art = self.artifacts.get(base.id) if self._pairs_with(base) else None
        if art is None or not rec.genotype or m.method == "estimated" or not m.latency.median_ms > 0:
            return
        from .timing import measure_feeds

        try:
            now = measure_feeds(self.target, art, self.timing_feeds, self.value_dependent).latency.median_ms
            if not (math.isfinite(now) and now > 0):
                raise ValueError(f"the original measured {now} ms")
        except TargetUnreachable:
            raise
        except Exception as e:  # noqa: BLE001 - the candidate's own measurement stands, unpaired
            log.warning("paired timing: could not time the original again (%s: %s); this candidate is ranked "
                        "on its own measurement", type(e).__name__, _one_line(e))
            return
        m.extra["paired"] = {"original_ms": now, "raw_ms": m.latency.median_ms, "factor": base.latency_ms / now,
                             "how": "the original timed again right after the candidate; latency = candidate x "
                                    "the original's search latency / the original now"}

    def _finish(self, p: "_Pending", result: Any) -> Record:
        """Record the outcome (a (Measurement, seconds), an exception from measuring, or None
        when nothing was measured) and commit it. Callers re-raise TargetUnreachable themselves."""
        rec, timings, artifact = p.rec, p.timings, p.artifact
        if isinstance(result, BaseException):
            rec.status = "failed"
            rec.error = f"measure: {type(result).__name__}: {_one_line(result)}" \
                if not isinstance(result, GraphoptError) else f"measure: {_one_line(result)}"
        elif result is not None:
            m, secs = result
            timings["measure"] = secs
            rec.status, rec.latency_ms, rec.measurement = "ok", m.latency.median_ms, m.to_dict()
            if m.extra.get("paired"):  # in the original's window of the host's load (_pair)
                rec.latency_ms = m.latency.median_ms * m.extra["paired"]["factor"]
            where = artifact.info.get("compiled_in") if artifact is not None else None
            if where:  # --compile-workers: which worker process compiled it, and when (wall clock)
                rec.measurement["compiled_in"] = dict(where, process="compile worker")
        for k, v in timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v
        rec.timings = timings
        self.store.commit(rec)
        self.counts["new"] += 1
        if rec.status == "failed":
            self.counts["failed"] += 1
        elif rec.status == "infeasible":
            self.counts["infeasible"] += 1
        if artifact is not None and rec.status == "ok":  # keep the compiled forms the confirmation re-measures:
            best = self.best_record()  # the original's, the best's and the runners-up's (conclude.contenders)
            keep = {self._baseline_id(), best.id if best else None, rec.id if not rec.genotype else None}
            keep |= {r.id for r in self.contenders(best)}
            if rec.id in keep:
                self.artifacts[rec.id] = artifact
            self.artifacts = {k: v for k, v in self.artifacts.items() if k in keep}
        return rec

    def _pairs_with(self, base: Record | None) -> bool:
        """Whether candidates are paired with the original `base` (_pair): on, one device on this host."""
        return bool(self.cfg.paired_timing and self.cfg.jobs == 1 and not self.target.concurrent_measure
                    and base is not None and base.status == "ok" and base.latency_ms)

    def _baseline_id(self) -> int | None:
        base = getattr(self, "baseline", None)
        return base.id if base is not None else None

    def best_record(self) -> Record | None:
        # a stored candidate of another search space (other --passes, --search-exact) cannot be rebuilt here
        feasible = [r for r in self.store.records() if math.isfinite(self._score(r))
                    and all(k in self.space for k in r.genotype)]
        return min(feasible, key=lambda r: (r.latency_ms, r.id)) if feasible else None

    def _inform_target(self) -> None:
        """Tell the target the run's TargetContext (plugin.py): deadline, best latency so far."""
        from dataclasses import replace

        from .plugin import current_context, inform_target

        inform_target(self.target, replace(current_context(self.target), **self._target_knobs()))

    def _target_knobs(self) -> dict[str, Any]:
        """The TargetContext's fields for a target that reads them (plugin.wants_context):
        `deadline` (time.monotonic()) and `incumbent_ms`; they travel with each job to a compile
        worker (graphopt.parallel.compile_pool)."""
        from .plugin import wants_context

        knobs: dict[str, Any] = {}
        if not wants_context(self.target):
            return knobs
        if self.cfg.budget.seconds is not None:
            knobs["deadline"] = self.t_start + self.cfg.budget.seconds
        best = self.best_record()
        knobs["incumbent_ms"] = best.latency_ms if best is not None else None
        return knobs

    def _time_left(self) -> float:
        """Seconds the search loop has left: the time budget less the recovery phase's share."""
        if self.cfg.budget.seconds is None:
            return math.inf
        from .recovery.recover import phase_seconds

        reserve = phase_seconds(self.cfg.budget.seconds, self.cfg.recover_seconds, self.cfg.recover_top) or 0.0
        return self.cfg.budget.seconds - reserve - (time.monotonic() - self.t_start)

    def run(self) -> SearchResult:
        """The run, holding the lock on --out from setup to the last file written."""
        try:
            return self._run()
        finally:
            lock = getattr(self, "_lock", None)
            if getattr(self, "workdir", None) is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if lock is not None:
                if getattr(self, "_out_created", False) and not hasattr(self, "store"):
                    from .runstore.rundir import remove_if_only_lock

                    remove_if_only_lock(self.out)
                lock.release()

    def _run(self) -> SearchResult:
        self.setup()
        budget = self.cfg.budget
        self.bar = None
        if self.cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=budget.trials, initial=self.counts["from_store"], file=sys.stderr, unit="cand",
                            desc="graphopt")
        done = self.counts["from_store"]
        durations: list[float] = []
        try:
            self.baseline, cached = self.evaluate(Genotype())
            self._progress(0, self.baseline, cached)
            if cached and self._pairs_with(self.baseline):  # resumed: build the original to pair with, here
                try:  # (_pair runs in the measuring thread and compiles nothing)
                    self.artifact_for(self.baseline)
                except TargetUnreachable:
                    raise
                except Exception as e:  # noqa: BLE001 - then candidates are ranked unpaired
                    log.warning("paired timing: could not build the original again (%s); candidates are ranked on "
                                "their own measurements", _one_line(e))
            pipelined = self.cfg.jobs > 1 or self.cfg.compile_workers > 1 or bool(self.cfg.cluster)
            if pipelined:
                self._run_pipelined(budget, done)
            while not pipelined:
                if budget.trials is not None and done >= budget.trials:
                    self.stopped_because = "budget (candidates)"
                    break
                # stop when the next candidate would likely end past the deadline (more than half of
                # a typical candidate's time over), so a time budget is honoured within a fraction of
                # one candidate, compile and measure included
                if self._time_left() <= 0.5 * (statistics.median(durations) if durations else 0.0):
                    self.stopped_because = "budget (time)"
                    break
                asked = self.strategy.ask(1)
                if not asked:
                    self.stopped_because = "search space exhausted"
                    break
                t_cand = time.monotonic()
                rec, cached = self.evaluate(asked[0])
                if not cached:
                    durations.append(time.monotonic() - t_cand)
                done += 1
                self._tell([rec])
                self._progress(done, rec, cached)
            if self.cfg.recover_top > 0:  # distil the most promising candidates (graphopt.recovery.recover)
                from .recovery.recover_phase import recover_phase

                recover_phase(self)
        except KeyboardInterrupt:
            self.stopped_because = "interrupted"
            log.warning("interrupted: writing the report for the %d candidates done; the run store keeps them",
                        max(done, getattr(self, "_done", 0)))
        except TargetUnreachable as e:
            self.stopped_because = f"target unreachable: {e}"
            self.unreachable = e
        finally:
            cpool = getattr(self, "_cpool", None)
            if cpool is not None:  # compiles still in flight are dropped, their workers ended
                cpool.close(kill=True)
                self._cpool, self._compiling = None, {}
            pool = getattr(self, "_pool", None)
            if pool is not None:  # measurements still in flight are dropped, not recorded
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool, self._inflight = None, {}
        if self.bar is not None:
            self.bar.close()
        return self._conclude()

    def _progress(self, i: int, rec: Record, cached: bool) -> None:
        total = self.cfg.budget.trials
        best = self.best_record()
        base = getattr(self, "baseline", None)
        speed = (base.latency_ms / best.latency_ms) if (best and base and base.latency_ms and best.latency_ms) else None
        what = "original" if not rec.genotype else f"{len(rec.genotype)} moves"
        lat = f"{rec.latency_ms:.3f} ms" if rec.latency_ms is not None else "-"
        fid = f"{rec.fidelity:.6f}" if rec.fidelity is not None else "-"
        extra = f" ({rec.error})" if rec.error else ""
        if self.bar is not None:  # a terminal: one live line instead of a log line per candidate
            if i:
                self.bar.update(1)
            left = self._time_left()
            self.bar.set_postfix_str(f"best {best.latency_ms:.3f} ms x{speed or 1:.3f} fid {best.fidelity:.5f}"
                                     + (f" | {left:.0f}s left" if math.isfinite(left) else "") if best else "no feasible yet")
            return
        log.info("[%s/%s] %6.1fs %-10s %-11s fidelity %s latency %s%s | best %s%s",
                 i, total if total is not None else "-", time.monotonic() - self.t_start, what,
                 rec.status + (" (cached)" if cached else ""), fid, lat, extra,
                 f"{best.latency_ms:.3f} ms" if best else "-", f" x{speed:.3f}" if speed else "")


def run_search(config: RunConfig) -> SearchResult:
    return Search(config).run()


def _one_line(e: BaseException) -> str:
    return first_line(e, 500)


__all__ = ["Budget", "RunConfig", "Search", "SearchResult", "materialize", "move_context", "run_search",
           "split_calibration"]
