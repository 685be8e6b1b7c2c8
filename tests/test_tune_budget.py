"""The per-model tuning budget (targets/tune_budget.py): allocation on a fake tuner (fast), and one
budgeted tune of a two-workload model on the real x86 target (tvm), its in-model profile on."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from conftest import float_init, make_model, matmul_model
from onnx import helper

from graphopt.errors import UsageError
from graphopt.targets import tune_budget as tb


class FakeTuner:
    """Each workload's best time falls as it gets trials: t = floor + (start - floor) / (1 + trials / k).
    A workload in `broken` never gets a successful trial. Counts calls and seconds on a fake clock."""

    def __init__(self, specs, broken=(), s_per_trial=1.0):
        self.specs = specs  # name -> (start_s, floor_s, k)
        self.broken = set(broken)
        self.given: dict[str, int] = {}
        self.calls = 0
        self.now = 0.0
        self.s_per_trial = s_per_trial

    def clock(self):
        return self.now

    def __call__(self, given):
        self.calls += 1
        out = {}
        for name, n in given.items():
            self.given[name] = self.given.get(name, 0) + n
            self.now += n * self.s_per_trial
            if name in self.broken:
                out[name] = None
                continue
            start, floor, k = self.specs[name]
            out[name] = floor + (start - floor) / (1 + self.given[name] / k)
        return out


def states_for(weights):
    return [tb.TaskState(name=n, weight=w) for n, w in weights.items()]


def test_budget_goes_to_the_workloads_that_hold_the_latency():
    # "big" is 100x the time of each small one; all improve alike with trials
    specs = {"big": (1e-2, 1e-3, 8)} | {f"small{i}": (1e-4, 1e-5, 8) for i in range(6)}
    tuner = FakeTuner(specs)
    states = states_for({n: 1.0 for n in specs})
    plan = tb.BudgetPlan(budget_trials=7 * 8 + 10 * 16, warm=8, step=16, per_round=2)
    log = tb.run_budget(states, tuner, plan, clock=tuner.clock)
    assert log.trials == plan.budget_trials and log.stopped_because == "trial budget spent"
    assert all(tuner.given[n] >= 8 for n in specs)  # every workload had its warm-up
    assert tuner.given["big"] >= 8 + 16 * 5  # and the big one most of the rest
    assert tuner.given["big"] > 3 * max(v for k, v in tuner.given.items() if k != "big")
    # a fixed count per workload with the same total would leave the model slower
    fixed = FakeTuner(specs)
    fixed({n: plan.budget_trials // len(specs) for n in specs})
    model = sum(s.share_s for s in states)
    model_fixed = sum(specs[n][1] + (specs[n][0] - specs[n][1]) / (1 + fixed.given[n] / 8) for n in specs)
    assert model < 0.8 * model_fixed


def test_calls_weigh_in_and_a_stalled_workload_gives_way():
    # "a" runs once but is slow; "b" is fast but called 50 times: b holds more of the latency
    specs = {"a": (1e-3, 9e-4, 1e9), "b": (1e-4, 1e-5, 8)}  # a barely improves
    tuner = FakeTuner(specs)
    states = states_for({"a": 1.0, "b": 50.0})
    tb.run_budget(states, tuner, tb.BudgetPlan(budget_trials=16 + 6 * 16, warm=8, step=16, per_round=1),
                  clock=tuner.clock)
    assert tuner.given["b"] > tuner.given["a"]


def test_one_flat_round_does_not_end_a_workload_that_was_improving():
    """The expected gain is the improvement per round over the last GAIN_WINDOW rounds, not the last
    round alone: "big" (3.3x each other's time) improves 30% in its first round, is flat in its second
    (the evolutionary search improves in jumps), then would improve again. With the last round alone
    it gets no round after the flat one while the others, improving 10% a round, take the rest."""
    def stepwise(history_s):
        class Tuner:
            def __init__(self):
                self.given, self.rounds = {}, {}

            def __call__(self, given):
                out = {}
                for n, k in given.items():
                    self.given[n] = self.given.get(n, 0) + k
                    r = self.rounds[n] = self.rounds.get(n, 0) + 1
                    out[n] = history_s[n][min(r, len(history_s[n])) - 1]
                return out
        return Tuner()

    times = {"big": [1e-3, 7e-4, 7e-4, 5e-4, 4e-4]} | {f"s{i}": [3e-4 * 0.9 ** r for r in range(12)] for i in range(3)}
    plan = tb.BudgetPlan(budget_trials=4 * 4 + 8 * 16, warm=4, step=16, per_round=1)
    got = {}
    for window in (1, tb.GAIN_WINDOW):
        tuner = stepwise(times)
        states = states_for({n: 1.0 for n in times})
        tb.run_budget(states, tuner, dataclasses.replace(plan, gain_window=window))
        got[window] = (tuner.rounds["big"], states[0].best_s)
    assert got[1] == (3, 7e-4)  # warm-up, +30%, flat: then never again (gain 0 -> the floor, below the others')
    assert got[tb.GAIN_WINDOW][0] >= 5 and got[tb.GAIN_WINDOW][1] == 4e-4  # the window's average kept it going


def test_the_gain_is_averaged_over_the_window():
    s = tb.TaskState(name="w", weight=1.0)
    for t, want in ((1.0, 1.0), (0.8, 0.2), (0.8, 0.1), (0.8, 0.2 / 3), (0.8, 0.0)):
        tb.apply_results({"w": s}, {"w": 4}, {"w": t})
        assert s.gain == pytest.approx(want), (t, s.history)
    r = tb.TaskState(name="r", weight=1.0, best_s=1.0, trials=8, history=[1.0])  # known to the database
    tb.apply_results({"r": r}, {"r": 16}, {"r": 0.9})
    assert r.gain == pytest.approx(0.1)  # compared with its database record, not optimistic


def test_warm_up_first_most_called_first_and_cut_by_the_budget():
    states = states_for({"x": 1.0, "y": 5.0, "z": 2.0})
    plan = tb.BudgetPlan(budget_trials=None, warm=8)
    assert list(tb.plan_round(states, 20, plan).items()) == [("y", 8), ("z", 8), ("x", 4)]
    assert tb.plan_round(states, 0, plan) == {}
    assert list(tb.plan_round(states, None, tb.BudgetPlan(warm=8, warm_batch=2))) == ["y", "z"]


def test_time_budget_stops_rounds_that_would_not_fit():
    specs = {f"w{i}": (1e-3, 1e-4, 8) for i in range(4)}
    tuner = FakeTuner(specs, s_per_trial=1.0)
    log = tb.run_budget(states_for({n: 1.0 for n in specs}), tuner,
                        tb.BudgetPlan(budget_s=100.0, warm=8, step=16, per_round=2), clock=tuner.clock)
    assert log.stopped_because == "time budget spent"
    assert tuner.now <= 100.0 and log.trials >= 32  # warm-up (32 s) + whole rounds that fit
    assert tuner.now > 100.0 - 32  # and it did not stop much early


def test_a_workload_that_never_succeeds_gets_no_more_trials():
    specs = {"ok": (1e-3, 1e-4, 8), "bad": (1e-3, 1e-4, 8)}
    tuner = FakeTuner(specs, broken={"bad"})
    states = states_for({"ok": 1.0, "bad": 10.0})
    tb.run_budget(states, tuner, tb.BudgetPlan(budget_trials=200, warm=8, step=16), clock=tuner.clock)
    assert tuner.given["bad"] == 8 and states[1].failed
    assert tuner.given["ok"] == 192


def test_a_later_candidate_gets_the_share_of_its_new_workloads():
    assert tb.share_of_budget(1000, 47, 47, 8) == 1000
    assert tb.share_of_budget(1000, 1, 47, 8) == 22  # ceil(1000/47)
    assert tb.share_of_budget(100, 1, 47, 8) == 8  # never below the new workload's warm-up
    assert tb.share_of_budget(1200.0, 1, 48, 8) == 25.0
    assert tb.share_of_budget(None, 1, 47, 8) is None and tb.share_of_budget(1000, 0, 47, 8) == 0


def test_an_in_model_profile_moves_the_trials_to_the_kernel_that_is_slow_in_the_model():
    # "a" and "b" look alike by their records; in the model "b" takes 3x its record (its weights
    # pushed out of the cache, say), "a" what its record says: the rounds should favour "b"
    specs = {"a": (1e-3, 1e-4, 8), "b": (1e-3, 1e-4, 8)}
    plan = tb.BudgetPlan(budget_trials=2 * 8 + 6 * 16, warm=8, step=16, per_round=1, profile_every_s=1e9)
    seen: list[int] = []

    def profile(states):
        seen.append(sum(s.trials for s in states))
        return {s.name: s.share_s * (3.0 if s.name == "b" else 1.0) for s in states}

    tuner = FakeTuner(specs)
    log = tb.run_budget(states_for({"a": 1.0, "b": 1.0}), tuner, plan, clock=tuner.clock, profile=profile)
    assert seen == [16]  # once, after the warm-up of both (profile_every_s: not again)
    assert tuner.given["b"] >= 8 + 4 * 16 and tuner.given["a"] <= 8 + 2 * 16, tuner.given
    assert log.profiles[0]["workloads"] == 2 and log.profiles[0]["in_model_ms"] > log.profiles[0]["db_ms"]
    assert "profiles" in log.summary()
    # when every live workload fits in one round there is no order to decide: no profile (no build)
    seen.clear()
    few = FakeTuner(specs)
    tb.run_budget(states_for({"a": 1.0, "b": 1.0}), few, dataclasses.replace(plan, per_round=2), clock=few.clock,
                  profile=profile)
    assert seen == []
    # without the profile the two take turns
    plain = FakeTuner(specs)
    tb.run_budget(states_for({"a": 1.0, "b": 1.0}), plain, plan, clock=plain.clock)
    assert abs(plain.given["a"] - plain.given["b"]) <= 16


def test_profiles_repeat_on_schedule_count_against_the_time_budget_and_may_fail():
    specs = {f"w{i}": (1e-3, 1e-4, 8) for i in range(3)}
    tuner = FakeTuner(specs, s_per_trial=1.0)
    calls: list[float] = []

    def profile(states):  # a build and timed runs: 10 s on the fake clock
        calls.append(tuner.now)
        tuner.now += 10.0
        if len(calls) == 2:
            raise RuntimeError("build failed\nsecond line")
        return {s.name: 2 * s.share_s for s in states}

    states = states_for({n: 1.0 for n in specs})
    log = tb.run_budget(states, tuner, tb.BudgetPlan(budget_s=300.0, warm=8, step=16, per_round=1,
                                                    profile_every_s=100.0), clock=tuner.clock, profile=profile)
    assert calls[0] == 24.0  # after the warm-up (3 x 8 trials at 1 s), before any other round
    assert all(b - a >= 100.0 for a, b in zip(calls, calls[1:])) and len(calls) == 3, calls
    assert tuner.now <= 300.0  # the profiles' 30 s came out of the budget
    assert log.profiles[1] == {"error": "RuntimeError: build failed"}  # logged; tuning went on
    assert all(s.scale == 2.0 for s in states) and log.trials == tuner.now - 30.0


def test_a_profile_sets_a_clamped_scale_and_skips_what_it_did_not_see():
    states = states_for({"a": 2.0, "b": 1.0, "c": 1.0, "d": 1.0})
    for s in states[:3]:
        s.best_s = 1e-3
    n = tb.apply_profile(states, {"a": 3e-3, "b": 1.0, "d": 5e-3, "x": 1.0})
    assert n == 2 and [s.scale for s in states] == [1.5, tb.SCALE_RANGE[1], 1.0, 1.0]  # d: no record yet
    assert states[0].in_model_s == pytest.approx(3e-3) and states[0].share_s == pytest.approx(2e-3)


def test_budget_options_are_parsed_and_checked():
    pytest.importorskip("tvm")
    from graphopt.targets.x86 import X86Target

    t = X86Target(threads=1, trials=4, tune_trials=300, tune_time="10m")
    assert (t.budget.budget_trials, t.budget.budget_s, t.budget.warm) == (300, 600.0, 4)
    assert X86Target(threads=1).budget is None
    with pytest.raises(UsageError, match="tune_trials must be an integer"):
        X86Target(threads=1, tune_trials="lots")
    with pytest.raises(UsageError, match="need trials > 0"):
        X86Target(threads=1, trials=0, tune_trials=10)
    assert X86Target(threads=1, trials=4, tune_trials=10, alloc_in_model="1").budget.in_model is True
    assert X86Target(threads=1, trials=4, tune_trials=10).budget.in_model is False  # off by default
    # over RPC the kernels run on the device: a profile on this machine would mislead
    assert X86Target(threads=1, trials=4, tune_trials=10, alloc_in_model=1, server="127.0.0.1:9").budget.in_model is False
    with pytest.raises(UsageError, match="alloc_in_model=1 weighs a per-model tuning budget"):
        X86Target(threads=1, trials=4, alloc_in_model=1)  # no budget: it would do nothing, silently


@pytest.mark.tvm
@pytest.mark.slow  # ~30-60 s of tuning on a quiet 2-core machine, minutes on a loaded one
def test_budgeted_tune_of_a_real_model_then_reuse(tmp_path):
    pytest.importorskip("tvm")
    from graphopt.targets.x86 import X86Target

    rng = np.random.default_rng(0)  # two workloads: matmul+add+relu, then a matmul of another shape
    model = make_model([helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
                        helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])],
                       {"x": [1, 8, 32]}, ["y"], [float_init("W1", rng.standard_normal((32, 16)) * 0.1),
                                                  float_init("b", rng.standard_normal(16)),
                                                  float_init("W2", rng.standard_normal((16, 24)) * 0.1)])
    target = X86Target(threads=2, trials=2, tune_trials=8, tuning_db=str(tmp_path / "db"), alloc_in_model=1)
    target.budget.step, target.budget.per_round = 2, 1
    try:
        art = target.compile(model, tmp_path)
        st = art.info["tuning"]
        assert st["workloads_tuned"] == st["workloads_seen"] >= 2 and not st["partly_untuned"]
        assert st["trials"] == 8 and st["budget"]["rounds"] >= 3, st  # warm-up 2 each, then rounds of 2
        # after the warm-up, the model was built and its kernels timed (alloc_in_model)
        prof = st["budget"]["profiles"][0]
        assert prof["after_round"] == 1 and prof["workloads"] == st["workloads_seen"] and prof["in_model_ms"] > 0, prof
        x = np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)
        want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(target.run_once(art, {"x": x})[0], want, rtol=1e-4, atol=1e-5)
        again = target.compile(model, tmp_path).info["tuning"]  # nothing new: no trials
        assert again["trials"] == 0 and again["workloads_reused"] == again["workloads_seen"]
    finally:
        target.close()


@pytest.mark.tvm
@pytest.mark.slow  # ~20-40 s of tuning on a quiet 2-core machine
def test_tune_cache_flush_uses_its_own_database_and_a_flushing_runner(tmp_path):
    pytest.importorskip("tvm")
    from graphopt.targets.x86 import X86Target

    model = matmul_model()
    plain = X86Target(threads=2, trials=2, tuning_db=str(tmp_path / "db"))
    target = X86Target(threads=2, trials=2, tuning_db=str(tmp_path / "db"), tune_cache_flush=1)
    assert target.tuning_db_dir.name == plain.tuning_db_dir.name + "-flush"
    assert plain.ms_runner() is None  # MetaSchedule's default: hot caches
    runner = target.ms_runner()
    assert runner.evaluator_config.enable_cpu_cache_flush is True
    try:
        art = target.compile(model, tmp_path)
        st = art.info["tuning"]
        assert st["workloads_tuned"] == st["workloads_seen"] >= 1 and st["db"] == str(target.tuning_db_dir)
        x = np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32)
        want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(target.run_once(art, {"x": x})[0], want, rtol=1e-4, atol=1e-5)
        assert not plain.tuning_db_dir.exists()  # the hot-cache database was not written
    finally:
        target.close()
        plain.close()
