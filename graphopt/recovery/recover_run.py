"""Recovery in a run (graphopt.recovery.recover): the options' checks, the time the phase may take, and
which candidates it trains. Split out of graphopt/recovery/recover.py, which re-exports these names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .recover_files import RECOVER_KEY

if TYPE_CHECKING:
    from ..runstore.store import Record


TRAIN_MODES = ("changed", "all", "tail")  # tail: graphopt.recovery.recover_tail (cached activations)
DEFAULT_SECONDS_PER_CANDIDATE = 120.0  # --recover-top without --recover-time or a time budget
DEFAULT_SHARE = 0.5  # of a time --budget, when --recover-time is not given


def check_config(cfg: Any) -> None:
    """UsageErrors for the recovery options of a RunConfig (one line each, naming the fix)."""
    k = cfg.recover_top
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UsageError(f"--recover-top {k}: must be 0 (off) or a positive number of candidates")
    if cfg.recover_train not in TRAIN_MODES:
        raise UsageError(f"--recover-train {cfg.recover_train!r}: choose one of {', '.join(TRAIN_MODES)}")
    secs = cfg.recover_seconds
    if secs is not None:
        if not secs > 0:
            raise UsageError(f"--recover-time {secs}: must be a positive time (e.g. 90s, 5m)")
        if cfg.budget.seconds is not None and secs >= cfg.budget.seconds:
            raise UsageError(f"--recover-time {secs:g} s: must be shorter than the time --budget "
                             f"({cfg.budget.seconds:g} s), which covers the search and the recovery")
    if k:
        from .finetune import torch_available

        if not torch_available():
            raise UsageError("--recover-top needs torch, which is not installed: pip install torch "
                             "(the CPU build is enough), or run without --recover-top")


def parse_seconds(text: str | float | None) -> float | None:
    """--recover-time: 90, 90s, 5m, 1h -> seconds."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*", str(text))
    if not m:
        raise UsageError(f"--recover-time {text!r}: expected a time (90s, 5m, 1h)")
    return float(m.group(1)) * {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]


def pick_candidates(records: list[Record], k: int, baseline: Record | None,
                    min_fidelity: float = 0.0, cost: Any = None) -> list[Record]:
    """The K most promising records of the cheap phase.

    Recovery changes weights, not speed: it changes the run's choice only by lifting a candidate
    over --min-fidelity. So first the candidates below it (status "infeasible"; never compiled,
    so without a latency) that are on the Pareto front of (size in bytes, select score), closest
    to the threshold first; then the feasible ones measured faster than the original, fastest
    first (recovery raises the quality of what the run would return); then the other infeasible
    ones, most faithful first. Left out: the original, recovered records, failed ones,
    duplicates, and exact ones (select score within 1e-6 of the original's: nothing to recover).
    `cost(record)` (lower = cheaper; None: unknown) replaces the size in bytes on that front: recover_phase
    passes FLOPs (a `resolution` or `depth` move makes a model faster, not smaller).
    """
    base_ms = baseline.latency_ms if baseline is not None else None
    # exact = scores what the original scores: 1.0 for a similarity, the original's accuracy for a task
    # metric in points (was 1 - 1e-6 for both: every candidate of an `imagenet_top1` run, 0-100, was "exact")
    top = baseline.fidelity if baseline is not None and baseline.fidelity is not None else 1.0
    exact = top - 1e-6 * max(1.0, abs(top))
    below, fast = [], []
    for r in records:
        if not r.genotype or RECOVER_KEY in r.genotype or r.duplicate_of is not None:
            continue
        if r.fidelity is None or r.fidelity >= exact or r.size_bytes is None:
            continue
        if r.status == "infeasible" and r.fidelity < min_fidelity:
            below.append(r)
        elif r.status == "ok" and r.latency_ms is not None and (base_ms is None or r.latency_ms < base_ms):
            fast.append(r)

    costs = {r.id: cost(r) for r in below} if cost is not None else {}
    sizes = {r.id: r.size_bytes if costs.get(r.id) is None else costs[r.id] for r in below}

    def dominated(r: Record) -> bool:
        return any(sizes[o.id] <= sizes[r.id] and o.fidelity >= r.fidelity
                   and (sizes[o.id] < sizes[r.id] or o.fidelity > r.fidelity) for o in below)

    front = sorted((r for r in below if not dominated(r)), key=lambda r: (-r.fidelity, r.id))
    rest = sorted((r for r in below if r not in front), key=lambda r: (-r.fidelity, r.id))
    fast.sort(key=lambda r: (r.latency_ms, r.id))
    return (front + fast + rest)[:max(0, k)]


def phase_seconds(budget_seconds: float | None, recover_seconds: float | None, k: int) -> float | None:
    """Time the recovery phase may take: --recover-time, else DEFAULT_SHARE of a time budget,
    else DEFAULT_SECONDS_PER_CANDIDATE per candidate. None when recovery is off."""
    if k <= 0:
        return None
    if recover_seconds is not None:
        return float(recover_seconds)
    if budget_seconds is not None:
        return DEFAULT_SHARE * budget_seconds
    return DEFAULT_SECONDS_PER_CANDIDATE * k
