"""A per-model tuning budget, spent where the model's latency is (pure Python: no tvm import).

graphopt used to give every new workload the same fixed number of MetaSchedule trials. Most of a
model's time sits in a few workloads (EfficientNet-Lite0: its 47 workloads are far from equal), so a
fixed count spends most trials on kernels that do not matter. Here a compile gets a *budget* (trials
and/or seconds) for the workloads its database lacks, spent in rounds:

1. warm-up: every new workload gets `warm` trials (one batched tuning call), so each has a measured
   schedule (a workload without one runs TVM's naive default schedule, 40-110x slower);
2. then, round after round, the `per_round` workloads with the largest *expected gain* get `step`
   more trials each (one batched tuning call per round). The expected gain of a workload is
   `weight x best_seconds x improvement`: its share of the model's latency (calls x best measured
   time) times how much its recent rounds improved it (relative, per round, averaged over its last
   GAIN_WINDOW rounds as MetaSchedule's gradient scheduler's backward window; optimistic 1.0 before
   it has had a second round; floored at `min_gain`). One flat round of 16 trials is no evidence a
   workload is done (MetaSchedule's evolutionary search improves in jumps): with the last round
   alone, EfficientNet-Lite0's stem-side 1x1 conv (6% of the model) stopped at 20 trials and 126 us
   in one 20-minute run, and got 100 trials and 93.5 us in another. This is the gradient idea of
   MetaSchedule's task scheduler (Zheng et al., Ansor), applied across tuning calls on top of the
   persistent database, so a time budget and an incremental database work.
3. it stops when the trial budget is spent or the next round would likely end after the deadline.

With a `profile` callable (the x86 target's `alloc_in_model`), the share is what the kernel costs
*inside the model*, not calls x its record: after the warm-up, and then every `profile_every_s`
seconds, the model is built from the database and each kernel timed per model run
(in_model.kernel_times); a workload's `scale` is that time over calls x best record. Kernels do
not inflate alike in the model (weights pushed out of the cache, inputs the other core wrote), so
the order of the expected gains changes. Its seconds are part of the budget (docs/compiler.md).

`run_budget` drives a `tune(assignments)` callable (name -> trials; it tunes and returns the new best
seconds per name, None for a workload with no successful trial): the real one is in tuning.py, tests
pass a fake.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from graphopt.errors import UsageError

DEFAULT_WARM = 8
DEFAULT_STEP = 16
DEFAULT_PER_ROUND = 4
DEFAULT_WARM_BATCH = 16
MIN_GAIN = 0.02
GAIN_WINDOW = 3  # rounds a workload's expected improvement is averaged over (MetaSchedule's window_size)
PROFILE_EVERY_S = 300.0  # seconds of budget between in-model profiles (after the warm-up's)
SCALE_RANGE = (0.25, 8.0)  # an in-model / record ratio outside this is a mismatch, not a cost


@dataclass
class TaskState:
    name: str
    weight: float  # how often the model calls the workload
    best_s: float | None = None  # best measured seconds per call; None: no successful trial yet
    trials: int = 0  # trials given in this budget
    gain: float = 1.0  # relative improvement per round, its last GAIN_WINDOW rounds (1.0: unknown yet, optimistic)
    failed: bool = False  # its warm-up had no successful trial: no more trials for it
    scale: float = 1.0  # in-model time / (calls x best time) at the last profile (1.0: not profiled)
    history: list = field(default_factory=list)  # best seconds after each of its rounds (warm-up first)

    @property
    def share_s(self) -> float:
        """Its contribution to the model's latency by the database: calls x best time (0 when unknown)."""
        return 0.0 if self.best_s is None else float(self.weight) * float(self.best_s)

    @property
    def in_model_s(self) -> float:
        """The same, as the last in-model profile saw it (share_s while never profiled)."""
        return self.share_s * self.scale


@dataclass
class BudgetPlan:
    budget_trials: int | None = None  # trials for this compile (None: no trial cap)
    budget_s: float | None = None  # seconds for this compile (None: no time cap)
    warm: int = DEFAULT_WARM
    step: int = DEFAULT_STEP
    per_round: int = DEFAULT_PER_ROUND
    warm_batch: int = DEFAULT_WARM_BATCH  # new workloads per warm-up round (so a deadline can cut the warm-up)
    min_gain: float = MIN_GAIN
    gain_window: int = GAIN_WINDOW  # rounds each workload's expected improvement is averaged over (1: the last)
    profile_every_s: float = PROFILE_EVERY_S  # with run_budget's `profile`: seconds between profiles
    in_model: bool = False  # the x86 target's alloc_in_model: the compile passes run_budget a `profile`


