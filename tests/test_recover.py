"""Recovery (graphopt.recovery.recover, `--recover-top`): distillation of the most promising candidates.

On a small residual net built here: distillation beats least-squares repair alone on held-out
inputs; the matched features are the block boundaries (pruned ones against the original's kept
channels); the weights kept are the best seen on the select split, also when Ctrl-C stops
training; a time limit is a time limit; in a run, the recovered candidates are new records that
`export` rebuilds, and a time --budget covers the recovery.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_cli
from onnx import TensorProto, helper, numpy_helper

from graphopt.driver import materialize
from graphopt.errors import UsageError
from graphopt.evaluation.evaluate import CalibrationData
from graphopt.evaluation.fidelity import FidelityChecker
from graphopt.genotype import Genotype, SearchSpace
from graphopt.modelio.ir import load_proto
from graphopt.passes.kernel import KernelResize
from graphopt.passes.width import WidthPrune
from graphopt.plugin import MoveContext
from graphopt.recovery.recover import RecoverOptions, choose_features, pick_candidates, recover

torch = pytest.importorskip("torch")


def residual_model(ch: int = 16, mid: int = 32, blocks: int = 3, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x -> stem conv -> [1x1 expand, relu, 3x3 depthwise, relu, 1x1 project, + skip] * blocks -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr, np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "ws", "bs"], ["s0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["s0"], ["h0"], name="stem_relu")]
    inits = [init("ws", rng.standard_normal((ch, 3, 3, 3)) * 0.4), init("bs", rng.standard_normal(ch) * 0.1)]
    cur = "h0"
    for b in range(blocks):
        inits += [init(f"we{b}", rng.standard_normal((mid, ch, 1, 1)) * ch ** -0.5),
                  init(f"be{b}", rng.standard_normal(mid) * 0.1),
                  init(f"wd{b}", rng.standard_normal((mid, 1, 3, 3)) * 0.4), init(f"bd{b}", rng.standard_normal(mid) * 0.1),
                  init(f"wp{b}", rng.standard_normal((ch, mid, 1, 1)) * mid ** -0.5 * 3),
                  init(f"bp{b}", rng.standard_normal(ch) * 0.1)]
        nodes += [helper.make_node("Conv", [cur, f"we{b}", f"be{b}"], [f"e{b}"], name=f"expand{b}"),
                  helper.make_node("Relu", [f"e{b}"], [f"er{b}"], name=f"relu_e{b}"),
                  helper.make_node("Conv", [f"er{b}", f"wd{b}", f"bd{b}"], [f"d{b}"], name=f"dw{b}", group=mid,
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"d{b}"], [f"dr{b}"], name=f"relu_d{b}"),
                  helper.make_node("Conv", [f"dr{b}", f"wp{b}", f"bp{b}"], [f"p{b}"], name=f"project{b}"),
                  helper.make_node("Add", [cur, f"p{b}"], [f"a{b}"], name=f"add{b}")]
        cur = f"a{b}"
    inits += [init("fc_w", rng.standard_normal((10, ch)) * 0.5), init("fc_b", rng.standard_normal(10) * 0.1)]
    nodes += [helper.make_node("GlobalAveragePool", [cur], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphopt-tests")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def smooth(rng, n: int, size: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, 1, 3, size, size)).astype(np.float32)
    return (x + np.roll(x, 1, -1) + np.roll(x, 1, -2)) / 3


PASSES = {"width": WidthPrune(), "kernel": KernelResize()}


def lossy_candidate(fit: np.ndarray, stem: bool = False):
    """Width 0.5 on every expand conv (and the stem's residual group when `stem`), the depthwise and
    stem kernels 3x3 -> 1x1; least-squares repair on `fit`."""
    base = load_proto(residual_model())
    space = SearchSpace([s for p in PASSES.values() for s in p.sites(base.graph())])
    genes = {s.key: 0.5 for s in space.sites if s.key.startswith("width:") and ("expand" in s.key or stem)}
    genes.update({s.key: 1 for s in space.sites if s.key.startswith("kernel:")})
    model, applied = materialize(base, space, Genotype(genes), PASSES,
                                 MoveContext(base.proto, {"x": fit}, {"repair": True}))
    assert set(applied.values()) == {"applied"}
    return base, model


def test_distillation_beats_repair_alone_on_held_out_inputs():
    rng = np.random.default_rng(1)
    fit, sel, held = smooth(rng, 32), smooth(rng, 16), smooth(rng, 32)
    base, repaired = lossy_candidate(fit)
    select = FidelityChecker(base.proto, CalibrationData({"x": sel}, "select"), "cosine")
    held_out = FidelityChecker(base.proto, CalibrationData({"x": held}, "held-out"), "cosine")
    res = recover(repaired, base.proto, CalibrationData({"x": fit}, "fit"), select, steps=100,
                  options=RecoverOptions(threads=1, eval_every_s=1e9))
    onnx.checker.check_model(res.model)
    before, after = held_out.score(repaired).value, held_out.score(res.model).value
    print(f"held-out cosine: repair {before:.5f}, + distillation {after:.5f} ({res.steps} steps)")
    assert before < 0.995  # the moves really lose fidelity, after repair
    assert 1 - after < 0.4 * (1 - before), (before, after)  # a clear margin: the gap shrinks by > 2.5x
    assert res.select_after > res.select_before and res.stopped == "steps" and res.augment
    assert res.features == ["p0", "a0", "p1", "a1", "p2", "a2"]  # each block's projection and residual sum
    # only the weights the moves changed were trained; the graph is the repaired one
    assert [(n.op_type, n.name) for n in res.model.graph.node] == [(n.op_type, n.name) for n in repaired.graph.node]
    orig = {t.name: numpy_helper.to_array(t) for t in base.proto.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in repaired.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert changed and changed <= set(res.trained)
    assert all(k not in orig or orig[k].shape != old[k].shape or not np.array_equal(orig[k], old[k])
               for k in res.trained)
    assert {"ws", "bs", "fc_w", "fc_b"}.isdisjoint(res.trained)


def test_pruned_block_boundaries_are_matched_on_the_kept_channels():
    rng = np.random.default_rng(2)
    base, cand = lossy_candidate(smooth(rng, 16), stem=True)
    from graphopt.recovery.finetune import TorchGraph, trainable_names

    tg = TorchGraph(cand, set(trainable_names(cand, base.proto)))
    feats = choose_features(base.proto, cand, tg.live, max_features=16)
    assert feats == ["a0", "a1", "a2"]  # the residual sums, 8 of the original's 16 channels each
    assert choose_features(base.proto, cand, tg.live, max_features=2) == ["a0", "a2"]
    res = recover(cand, base.proto, CalibrationData({"x": smooth(rng, 16)}, "fit"),
                  FidelityChecker(base.proto, CalibrationData({"x": smooth(rng, 8)}, "s"), "cosine"), steps=30,
                  options=RecoverOptions(threads=1, eval_every_s=1e9))
    assert res.select_after > res.select_before and res.features == feats


class ScriptedScorer:
    """Returns the given select scores in turn and remembers each model it scored."""

    def __init__(self, scores):
        self.scores, self.seen = list(scores), []

    def score(self, model):
        self.seen.append(model)
        return self.scores[min(len(self.seen), len(self.scores)) - 1]


class InterruptingData(CalibrationData):
    """A fit source whose n-th sample() raises KeyboardInterrupt: Ctrl-C arriving mid-training."""

    def __init__(self, arrays, after: int):
        super().__init__(arrays, "fit")
        self.calls, self.after = 0, after

    def sample(self, i):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return super().sample(i)


def _weights(model, names):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n: inits[n] for n in names}


def test_ctrl_c_keeps_the_best_weights_seen_on_the_select_split():
    rng = np.random.default_rng(3)
    fit = smooth(rng, 16)
    base, cand = lossy_candidate(fit)
    scorer = ScriptedScorer([0.6, 0.9, 0.7, 0.8, 0.75, 0.7, 0.7, 0.7])
    data = InterruptingData({"x": fit}, after=1 + 8 * 12)  # the interpreter check, then 12 steps of 8
    res = recover(cand, base.proto, data, scorer, seconds=120, select_before=0.5,
                  options=RecoverOptions(threads=1, eval_every_s=1e-9, batch_size=8))
    assert res.stopped == "interrupted" and res.steps == 12
    assert len(scorer.seen) >= 5 and res.select_after == 0.9 and res.select_before == 0.5
    best = _weights(scorer.seen[1], res.trained)  # the model the scorer gave 0.9
    got = _weights(res.model, res.trained)
    assert all(np.array_equal(best[k], got[k]) for k in res.trained)
    assert any(not np.array_equal(best[k], _weights(scorer.seen[-1], res.trained)[k]) for k in res.trained)
    # no evaluation beat the candidate as it came in: its own weights come back
    res2 = recover(cand, base.proto, InterruptingData({"x": fit}, after=1 + 8 * 3), ScriptedScorer([0.4]),
                   seconds=120, select_before=0.5, options=RecoverOptions(threads=1, eval_every_s=1e-9))
    assert res2.stopped == "interrupted" and res2.select_after == 0.5
    assert all(np.array_equal(v, _weights(cand, res2.trained)[k]) for k, v in _weights(res2.model, res2.trained).items())


def test_time_limit_is_honoured_and_keeps_the_best():
    rng = np.random.default_rng(4)
    fit, sel = smooth(rng, 16), smooth(rng, 8)
    base, cand = lossy_candidate(fit)
    select = FidelityChecker(base.proto, CalibrationData({"x": sel}, "s"), "cosine")
    t0 = time.monotonic()
    res = recover(cand, base.proto, CalibrationData({"x": fit}, "fit"), select, seconds=4.0,
                  options=RecoverOptions(threads=1, eval_every_s=1.0))
    wall = time.monotonic() - t0
    assert res.stopped == "time" and res.steps > 5 and res.evals >= 2
    assert wall <= 4.0 + 0.5, wall
    assert res.select_after == max([res.select_before] + [h["select"] for h in res.history])
    assert select.score(res.model).value == pytest.approx(res.select_after, abs=1e-9)


def test_pick_candidates_puts_the_ones_below_the_threshold_on_the_size_front_first():
    from graphopt.runstore.store import Record

    def rec(i, status, fid, size, lat=None, genes=None):
        return Record(genotype=Genotype(genes or {f"s{i}": 1}), status=status, fidelity=fid, size_bytes=size,
                      latency_ms=lat, id=i)

    base = rec(1, "ok", 1.0, 100, 10.0, genes={})
    recs = [base, rec(2, "infeasible", 0.95, 60), rec(3, "infeasible", 0.90, 50), rec(4, "infeasible", 0.85, 70),
            rec(5, "ok", 0.995, 90, 8.0), rec(6, "ok", 0.996, 95, 12.0), rec(7, "ok", 1.0, 100, 9.0),
            rec(8, "failed", None, None), rec(9, "infeasible", 0.97, 60, genes={"s9": 1, "recover": "from-2"})]
    picked = [r.id for r in pick_candidates(recs, 10, base, min_fidelity=0.99)]
    # 2 and 3 are the (size, fidelity) front below 0.99, closest first; then 5 (faster than the original);
    # then 4; never 6 (slower), 7 (exact), 8 (failed), 9 (already recovered) or the original
    assert picked == [2, 3, 5, 4]
    assert [r.id for r in pick_candidates(recs, 2, base, 0.99)] == [2, 3]


@pytest.mark.slow
def test_run_with_recovery_honours_a_time_budget_and_export_rebuilds_the_recovered(tmp_path):
    """A fake target whose compile takes 0.3 s; --budget 30s with --recover-top 2: the search stops
    to leave half of the budget to recovery, the recovered candidates are measured as new records,
    the whole run ends within a few percent of 30 s, and export rebuilds a recovered candidate."""
    from graphopt import optimize
    from graphopt.registry import TARGETS
    from graphopt.runstore.runs import export_candidate
    from graphopt.targets.ort import OrtTarget

    class Slow(OrtTarget):
        name = "slow_recover"

        def compile(self, model, workdir):
            time.sleep(0.3)
            return super().compile(model, workdir)

    rng = np.random.default_rng(5)
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(residual_model(), path)
    np.savez(data, x=smooth(rng, 48))
    TARGETS.register("slow_recover", Slow)
    try:
        t0 = time.monotonic()
        res = optimize(path, "slow_recover", passes="width,kernel", budget="30s", data=data, min_fidelity=0.997, metric="cosine",
                       out=tmp_path / "o", recover_top=2, target_options={"repeat": 3},
                       pass_options={"finetune_threads": 1, "width_importance": "l1"})
        wall = time.monotonic() - t0
    finally:
        TARGETS.unregister("slow_recover")
    rep = res.report
    assert rep["search"]["stopped_because"] == "budget (time)"
    assert wall <= 30 * 1.03 + 1.0, wall  # the whole call: search, recovery, confirm and outputs
    assert rep["wall_time_s"] >= 30 * 0.6, rep["wall_time_s"]  # the estimates of what follows err on the safe side
    rows = rep["recovery"]
    assert 1 <= len(rows) <= 2 and rows[0]["steps"] > 0 and rows[0]["select_after"] > rows[0]["select_before"], rows
    recovered = [r for r in rows if r.get("candidate_id")]
    assert recovered, rows
    by_id = {r.id: r for r in res.records}
    for r in recovered:
        rec = by_id[r["candidate_id"]]
        parent = by_id[r["parent_id"]]
        assert rec.genotype["recover"] == f"from-{parent.id}" and rec.fidelity > parent.fidelity
        assert r["fidelity_after"] == rec.fidelity and r["fidelity_before"] == parent.fidelity
        assert (tmp_path / "o" / "recovered" / f"from-{parent.id}.npz").is_file()
    # the first picked was below --min-fidelity; recovery lifted it over, so the run may choose it
    rec = by_id[recovered[0]["candidate_id"]]
    out = export_candidate(tmp_path / "o", rec.id, tmp_path / "rec.onnx")
    model = onnx.load(out)
    onnx.checker.check_model(model)
    x = np.load(data)["x"]
    from graphopt.evaluation.data import ArrayData, split_data, stack

    sel = split_data(ArrayData({"x": x}, "d")).select  # the run's own select split
    select = FidelityChecker(onnx.load(path), CalibrationData(stack(sel), "s"), "cosine")
    assert select.score(model).value == pytest.approx(rec.fidelity, abs=1e-9)
    assert "recover: candidate" in __import__("graphopt.cli", fromlist=["summary"]).summary(rep)


def test_ctrl_c_during_recovery_keeps_the_recovered_candidate(tmp_path, monkeypatch):
    from graphopt import optimize
    from graphopt.recovery import recover as recover_mod

    calls = {"n": 0}
    real = recover_mod.augment

    def interrupting(batch, rng):  # Ctrl-C on the 40th training step
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real(batch, rng)

    monkeypatch.setattr(recover_mod, "augment", interrupting)
    rng = np.random.default_rng(6)
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(residual_model(), path)
    np.savez(data, x=smooth(rng, 32))
    res = optimize(path, "ort", passes="width,kernel", strategy="random", budget=6, data=data, min_fidelity=0.999,
                   metric="cosine", out=tmp_path / "o", recover_top=3, recover_time="60s", target_options={"repeat": 3},
                   pass_options={"finetune_threads": 1, "recover_train_size": None})
    rep = res.report
    assert rep["status"] == "interrupted" and res.exit_code == 130
    rows = rep["recovery"]
    assert len(rows) == 1 and rows[0]["stopped"] == "interrupted" and rows[0]["steps"] == 39
    rec = next(r for r in res.records if "recover" in r.genotype)
    parent = next(r for r in res.records if r.id == rows[0]["parent_id"])
    assert rec.fidelity > parent.fidelity and rec.id == rows[0]["candidate_id"]
    assert (tmp_path / "o" / "recovered" / f"from-{parent.id}.npz").is_file()
    onnx.checker.check_model(onnx.load(tmp_path / "o" / "best.onnx"))


def test_recover_options_errors(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(residual_model(), path)
    r = run_cli("run", path, "--target", "ort", "--budget", "20s", "--recover-top", "1", "--recover-time", "30s",
                "--out", tmp_path / "o")
    assert r.returncode == 2 and "--recover-time 30 s: must be shorter than the time --budget (20 s)" in r.stderr
    r = run_cli("run", path, "--target", "ort", "--recover-top", "-1", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--recover-top -1: must be 0 (off) or a positive number" in r.stderr
    r = run_cli("run", path, "--target", "ort", "--recover-top", "1", "--recover-time", "soon", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--recover-time 'soon': expected a time" in r.stderr
    with pytest.raises(UsageError, match="--recover-train 'some'"):
        RecoverOptions(train="some")
    # a recovered genotype whose weights file is gone: one line naming the fix
    base = load_proto(residual_model())
    space = SearchSpace(WidthPrune().sites(base.graph()))
    g = Genotype({space.sites[1].key: 0.5, "recover": "from-3"})
    with pytest.raises(UsageError, match="recovered weights .*from-3.npz not found"):
        materialize(base, space, g, {"width": WidthPrune()},
                    MoveContext(base.proto, {}, {"repair": False, "run_dir": str(tmp_path)}))


def test_exported_recovered_model_runs_in_onnxruntime_like_torch(tmp_path):
    """The weights written back are the ones torch trained: onnxruntime on the recovered model
    agrees with the interpreter on it."""
    from graphopt.recovery.finetune import TorchGraph

    rng = np.random.default_rng(7)
    fit = smooth(rng, 16)
    base, cand = lossy_candidate(fit)
    res = recover(cand, base.proto, CalibrationData({"x": fit}, "fit"),
                  FidelityChecker(base.proto, CalibrationData({"x": smooth(rng, 8)}, "s"), "cosine"), steps=20,
                  options=RecoverOptions(threads=1, eval_every_s=1e9))
    x = smooth(rng, 2)[:, 0]
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(2)])
    with torch.no_grad():
        ref = TorchGraph(res.model)({"x": torch.from_numpy(x)})[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_threads_are_probed_when_not_given_and_restored_after():
    rng = np.random.default_rng(5)
    base, cand = lossy_candidate(smooth(rng, 16))
    fit = CalibrationData({"x": smooth(rng, 16)}, "fit")
    before = torch.get_num_threads()
    res = recover(cand, base.proto, fit, lambda m: 0.0, steps=3, select_before=0.0,
                  options=RecoverOptions(eval_every_s=1e9))  # threads=None: 1 or torch's default, probed
    assert res.threads in {1, before} and res.steps == 3
    assert torch.get_num_threads() == before
    res = recover(cand, base.proto, fit, lambda m: 0.0, steps=1, select_before=0.0,
                  options=RecoverOptions(threads=1, eval_every_s=1e9))
    assert res.threads == 1 and torch.get_num_threads() == before


def test_teacher_features_equal_the_unoptimized_original():
    """The teacher runs with all of onnxruntime's fusions; the feature tensors it returns must be
    the original's (the conv+relu and other fusions keep requested outputs intact)."""
    from graphopt.recovery.recover import _Teacher

    base = residual_model()
    feats = ["e0", "er1", "d1", "a1", "p2"]
    x = smooth(np.random.default_rng(6), 4)[:, 0]
    got = _Teacher(base, feats, threads=1, free_hw=True)({"x": x})
    m = onnx.ModelProto()
    m.CopyFrom(base)
    m.graph.output.extend(onnx.ValueInfoProto(name=f) for f in feats)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = [np.concatenate(p, axis=0) for p in zip(*(sess.run(["logits"] + feats, {"x": x[i:i + 1]})
                                                      for i in range(len(x))))]
    assert len(got) == 1 + len(feats)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))
