"""The search driver: space -> strategy -> materialize -> fidelity -> compile -> measure -> store.

This is the one place with a try/except around a candidate: a move that does not apply, an
invalid graph or a compile error becomes a failed Record with its message, never a crash.
Order is cheap first: fidelity (onnxruntime, milliseconds) before compiling for the target,
and a candidate that fails the fidelity constraint is never compiled.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import GraphoptError, NoFeasibleCandidate, TargetUnreachable, UsageError
from .controlflow import guard_sites
from .data import Dataset, Splits
from .fidelity import FidelityChecker
from .genotype import Genotype, SearchSpace
from .ir import load_model, model_hash
from .materialize import materialize, move_context  # noqa: F401 (re-exported: graphopt.driver.materialize)
from .plugin import Artifact, Measurement, Pass, Strategy, Target
from .registry import PASSES, STRATEGIES, TARGETS, parse_names
from .store import Record, RunStore

log = logging.getLogger("graphopt")


# ------------------------------------------------------------------------------------ budget
@dataclass(frozen=True)
class Budget:
    """A number of candidates (besides the original) and/or a wall-clock limit in seconds."""

    trials: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str | int | float | None) -> "Budget":
        if text is None:
            return cls(trials=20)
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*", str(text))
        if not m:
            raise UsageError(f"--budget {text!r}: expected a number of candidates (20) or a time (90s, 5m, 1h)")
        value, unit = float(m.group(1)), m.group(2)
        if value <= 0:
            raise UsageError(f"--budget {text!r}: must be positive (e.g. --budget 20 or --budget 5m)")
        if unit is None:
            if value != int(value):
                raise UsageError(f"--budget {text!r}: a number of candidates must be a whole number")
            return cls(trials=int(value))
        scale = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]
        return cls(seconds=value * scale)

    def describe(self) -> str:
        parts = []
        if self.trials is not None:
            parts.append(f"{self.trials} candidates")
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s")
        return " or ".join(parts) or "unbounded"


# ------------------------------------------------------------------------------------ config
@dataclass
class RunConfig:
    model: str | Path
    target: str = "ort"
    passes: list[str] = field(default_factory=lambda: ["conv_bn"])
    strategy: str = "random"
    budget: Budget = field(default_factory=Budget)
    data: str | Path | None = None
    metric: str = "channel"  # the gate's metric (graphopt.metrics): a name, module:function, or a Metric
    min_fidelity: float | None = None  # absolute floor (None and no max_drop: 0.99 for a similarity metric)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    out: str | Path = "graphopt-out"
    target_options: dict[str, Any] = field(default_factory=dict)
    pass_options: dict[str, Any] = field(default_factory=dict)
    synthetic_samples: int = 8
    confirm_rounds: int = 3
    max_size_mb: float | None = None
    max_latency_ms: float | None = None
    progress: bool = True  # a progress bar on stderr when it is a terminal
    finetune_steps: int = 0  # > 0: distil each candidate toward the original (graphopt.finetune; needs torch)
    jobs: int = 1  # candidates measured at once (> 1: remote devices only; see Search._run_pipelined)
    compile_workers: int = 1  # > 1: compiles in that many worker processes (graphopt.compile_pool)
    search_exact: bool = False  # True: one gene per exact site (conv_bn, fused attention); else one per pass
    strategy_options: dict[str, Any] = field(default_factory=dict)  # --strategy-opt: the strategy's keyword options
    recover_top: int = 0  # > 0: distil the K most promising candidates after the search (graphopt.recover)
    recover_seconds: float | None = None  # time for that phase (None: a share of a time budget)
    recover_train: str = "changed"  # what recovery trains: changed | all
    cluster: str | None = None  # Ray address: compiles as Ray tasks on its workers (graphopt.cluster_pool)
    # data and quality (graphopt.data, graphopt.metrics, graphopt.quality)
    eval_data: str | Path | None = None  # held-out source; default: a split of `data`
    allow_synthetic: bool = False  # let data-dependent moves fit to synthetic inputs (report: not trusted)
    max_drop: float | None = None  # gate: metric >= original's - max_drop (points of a task metric)
    task_metric: str | None = None  # the held-out number reported (default: the gate's metric)
    select_samples: int | None = None  # caps (graphopt.data defaults: 256 select, 5000 held-out, 64 calib)
    eval_samples: int | None = None
    calib_samples: int | None = None

    def validate(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"--seed {self.seed}: must be a whole number >= 0")
        from .metrics import resolve_metric

        gate = resolve_metric(self.metric)
        if self.task_metric is not None:
            resolve_metric(self.task_metric)
        if self.min_fidelity is not None and (not math.isfinite(self.min_fidelity) or (
                gate.similarity and not 0.0 <= self.min_fidelity <= 1.0)):
            raise UsageError(f"--min-fidelity {self.min_fidelity}: must be between 0 and 1"
                             + ("" if gate.similarity else " (or a finite value of the metric)"))
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise UsageError(f"--max-drop {self.max_drop}: must be a number >= 0 (points of the metric)")
        for flag, v in (("--select-samples", self.select_samples), ("--eval-samples", self.eval_samples),
                        ("--calib-samples", self.calib_samples)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UsageError(f"{flag} {v}: must be a positive number of samples")
        for flag, v in (("--max-size-mb", self.max_size_mb), ("--max-latency-ms", self.max_latency_ms)):
            if v is not None and not v > 0:
                raise UsageError(f"{flag} {v}: must be a positive number")
        parse_names(PASSES, self.passes)
        parse_names(TARGETS, [self.target])
        parse_names(STRATEGIES, [self.strategy])
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise UsageError(f"--jobs {self.jobs}: must be a positive number of candidates measured at once")
        if isinstance(self.compile_workers, bool) or not isinstance(self.compile_workers, int) \
                or self.compile_workers < 1:
            raise UsageError(f"--compile-workers {self.compile_workers}: must be a positive number of worker "
                             "processes (1 = compile in the search's own process)")
        if self.finetune_steps < 0:
            raise UsageError(f"--finetune {self.finetune_steps}: must be 0 or a positive number of steps")
        if self.finetune_steps > 0:
            from .finetune import check_available

            check_available()
        if self.recover_top:
            from .recover import check_config

            check_config(self)


def split_calibration(data: Dataset, eval_data: Dataset | None, passes: Mapping[str, Pass], space: SearchSpace,
                      config: Any) -> tuple[Splits, list[str]]:
    """(fit / select / held-out splits, data-dependent moves) of a run (graphopt.data.split_data):
    moves are fit on `fit`, candidates judged on `select`, and `held-out` is only reported.
    `config`: the RunConfig, or the stored run config (`graphopt export` rebuilds candidates on
    the same fit samples)."""
    from .quality import make_splits, run_moves, split_sizes

    moves = run_moves(passes, space, config)
    return make_splits(data, eval_data, moves, split_sizes(config)), moves


# ------------------------------------------------------------------------------------ search
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


@dataclass
class SearchResult:
    report: dict[str, Any]
    exit_code: int
    out_dir: Path
    best: Record | None
    records: list[Record]


class Search:
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
        from . import rundir

        cfg = self.cfg
        if not log.isEnabledFor(logging.DEBUG):  # onnxruntime's optimizer warnings are noise to a user
            import onnxruntime

            onnxruntime.set_default_logger_severity(3)
        # inputs are checked before --out is created or locked; an input is never a file a run writes
        rundir.check_inputs_not_outputs(cfg.out, {"model": cfg.model, "--data": _spec_path(cfg.data),
                                                  "--eval-data": _spec_path(cfg.eval_data)})
        t0 = time.monotonic()
        self.base = load_model(cfg.model, cfg.shapes)
        if cfg.data is None:  # the memory a --shape implies, before allocating it
            rundir.check_synthetic_memory(self.base.inputs, cfg.synthetic_samples, self.base.proto, cfg.shapes)
        self.passes: dict[str, Pass] = {name: PASSES.create(name) for name in cfg.passes}
        base_graph = self.base.graph()
        from .exact import build_space  # exact moves: one gene per pass unless --search-exact

        # no moves on or into control flow (graphopt.controlflow)
        self.space = build_space({name: guard_sites(base_graph, p.sites(base_graph))[0]
                                  for name, p in self.passes.items()}, cfg.search_exact)
        for d in self.base.defaulted_dims:
            log.info("input %s: symbolic batch dimension %r set to 1 (--shape %s=... to choose)",
                     d["input"], d["dim"], d["input"])
        # data: --data (or synthetic, refused when moves fit to data) split into fit / select / held-out
        from .data import CachedData
        from .quality import open_run_data, run_moves

        self.data, eval_data, self.trust_warning = open_run_data(cfg, self.base, run_moves(self.passes, self.space,
                                                                                              cfg))
        self.splits, self.data_moves = split_calibration(self.data, eval_data, self.passes, self.space, cfg)
        if getattr(self.data, "arrays", None) is not None:  # in-memory data: every value; else what is held
            rundir.check_finite(self.data.arrays, f"--data {cfg.data}")
        rundir.check_finite(self.splits.calibration, f"--data {cfg.data} (calibration samples)")
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
        self.resumed = self.store.check_identity({
            "model": self.base.sha256, "target": cfg.target,
            "target_config": _stable(target_desc.get("config", {k: v for k, v in target_desc.items()
                                                              if k in ("compiler", "device", "threads", "target")})),
            "data": self.data.fingerprint(), "metric": str(cfg.metric),
            "split": _stable(self.splits.sizes()),
            # how moves are built (repair on/off, pass options, finetune): same genotype, other graph
            "move_options": _stable({**cfg.pass_options, "finetune_steps": cfg.finetune_steps}),
        })
        self.store.set_meta("config", {"model": str(Path(cfg.model).resolve()), "target": cfg.target,
                                       "passes": list(cfg.passes), "shapes": {k: list(v) for k, v in cfg.shapes.items()},
                                       "metric": str(cfg.metric), "min_fidelity": cfg.min_fidelity,
                                       "max_drop": cfg.max_drop, "allow_synthetic": cfg.allow_synthetic,
                                       "data": _spec_str(cfg.data), "eval_data": _spec_str(cfg.eval_data),
                                       "select_samples": cfg.select_samples, "eval_samples": cfg.eval_samples,
                                       "calib_samples": cfg.calib_samples,
                                       "pass_options": cfg.pass_options, "finetune_steps": cfg.finetune_steps,
                                       "seed": cfg.seed, "synthetic_samples": cfg.synthetic_samples,
                                       "graphopt_version": _graphopt_version(), "search_exact": cfg.search_exact,
                                       "recover_top": cfg.recover_top})
        # moves are fit on `fit`; candidates are judged (and chosen) on `select`; held-out is only reported
        self.fidelity_data = CachedData(self.splits.select)
        self.fit_data = self.splits.fit  # distillation (graphopt.recover) streams it
        self.fit_samples = self.splits.fit.num_samples
        self.checker = FidelityChecker(self.base.proto, self.fidelity_data, cfg.metric)
        from .metrics import gate_threshold

        self.min_required = gate_threshold(cfg.min_fidelity, cfg.max_drop, self.checker.reference_value,
                                           self.checker.metric_obj.similarity)
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
        from .compile_pool import class_path

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
        model: the genotype's graph when the caller already built it (graphopt.recover)."""
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
        m = self.target.measure(p.artifact, self.data.sample(0))
        return m, time.monotonic() - t

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
        if artifact is not None and rec.status == "ok":  # keep the original's and the best's compiled form
            best = self.best_record()
            keep = {self._baseline_id(), best.id if best else None, rec.id if not rec.genotype else None}
            if rec.id in keep:
                self.artifacts[rec.id] = artifact
            self.artifacts = {k: v for k, v in self.artifacts.items() if k in keep}
        return rec

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

    def _baseline_id(self) -> int | None:
        base = getattr(self, "baseline", None)
        return base.id if base is not None else None

    def artifact_for(self, rec: Record) -> Artifact:
        """The compiled candidate: kept in memory when compiled in this run, else compiled again."""
        if rec.id in self.artifacts:
            return self.artifacts[rec.id]
        model, _ = materialize(self.base, self.space, rec.genotype, self.passes, self.ctx)
        art = self.target.compile(model, Path(tempfile.mkdtemp(prefix="cand-", dir=self.workdir)))
        self.artifacts[rec.id] = art
        return art

    def confirm(self, best: Record | None) -> dict[str, Any] | None:
        """Re-measure the original and the best alternately: the search measured each once, on a
        machine whose load drifts; interleaving exposes the same drift to both."""
        rounds = self.cfg.confirm_rounds
        if rounds <= 0 or best is None or not best.genotype or self.baseline.status != "ok":
            return None
        import statistics

        t = time.monotonic()
        base_art, best_art = self.artifact_for(self.baseline), self.artifact_for(best)
        inputs = self.data.sample(0)
        b, c = [], []
        for _ in range(rounds):
            b.append(self.target.measure(base_art, inputs).latency.median_ms)
            c.append(self.target.measure(best_art, inputs).latency.median_ms)
        self.timings["confirm"] = time.monotonic() - t
        bm, cm = statistics.median(b), statistics.median(c)
        log.info("confirm: original %.3f ms vs best %.3f ms over %d alternating rounds: x%.3f", bm, cm, rounds, bm / cm)
        return {"rounds": rounds, "original_ms": bm, "best_ms": cm, "speedup": bm / cm,
                "original_rounds_ms": b, "best_rounds_ms": c,
                "how": "original and best measured alternately, median of the per-round medians"}

    def best_record(self) -> Record | None:
        # a stored candidate of another search space (other --passes, --search-exact) cannot be rebuilt here
        feasible = [r for r in self.store.records() if math.isfinite(self._score(r))
                    and all(k in self.space for k in r.genotype)]
        return min(feasible, key=lambda r: (r.latency_ms, r.id)) if feasible else None

    # ---------------------------------------------------------------------------- loop
    def _profile_best(self, report: dict[str, Any], best: Record | None) -> None:
        """Per-layer latency of the chosen graph, where the target can give it (Target.profile)."""
        prof = getattr(self.target, "profile", None)
        if prof is None or best is None or report.get("best") is None or self.stopped_because == "interrupted":
            return
        try:
            model, _ = materialize(self.base, self.space, best.genotype, self.passes, self.ctx)
            report["best"].update(prof(model, self.data.sample(0)))
        except Exception as e:  # noqa: BLE001 - the report stands without it
            log.warning("could not profile the best candidate per layer: %s", _one_line(e))

    def _inform_target(self) -> None:
        """Tell a tuning target the run's deadline and the best latency so far (cheap-first policy)."""
        for name, value in self._target_knobs().items():
            setattr(self.target, name, value)

    def _target_knobs(self) -> dict[str, Any]:
        """The cheap-first inputs the target has attributes for: `deadline` (time.monotonic()) and
        `incumbent_ms`; they travel with each job to a compile worker (graphopt.compile_pool)."""
        knobs: dict[str, Any] = {}
        if hasattr(self.target, "deadline") and self.cfg.budget.seconds is not None:
            knobs["deadline"] = self.t_start + self.cfg.budget.seconds
        if hasattr(self.target, "incumbent_ms"):
            best = self.best_record()
            knobs["incumbent_ms"] = best.latency_ms if best is not None else None
        return knobs

    def _time_left(self) -> float:
        """Seconds the search loop has left: the time budget less the recovery phase's share."""
        if self.cfg.budget.seconds is None:
            return math.inf
        from .recover import phase_seconds

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
                    from .rundir import remove_if_only_lock

                    remove_if_only_lock(self.out)
                lock.release()

    def _run(self) -> SearchResult:
        from .report import build_report, write_outputs

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
            if self.cfg.recover_top > 0:  # distil the most promising candidates (graphopt.recover)
                from .recover_phase import recover_phase

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
        records = self.store.records()
        best = self.best_record()
        confirmed = None
        if self.stopped_because != "interrupted" and not self.stopped_because.startswith("target unreachable"):
            try:
                confirmed = self.confirm(best)
            except KeyboardInterrupt:
                self.stopped_because = "interrupted"
            except TargetUnreachable as e:
                self.stopped_because = f"target unreachable: {e}"
            except Exception as e:
                log.warning("could not confirm the best candidate: %s", _one_line(e))
        wins = (sum(c < b for b, c in zip(confirmed["original_rounds_ms"], confirmed["best_rounds_ms"]))
                if confirmed is not None else 0)
        if confirmed is not None and (confirmed["speedup"] < 1.0 or wins < confirmed["rounds"]):
            confirmed["verdict"] = (f"candidate {best.id} was faster in only {wins} of {confirmed['rounds']} "
                                    "alternating rounds: not distinguishable from noise, keeping the original")
            log.warning("confirm: %s", confirmed["verdict"])
            best = self.baseline
        elif confirmed is not None:
            confirmed["verdict"] = f"candidate {best.id} confirmed faster than the original in every round"
        report = build_report(self, records, best)
        report["confirmed"] = confirmed
        if getattr(self, "recovery", None) is not None:
            report["recovery"] = self.recovery
        from .quality import report_blocks

        report.update(report_blocks(self, best))  # data splits, held-out task metric, trust
        self._profile_best(report, best)
        try:
            report_exit = write_outputs(self, report, best)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.target.close()
            self.store.close()
        return SearchResult(report=report, exit_code=report_exit, out_dir=self.out, best=best, records=records)

    def _run_pipelined(self, budget: Budget, done: int) -> None:
        """--jobs N > 1 on a target whose devices measure concurrently (an RPC tracker with several
        devices under one key: each measurement asks the tracker for a free device), and/or
        --compile-workers M > 1 (compiles in M worker processes, graphopt.compile_pool).

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
        if self.cfg.cluster:  # the same interface, over Ray (graphopt.cluster_pool)
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


def _wait_done(fut) -> None:
    """Wait for a future in steps of a second, so that a pending Ctrl-C is acted on while a
    compile or measurement runs (an untimed wait is only woken by the future itself)."""
    from concurrent.futures import wait

    while not fut.done():
        wait([fut], timeout=1.0)


def run_search(config: RunConfig) -> SearchResult:
    return Search(config).run()


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:500]


def _graphopt_version() -> str:
    from ._version import __version__

    return __version__


def _spec_str(spec: Any) -> str | None:
    """A --data / --eval-data spec as stored: a path resolved, a module:function as given."""
    if spec is None:
        return None
    text = str(spec)
    return str(Path(text).resolve()) if Path(text).exists() else text


def _spec_path(spec: Any) -> Path | None:
    """The file or folder a --data spec names (a loader's .py file), None for a module:function."""
    if spec is None:
        return None
    text = str(spec)
    if Path(text).exists():
        return Path(text)
    head = text.rpartition(":")[0]
    return Path(head) if head.endswith(".py") and Path(head).exists() else None


def _stable(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str)


__all__ = ["Budget", "RunConfig", "Search", "SearchResult", "materialize", "run_search", "NoFeasibleCandidate"]
