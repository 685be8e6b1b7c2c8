"""The recovery phase of a run: after the search, distil the top-K candidates (graphopt.recovery.recover)
and record each recovered candidate like any other (Search.evaluate).

Apart from graphopt.recovery.recover because it drives the run (the Search) and rebuilds candidates
(graphopt.materialize), which itself reads recovered weights through graphopt.recovery.recover.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from ..errors import first_line
from ..genotype import Genotype
from ..materialize import materialize
from ..plugin import Pass
from .recover import RECOVER_KEY, RecoverOptions, phase_seconds, pick_candidates, recover, save_weights

if TYPE_CHECKING:
    from ..driver import Search
    from ..runstore.store import Record

log = logging.getLogger("graphopt")


def recover_phase(search: Search) -> None:
    """Recover the top-K candidates of the run in `search` (graphopt.driver.Search), each as a
    new record; fills search.recovery (the report's "recovery" list). KeyboardInterrupt: the
    candidate in training keeps its best weights (stored and recorded), then it propagates."""
    import statistics

    cfg = search.cfg
    k = int(cfg.recover_top)
    search.recovery = []
    records = search.store.records()
    chosen = pick_candidates(records, k, getattr(search, "baseline", None), search.min_required,
                             cost=flops_cost(search, records))
    if not chosen:
        log.info("recover: no candidate to recover (none below --min-fidelity or faster than the original and inexact)")
        return
    t_phase = time.monotonic()
    started = time.time() - (time.monotonic() - search.t_start)  # this run's start, wall clock
    own = [r for r in records if r.genotype and r.created >= started and r.timings]

    def median(key: str) -> float:
        return statistics.median([r.timings.get(key, 0.0) for r in own]) if own else 0.0

    # a recovered candidate is rebuilt, scored and (when feasible) compiled and measured like any other;
    # the rebuild is timed on each parent (warm caches), the rest is what the search's candidates took
    rest = median("fidelity") + median("compile") + median("measure")
    if cfg.budget.seconds is not None:
        end = search.t_start + cfg.budget.seconds
        if cfg.recover_seconds is not None:
            end = min(end, t_phase + cfg.recover_seconds)
    else:
        end = t_phase + (phase_seconds(None, cfg.recover_seconds, len(chosen)) or 0.0)
    build = 0.0  # the last rebuild's time: the estimate for the next ones
    opts = RecoverOptions(train=cfg.recover_train, seed=cfg.seed, threads=cfg.pass_options.get("finetune_threads"),
                          train_size=cfg.pass_options.get("recover_train_size"),
                          output_loss=cfg.pass_options.get("recover_loss", "mse"),
                          temperature=float(cfg.pass_options.get("recover_temperature", 1.0)))
    log.info("recover: distilling %d candidate(s) %s on the fit split (%d samples) for up to %.0f s, "
             "judged on the select split (%d samples)", len(chosen), [r.id for r in chosen],
             search.fit_data.num_samples, max(0.0, end - t_phase), search.fidelity_data.num_samples)
    for i, parent in enumerate(chosen):
        tag = f"from-{parent.id}"
        genotype = Genotype({**dict(parent.genotype), RECOVER_KEY: tag})
        entry: dict[str, Any] = {"parent_id": parent.id, "moves": len(parent.genotype), "tag": tag,
                                 "fidelity_before": parent.fidelity, "latency_ms_before": parent.latency_ms,
                                 "status_before": parent.status}
        search.recovery.append(entry)
        done = search.store.get(genotype)
        if done is not None:  # a resumed run: recovered before
            entry.update(candidate_id=done.id, fidelity_after=done.fidelity, latency_ms_after=done.latency_ms,
                         status_after=done.status, note="recovered in an earlier run (from the store)")
            continue
        left = len(chosen) - i
        # after the phase, inside a time budget: confirming the best (the original and it measured
        # alternately) and rebuilding it once (best.onnx, the held-out check and a per-layer profile share it)
        rebuilds = 1  # the run's end materializes the best once (Search.model_for)
        tail = (2 * cfg.confirm_rounds * median("measure") + rebuilds * build) if cfg.budget.seconds is not None else 0.0
        seconds = (end - tail - time.monotonic()) / left - (build + rest)
        if seconds < 1.0:
            entry["note"] = f"skipped: {max(0.0, seconds):.1f} s of the budget left for it"
            log.info("recover: candidate %d skipped (no time left)", parent.id)
            continue
        t = time.monotonic()
        interrupted = False
        try:
            model, _ = materialize(search.base, search.space, parent.genotype, search.passes, search.ctx,
                                   finalize=False)
            build = time.monotonic() - t  # this candidate's rebuild time is now known
            tail = 2 * cfg.confirm_rounds * median("measure") + rebuilds * build if cfg.budget.seconds is not None else 0.0
            seconds = (end - tail - t) / left - (build + rest)
            finalizes = _has_finalize(search, parent)
            res = recover(model, search.base.proto, search.fit_data, search.checker,
                          seconds=max(1.0, seconds - (build if finalizes else 0.0)), options=opts,
                          select_before=parent.fidelity if not finalizes else None,
                          label=f"{i + 1}/{len(chosen)} (candidate {parent.id})")
        except KeyboardInterrupt:
            raise
        except Exception as e:  # failure is a value
            entry["error"] = f"{type(e).__name__}: {first_line(e, 500)}"
            log.warning("recover: candidate %d: %s", parent.id, entry["error"])
            continue
        entry.update(res.to_dict())
        entry["recover_s"] = round(time.monotonic() - t, 3)
        interrupted = res.stopped == "interrupted"
        if not res.weights or res.select_after <= res.select_before:
            entry["note"] = "no better weights on the select split; the candidate stays as it was"
        else:
            save_weights(search.out, tag, res.weights)
            # the graph as materialize(genotype) rebuilds it (export, best.onnx): built here when no
            # whole-model step (int8) follows the moves
            rec, _ = search.evaluate(genotype, model=None if finalizes else res.model)
            entry.update(candidate_id=rec.id, fidelity_after=rec.fidelity, latency_ms_after=rec.latency_ms,
                         status_after=rec.status, error_after=rec.error)
            log.info("recover: candidate %d -> %d: select %s %.6f -> %.6f, %s", parent.id, rec.id, cfg.metric,
                     parent.fidelity, rec.fidelity if rec.fidelity is not None else math.nan,
                     f"{rec.latency_ms:.3f} ms" if rec.latency_ms else rec.status)
        if interrupted:
            raise KeyboardInterrupt
    search.timings["recover"] = time.monotonic() - t_phase


def flops_cost(search: Search, records: list[Record], limit: int = 8) -> Any:
    """cost(record) for pick_candidates: the FLOPs (graphopt.reporting.analysis) of the candidates below the
    threshold, rebuilt (before int8 finalisation) for the `limit` most faithful of them; None for
    the others and on any failure (then the size in bytes counts)."""
    from ..reporting.analysis import analyze

    below = sorted((r for r in records if r.status == "infeasible" and r.fidelity is not None and r.genotype
                    and RECOVER_KEY not in r.genotype and r.duplicate_of is None),
                   key=lambda r: (-r.fidelity, r.id))[:limit]
    flops: dict[int, float] = {}
    t = time.monotonic()
    for r in below:
        try:
            model, _ = materialize(search.base, search.space, r.genotype, search.passes, search.ctx, finalize=False)
            flops[r.id] = float(analyze(model).total_flops)
        except Exception:  # noqa: BLE001 - a cost estimate only
            continue
    if below:
        log.info("recover: FLOPs of %d candidate(s) below the threshold: %.1f s", len(flops), time.monotonic() - t)
    return lambda r: flops.get(r.id)


def _has_finalize(search: Search, parent: Record) -> bool:
    """Does a pass rewrite the whole model after the moves (int8)? Then the pre-finalize model's
    select score is not the record's and is measured anew."""
    used = {search.space.site(k).pass_name for k in parent.genotype if k in search.space}
    return any(type(search.passes[p]).finalize is not Pass.finalize for p in used)


__all__ = ["recover_phase"]