@dataclass
class BudgetLog:
    """What a budget run did, round by round (goes into TuningStats)."""

    rounds: list[dict] = field(default_factory=list)
    profiles: list[dict] = field(default_factory=list)  # in-model profiles (run_budget's `profile`)
    trials: int = 0
    seconds: float = 0.0
    stopped_because: str = ""

    def summary(self) -> dict:
        return {"rounds": len(self.rounds), "trials": self.trials, "seconds": round(self.seconds, 1),
                "stopped_because": self.stopped_because, "per_round": self.rounds[-40:],
                **({"profiles": self.profiles} if self.profiles else {})}


def share_of_budget(total: int | float | None, new_tasks: int, all_tasks: int, warm: int) -> int | float | None:
    """The part of a per-model budget one compile gets: proportional to the share of its workloads
    that are new (a mutated candidate with 1 new workload of 47 gets 1/47 of it), never less than
    the warm-up of its new workloads (in trials; seconds are not floored). None stays None."""
    if total is None:
        return None
    if new_tasks <= 0 or all_tasks <= 0:
        return 0
    part = total * new_tasks / all_tasks
    if isinstance(total, int):
        return max(int(math.ceil(part)), min(int(total), new_tasks * int(warm)))
    return float(part)


def plan_round(states: list[TaskState], remaining: int | None, plan: BudgetPlan) -> dict[str, int]:
    """The next round's trials per workload name ({} when nothing is left to do).

    New workloads (no trials yet) first, each `warm` trials, most-called first, `warm_batch` of them
    a round, as many as the remaining trials allow; once all have had their warm-up, the `per_round` workloads with the
    largest expected gain (weight x best time x last improvement) get `step` trials each."""
    if remaining is not None and remaining <= 0:
        return {}
    new = [s for s in states if s.trials == 0 and not s.failed]
    if new:
        new.sort(key=lambda s: -float(s.weight))
        out: dict[str, int] = {}
        left = remaining
        for s in new[:max(1, plan.warm_batch)]:
            n = plan.warm if left is None else min(plan.warm, left)
            if n <= 0:
                break
            out[s.name] = n
            if left is not None:
                left -= n
        return out
    live = [s for s in states if not s.failed and s.best_s is not None]
    if not live or plan.step <= 0:
        return {}
    live.sort(key=lambda s: -(s.in_model_s * max(s.gain, plan.min_gain)))
    out = {}
    left = remaining
    for s in live[:max(1, plan.per_round)]:
        n = plan.step if left is None else min(plan.step, left)
        if n <= 0:
            break
        out[s.name] = n
        if left is not None:
            left -= n
    return out


def apply_results(states: Mapping[str, TaskState], given: Mapping[str, int],
                  results: Mapping[str, float | None], window: int = GAIN_WINDOW) -> None:
    """Update the states after a round: trials, best time, and the expected improvement: relative,
    per round, over its last `window` rounds (1: the last round alone)."""
    for name, n in given.items():
        s = states[name]
        first = s.trials == 0
        s.trials += int(n)
        new = results.get(name)
        if new is None or not math.isfinite(new):
            if first and s.best_s is None:
                s.failed = True
                continue
        elif s.best_s is None:
            s.best_s = float(new)
        else:
            s.best_s = min(s.best_s, float(new))
        if s.best_s is None:
            continue
        s.history.append(s.best_s)
        k = min(max(1, int(window)), len(s.history) - 1)
        if k == 0:  # its first measured round: nothing to compare yet (optimistic)
            s.gain = 1.0
            continue
        old = s.history[-1 - k]
        s.gain = max(0.0, (old - s.best_s) / old / k) if old > 0 else 0.0


def apply_profile(states: Iterable[TaskState], times: Mapping[str, float]) -> int:
    """Set each profiled workload's `scale` from its in-model seconds per model run
    (`times[name]`), clamped to SCALE_RANGE; returns how many were profiled."""
    lo, hi = SCALE_RANGE
    n = 0
    for s in states:
        t = times.get(s.name)
        if t is None or s.share_s <= 0 or not math.isfinite(t):
            continue
        s.scale = min(hi, max(lo, float(t) / s.share_s))
        n += 1
    return n


