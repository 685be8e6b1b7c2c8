"""The pipelined scheduler (--jobs N > 1 on devices behind an RPC tracker, --compile-workers M > 1,
--cluster): candidates are prepared here while compiles run in worker processes and measurements
in threads. A mixin of graphopt.driver.Search: it uses the Search's _prepare / _measure / _finish
(the one try/except around a candidate) and _tell / _progress.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GraphoptError, TargetUnreachable, first_line
from ..plugin import Artifact
from ..runstore.store import Record

if TYPE_CHECKING:
    from ..config import Budget

log = logging.getLogger("graphopt")


@dataclass
class _Pending:
    """A compiled candidate waiting for (or being given) its measurement."""

    rec: Record
    timings: dict[str, float]
    artifact: Artifact | None
    started: float = 0.0
    model: Any = None  # --compile-workers: the candidate a worker process is to compile
    cand_dir: Path | None = None
    submitted: float = 0.0  # when it went to a compile worker (time.monotonic())
    gen: int = 0  # which set of compile workers has it (a new set after a worker died)


class PipelinedSearch:
    """The pipelined loop of a Search (graphopt.driver.Search inherits it)."""

    def _run_pipelined(self, budget: Budget, done: int) -> None:
        """--jobs N > 1 on a target whose devices measure concurrently (an RPC tracker with several
        devices under one key: each measurement asks the tracker for a free device), and/or
        --compile-workers M > 1 (compiles in M worker processes, graphopt.parallel.compile_pool).

        Candidates are prepared (materialized, fidelity-checked) here, one at a time, and compiled
        here too (M = 1) or in the worker processes (up to M at once), while up to N measurements
        run in threads on the devices; a compiled candidate waits for a free measuring thread.
        Each result is recorded and told to the strategy when it lands, in landing order (so a
        seeded run is reproducible only with --jobs 1 --compile-workers 1). A graph already being
        compiled or measured is waited for, not measured twice. A compile that fails in a worker is
        a failed record; a worker that dies fails the compiles in flight and the pool is restarted
        (after 3 deaths, compiles go on in this process).
        """
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        jobs, workers = self.cfg.jobs, self.cfg.compile_workers
        self._done = done
        self._inflight: dict[Any, _Pending] = {}  # measurements (running, or queued for a thread)
        self._compiling: dict[Any, _Pending] = {}  # compiles in worker processes
        self._durations: list[float] = []
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="graphopt-measure")
        self._cpool = None
        self._cpool_gen, self._cpool_deaths = 0, 0
        if self.cfg.cluster:  # the same interface, over Ray (graphopt.parallel.cluster_pool)
            from .cluster_pool import RayCompilePool

            self._cpool = RayCompilePool(self.cfg.cluster, workers, self.cfg.target, self._target_class,
                                         self.cfg.target_options, tunes=int(getattr(self.target, "trials", 0) or 0) > 0)
            workers = self._cpool.workers
        elif workers > 1:
            from .compile_pool import CompilePool

            self._cpool = CompilePool(workers, self.cfg.target, self._target_class, self.cfg.target_options)
        exhausted = False
        while True:
            while not exhausted and self._room(jobs, workers):
                if budget.trials is not None and \
                        self._done + len(self._inflight) + len(self._compiling) >= budget.trials:
                    self.stopped_because = "budget (candidates)"
                    exhausted = True
                    break
                durations = self._durations
                if self._time_left() <= 0.5 * (statistics.median(durations) if durations else 0.0):
                    self.stopped_because = "budget (time)"
                    exhausted = True
                    break
                asked = self.strategy.ask(1)
                if not asked:
                    self.stopped_because = "search space exhausted"
                    exhausted = True
                    break
                t0 = time.monotonic()
                res = self._prepare(asked[0], defer_compile=self._cpool is not None)
                if isinstance(res, _Pending):
                    res.started = t0
                    if res.model is not None:
                        self._submit_compile(res)
                    else:
                        self._inflight[self._pool.submit(self._measure, res)] = res
                else:
                    rec, cached = res
                    self._told(rec, cached)
            if not self._inflight and not self._compiling:
                break
            # a timeout, so a pending Ctrl-C is acted on within a second even when no signal wakes this thread
            landed, _ = wait([*self._compiling, *self._inflight], timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in landed:
                if fut in self._compiling:
                    self._compiled(fut)
                else:
                    self._land(fut)
        if self._cpool is not None:
            self._cpool.close()
            self._cpool = None

    def _room(self, jobs: int, workers: int) -> bool:
        """May the pipelined loop prepare another candidate now? In-process compiles: while fewer
        than N are being measured. Worker compiles: while a worker is free and at most M compiled
        candidates wait behind the N being measured (so the devices never wait for a compile)."""
        if self._cpool is None:
            return len(self._inflight) < jobs
        return len(self._compiling) < workers and len(self._inflight) < jobs + workers

    def _submit_compile(self, p: "_Pending") -> None:
        """Hand a prepared candidate to a compile worker: its ONNX file in its candidate folder,
        and the target's cheap-first inputs (a deadline as wall-clock time)."""
        from concurrent.futures.process import BrokenProcessPool

        import onnx

        model, p.model = p.model, None
        try:
            path = Path(p.cand_dir) / "candidate.onnx"
            onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > 1_800_000_000)
        except Exception as e:  # failure is a value
            self._compile_failed(p, e)
            return
        knobs = self._target_knobs()
        if "deadline" in knobs:
            knobs["deadline_wall"] = time.time() + (knobs.pop("deadline") - time.monotonic())
        for attempt in (1, 2):
            try:
                fut = self._cpool.submit(path, p.cand_dir, knobs)
                break
            except BrokenProcessPool as e:  # a worker died since the last landing
                self._compile_pool_died(e, sum(q.gen == self._cpool_gen for q in self._compiling.values()))
                if self._cpool is None or attempt == 2:
                    self._compile_failed(p, e)
                    return
        p.submitted, p.gen = time.monotonic(), self._cpool_gen
        self._compiling[fut] = p

    def _compiled(self, fut) -> None:
        """A compile landed (or, waiting for it, lands): measure it, or record why it failed."""
        from concurrent.futures.process import BrokenProcessPool

        p = self._compiling.pop(fut, None)
        if p is None:
            return
        try:
            _wait_done(fut)  # then its ONNX file, read by the worker, can go
        finally:
            for name in ("candidate.onnx", "candidate.onnx.data"):
                (Path(p.cand_dir) / name).unlink(missing_ok=True)
        try:
            portable = fut.result()
        except TargetUnreachable:
            raise
        except BrokenProcessPool as e:
            if p.gen == self._cpool_gen:  # the first to see it: warn once, start fresh workers
                self._compile_pool_died(e, 1 + sum(q.gen == p.gen for q in self._compiling.values()))
            p.timings["compile"] = time.monotonic() - p.submitted
            self._compile_failed(p, e)
            return
        except Exception as e:  # failure is a value
            p.timings["compile"] = time.monotonic() - p.submitted
            self._compile_failed(p, e)
            return
        # compile + portable() in the worker: the queue and the hand-over are left out
        p.timings["compile"] = float(portable.info.get("compiled_in", {}).get("total_s",
                                                                            time.monotonic() - p.submitted))
        try:
            p.artifact = self.target.load_portable(portable)
        except TargetUnreachable:
            raise
        except Exception as e:
            self._compile_failed(p, e, "loading the compiled candidate")
            return
        self._inflight[self._pool.submit(self._measure, p)] = p

    def _compile_failed(self, p: "_Pending", e: BaseException, what: str = "") -> None:
        """Record a candidate whose compile in a worker failed (or never started) and tell the strategy."""
        from concurrent.futures.process import BrokenProcessPool

        rec = p.rec
        rec.status = "failed"
        if isinstance(e, BrokenProcessPool):
            rec.error = ("compile: the compile worker process died (BrokenProcessPool) while this candidate was "
                         "being compiled (perhaps by another candidate compiled at the same time)")
        else:
            text = _one_line(e) if isinstance(e, GraphoptError) else f"{type(e).__name__}: {_one_line(e)}"
            rec.error = f"compile: {what + ': ' if what else ''}{text}"
        log.debug("candidate failed to compile in a worker: %s", getattr(e, "remote_traceback", "") or e)
        self._told(self._finish(p, None), False)

    def _compile_pool_died(self, e: BaseException, in_flight: int) -> None:
        """A compile worker process died: the executor is broken for good. Start fresh workers
        (after 3 deaths: compile in this process from now on)."""
        self._cpool_deaths += 1
        self._cpool_gen += 1
        if self._cpool_deaths < 3:
            log.warning("a compile worker process died (%s: %s); the %d candidate(s) being compiled are recorded as "
                        "failed, starting %d fresh workers", type(e).__name__, _one_line(e), in_flight,
                        self._cpool.workers)
            self._cpool.restart()
        else:
            log.warning("a compile worker process died again (%s: %s; %d times in this run); the %d candidate(s) "
                        "being compiled are recorded as failed, compiling in this process from now on",
                        type(e).__name__, _one_line(e), self._cpool_deaths, in_flight)
            self._cpool.close(kill=True)
            self._cpool = None

    def _land(self, fut) -> None:
        """Record a finished (or, waiting for it, finishing) measurement and tell the strategy."""
        p = self._inflight.pop(fut, None)
        if p is None:
            return
        try:
            _wait_done(fut)
            result: Any = fut.result()
        except TargetUnreachable:
            raise
        except Exception as e:  # failure is a value
            result = e
        if p.started:
            self._durations.append(time.monotonic() - p.started)
        self._told(self._finish(p, result), False)

    def _told(self, rec: Record, cached: bool) -> None:
        self._done += 1
        self._tell([rec])
        self._progress(self._done, rec, cached)

    def _settle_graph(self, graph_hash: str | None) -> None:
        """Pipelined mode: if a candidate with this graph is being compiled (in a worker process) or
        measured, wait for it and record it first, so the dedup check sees it (a graph is measured once)."""
        if graph_hash is None:
            return
        for fut, p in list(getattr(self, "_compiling", {}).items()):
            if p.rec.graph_hash == graph_hash:
                self._compiled(fut)  # a failed compile is recorded now; a good one goes to _inflight
        for fut, p in list(getattr(self, "_inflight", {}).items()):
            if p.rec.graph_hash == graph_hash:
                self._land(fut)


def _wait_done(fut) -> None:
    """Wait for a future in steps of a second, so that a pending Ctrl-C is acted on while a
    compile or measurement runs (an untimed wait is only woken by the future itself)."""
    from concurrent.futures import wait

    while not fut.done():
        wait([fut], timeout=1.0)


def _one_line(e: BaseException) -> str:
    return first_line(e, 500)
