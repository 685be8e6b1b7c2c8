"""The end of a run: confirm the best candidate against the original (alternating rounds),
profile it per layer, and hand the report a plain summary (graphopt.reporting.report.RunSummary).
A mixin of graphopt.driver.Search."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import TargetUnreachable, first_line
from .materialize import materialize
from .plugin import Artifact, Target

if TYPE_CHECKING:
    from .reporting.report import RunSummary
    from .runstore.store import Record

log = logging.getLogger("graphopt")


@dataclass
class SearchResult:
    report: dict[str, Any]
    exit_code: int
    out_dir: Path
    best: Record | None
    records: list[Record]


class ConcludeSearch:
    """Confirm / profile / report of a Search (graphopt.driver.Search inherits it)."""

    def model_for(self, rec: Record) -> Any:
        """The candidate's graph, materialized once per record at the end of a run (confirm, the
        held-out check, the per-layer profile, best.onnx and the artifact all use it)."""
        models = self.__dict__.setdefault("_models", {})
        if rec.id not in models:
            models.clear()  # one candidate's graph held at a time (the best, or the original)
            models[rec.id], _ = materialize(self.base, self.space, rec.genotype, self.passes, self.ctx)
        return models[rec.id]

    def artifact_for(self, rec: Record) -> Artifact:
        """The compiled candidate: kept in memory when compiled in this run, else compiled again."""
        if rec.id in self.artifacts:
            return self.artifacts[rec.id]
        art = self.target.compile(self.model_for(rec), Path(tempfile.mkdtemp(prefix="cand-", dir=self.workdir)))
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
        from .timing import measure_feeds  # the same K select samples as the search

        b, c = [], []
        for _ in range(rounds):
            b.append(measure_feeds(self.target, base_art, self.timing_feeds, self.value_dependent).latency.median_ms)
            c.append(measure_feeds(self.target, best_art, self.timing_feeds, self.value_dependent).latency.median_ms)
        self.timings["confirm"] = time.monotonic() - t
        bm, cm = statistics.median(b), statistics.median(c)
        log.info("confirm: original %.3f ms vs best %.3f ms over %d alternating rounds: x%.3f", bm, cm, rounds, bm / cm)
        return {"rounds": rounds, "original_ms": bm, "best_ms": cm, "speedup": bm / cm,
                "original_rounds_ms": b, "best_rounds_ms": c,
                "how": "original and best measured alternately, median of the per-round medians"}

    def _profile_best(self, report: dict[str, Any], best: Record | None) -> None:
        """Per-layer latency of the chosen graph, where the target can give it (it has a profile()
        method): one more measurement of the best, told TargetContext(profile_layers=True)."""
        if getattr(self.target, "profile", None) is None or best is None or report.get("best") is None \
                or self.stopped_because == "interrupted":
            return
        from dataclasses import replace

        from .plugin import current_context, inform_target

        told = current_context(self.target)
        try:
            inform_target(self.target, replace(told, profile_layers=True))
            m = self.target.measure(self.artifact_for(best), self.data.sample(0))
            layers = {k: v for k, v in m.extra.items() if k.startswith("layers")}
            # a target that does not read the context: its profile() method, as before
            report["best"].update(layers or self.target.profile(self.model_for(best), self.data.sample(0)))
        except Exception as e:  # noqa: BLE001 - the report stands without it
            log.warning("could not profile the best candidate per layer: %s", _one_line(e))
        finally:
            inform_target(self.target, told)

    def summary(self) -> RunSummary:
        """The plain values report.json is built from (graphopt.reporting.report.build_report)."""
        from .reporting.report import RunSummary

        checker = self.checker
        return RunSummary(
            config=self.cfg, base=self.base, space=self.space, target=self.target.describe(),
            stopped_because=self.stopped_because, resumed=self.resumed, min_required=self.min_required,
            metric=checker.metric, metric_description=checker.metric_obj.description,
            metric_units=checker.metric_obj.units, metric_basis=checker.metric_obj.basis(checker.labels),
            reference_value=checker.reference_value,
            data_synthetic=self.data.synthetic, data_source=self.data.source,
            select_samples=self.fidelity_data.num_samples, fit_samples=self.fit_samples,
            counts=dict(self.counts), timings=dict(self.timings),
            wall_time_s=round(time.monotonic() - self.t_start, 3),
            latency_over=getattr(self, "latency_over", None), not_applicable=getattr(self, "not_applicable", None))

    def _conclude(self) -> SearchResult:
        """The end of a run: confirm the best against the original, build the report from a plain
        summary (graphopt.reporting.report.RunSummary), profile the best, write the outputs. The best
        candidate is materialized at most once (model_for)."""
        from .reporting.report import build_report, write_outputs

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
        report = build_report(self.summary(), records, best)
        report["confirmed"] = confirmed
        if getattr(self, "recovery", None) is not None:
            report["recovery"] = self.recovery
        from .evaluation.quality import report_blocks

        report.update(report_blocks(self, best))  # data splits, held-out task metric, trust
        self._profile_best(report, best)
        try:
            export = ((lambda: self.target.export(self.artifact_for(best), self.out))
                      if best is not None and type(self.target).export is not Target.export else None)
            best_onnx = None
            if best is not None:  # the original: its file, byte for byte
                best_onnx = (self.base.path.read_bytes() if not best.genotype and self.base.path is not None
                             else self.model_for(best).SerializeToString())
            report_exit = write_outputs(self.out, report, best, self.store.records(), store_path=self.store.path,
                                        best_onnx=best_onnx, export_artifact=export)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.target.close()
            self.store.close()
        return SearchResult(report=report, exit_code=report_exit, out_dir=self.out, best=best, records=records)


def _one_line(e: BaseException) -> str:
    return first_line(e, 500)