def run_budget(
    states: Iterable[TaskState],
    tune: Callable[[dict[str, int]], Mapping[str, float | None]],
    plan: BudgetPlan,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_round: Callable[[int, list[TaskState]], None] | None = None,
    profile: Callable[[list[TaskState]], Mapping[str, float]] | None = None,
) -> BudgetLog:
    """Spend `plan`'s budget on `states` by rounds (see the module doc); returns what it did.

    `deadline` (a clock() value) and `plan.budget_s` both bound the time: no round starts when the
    seconds per trial seen so far say it would end after the earlier of the two. `tune` is called
    once per round with {name: trials}. `profile(states)` -> {name: in-model seconds per model
    run}: called once every workload had its warm-up, then every `plan.profile_every_s`, when more
    workloads are live than a round takes (a candidate with one new workload builds nothing for it);
    its time counts against the budget."""
    states = list(states)
    by_name = {s.name: s for s in states}
    log = BudgetLog()
    t0 = clock()
    end = deadline
    if plan.budget_s is not None:
        end = t0 + float(plan.budget_s) if end is None else min(end, t0 + float(plan.budget_s))
    s_per_trial: float | None = None
    paused = 0.0
    last_profile: float | None = None
    while True:
        if profile is not None and log.rounds and all(s.trials or s.failed for s in states) and (
                sum(1 for s in states if not s.failed) > max(1, plan.per_round)) and (  # else no order to decide
                last_profile is None or clock() - last_profile >= plan.profile_every_s):
            tp = clock()
            if end is None or end - tp > 0:
                _profile(states, profile, log, clock)
            last_profile = tp
        remaining = None if plan.budget_trials is None else int(plan.budget_trials) - log.trials
        given = plan_round(states, remaining, plan)
        if not given:
            log.stopped_because = ("trial budget spent" if remaining is not None and remaining <= 0
                                   else "nothing left to tune")
            break
        if end is not None:
            left = end - clock()
            need = 0.0 if s_per_trial is None else s_per_trial * sum(given.values())
            if left <= 0 or (s_per_trial is not None and need > left):
                if s_per_trial is not None and left > 0 and log.rounds:
                    # shrink the round to what fits (at least one workload's worth)
                    fit = int(left / max(s_per_trial, 1e-9))
                    given = _shrink(given, fit)
                if left <= 0 or not given or (s_per_trial is not None and s_per_trial * sum(given.values()) > left):
                    log.stopped_because = "time budget spent"
                    break
        tr = clock()
        results = tune(dict(given))
        spent = clock() - tr
        apply_results(by_name, given, results, plan.gain_window)
        n = sum(given.values())
        log.trials += n
        rate = spent / max(n, 1)
        s_per_trial = rate if s_per_trial is None else 0.5 * s_per_trial + 0.5 * rate
        log.rounds.append({"tasks": len(given), "trials": n, "s": round(spent, 1),
                           "model_s": sum(s.share_s for s in states)})
        if on_round is not None:
            tc = clock()
            on_round(len(log.rounds), states)
            paused += clock() - tc  # the callback's own time (a bench's builds) is not tuning time
            if end is not None:
                end += clock() - tc
    log.seconds = clock() - t0 - paused
    return log


def _profile(states: list[TaskState], profile, log: BudgetLog, clock: Callable[[], float]) -> None:
    tp = clock()
    try:
        got = profile(states)
    except Exception as e:  # noqa: BLE001 - an allocation hint: never the reason tuning fails
        log.profiles.append({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]})
        return
    n = apply_profile(states, got)
    log.profiles.append({"after_round": len(log.rounds), "workloads": n, "s": round(clock() - tp, 1),
                         "db_ms": round(sum(s.share_s for s in states) * 1e3, 3),
                         "in_model_ms": round(sum(float(v) for v in got.values()) * 1e3, 3)})


def _shrink(given: dict[str, int], fit: int) -> dict[str, int]:
    """Keep the first workloads of a round whose trials add up to at most `fit`."""
    out: dict[str, int] = {}
    total = 0
    for k, v in given.items():
        if total + v > fit:
            break
        out[k] = v
        total += v
    return out


def budget_plan(name: str, tune_trials: Any, tune_time: Any, warm: int):
    """tune_trials=N (trials) and/or tune_time=S (seconds): a per-model tuning budget spent where the
    latency is (run_budget above); `trials` is then each new workload's warm-up. None: neither
    given (the fixed `trials` per workload, as before)."""
    if tune_trials is None and tune_time is None:
        return None
    try:
        n = None if tune_trials is None else int(tune_trials)
        secs = None if tune_time is None else seconds(tune_time)
    except (TypeError, ValueError):
        raise UsageError(f"{name} target: tune_trials must be an integer and tune_time seconds (e.g. 600, 10m), got "
                         f"tune_trials={tune_trials!r} tune_time={tune_time!r}") from None
    if (n is not None and n < 0) or (secs is not None and secs < 0):
        raise UsageError(f"{name} target: tune_trials and tune_time must be >= 0")
    if warm <= 0:
        raise UsageError(f"{name} target: tune_trials/tune_time need trials > 0 (each new workload's warm-up "
                         "trials); drop trials=0 or the budget")
    return BudgetPlan(budget_trials=n, budget_s=secs, warm=int(warm))


def seconds(v: Any) -> float:
    """600, "600", "600s", "10m", "1h" -> seconds."""
    if isinstance(v, (int, float)):
        return float(v)
    text = str(v).strip().lower()
    mult = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(text[-1:], None)
    return float(text[:-1]) * mult if mult is not None else float(text)
