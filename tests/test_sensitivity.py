"""The sensitivity strategy: single moves measured, then combined greedily by latency gained per
quality lost (re-measured); int8 mode reverts the most sensitive layers to float."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import float_init, make_model
from graphopt import optimize
from graphopt.genotype import Genotype, SearchSpace, Site
from graphopt.plugin import Artifact, LatencyStats, Measurement, Result, Target
from graphopt.registry import STRATEGIES, TARGETS
from graphopt.search.sensitivity import SensitivitySearch

BASE_MS = 100.0
MIN_FID = 0.97
# site -> (latency gain in ms, quality loss) when applied alone
SINGLE = {"conv_bn:*exact": (0.5, 0.0), "width:/a": (5.0, 0.001), "width:/b": (3.0, 0.0001),
          "width:/c": (10.0, 0.02), "width:/d": (1.0, 0.025), "width:/e": (-1.0, 0.0), "width:/f": (2.0, 0.004)}


def fake_space() -> SearchSpace:
    sites = [Site("conv_bn:*exact", "conv_bn", ("/x",), ("keep", "fuse"), exact_choice="fuse", cost=1.0)]
    sites += [Site(k, "width", (k[6:],), (1.0, 0.5), cost=10.0 * i) for i, k in enumerate(SINGLE)
              if k != "conv_bn:*exact"]
    return SearchSpace(sites)


def fake_measure(g: Genotype) -> Result:
    """Latency and fidelity of a genotype on a fake target with known costs. /f shares its
    kernel with /c: together they gain only /c's 10 ms (the sum of singles is not the truth)."""
    gains = {k: SINGLE[k][0] for k in g}
    if "width:/c" in g and "width:/f" in g:
        gains["width:/f"] = 0.0
    lat = BASE_MS - sum(gains.values())
    fid = 1.0 - sum(SINGLE[k][1] for k in g)
    score = lat if fid >= MIN_FID else math.inf
    return Result(g, score, "ok" if fid >= MIN_FID else "infeasible", lat if fid >= MIN_FID else None, fid,
                  BASE_MS, MIN_FID, 1.0)


def drive(strategy, steps: int = 100) -> list[Genotype]:
    asked = []
    for _ in range(steps):
        out = strategy.ask(1)
        if not out:
            break
        asked.append(out[0])
        strategy.tell_results([fake_measure(out[0])])
    return asked


def test_singles_first_then_greedy_by_gain_per_loss():
    s = SensitivitySearch(fake_space(), then="none")
    asked = drive(s)
    singles = [Genotype({k: c}) for k, c in [("width:/f", 0.5), ("width:/e", 0.5), ("width:/d", 0.5),
                                             ("width:/c", 0.5), ("width:/b", 0.5), ("width:/a", 0.5),
                                             ("conv_bn:*exact", "fuse")]]
    assert asked[:7] == singles  # largest sites (cost) first
    # exact (loss 0) first, then /b 30000 ms per unit lost, /a 5000, /c 500, /f 500 (less gain), /d 40;
    # /e is slower than the original: not a candidate
    order = [next(iter(g)) for g in s.order]
    assert order == ["conv_bn:*exact", "width:/b", "width:/a", "width:/c", "width:/f", "width:/d"]
    # the greedy phase re-measures each combination; the first one is the single already measured
    w = {"conv_bn:*exact": "fuse"}
    expected = [Genotype({**w, "width:/b": 0.5}),
                Genotype({**w, "width:/b": 0.5, "width:/a": 0.5}),
                Genotype({**w, "width:/b": 0.5, "width:/a": 0.5, "width:/c": 0.5}),
                Genotype({**w, "width:/b": 0.5, "width:/a": 0.5, "width:/c": 0.5, "width:/f": 0.5}),  # no faster
                Genotype({**w, "width:/b": 0.5, "width:/a": 0.5, "width:/c": 0.5, "width:/d": 0.5})]  # infeasible
    assert asked[7:] == expected
    assert [o for _, _, o in s.log] == ["kept"] * 4 + ["dropped", "dropped (infeasible)"]
    assert s.current == expected[2]
    assert fake_measure(s.current).latency_ms == BASE_MS - 0.5 - 3 - 5 - 10


def test_hands_over_to_evolution_seeded_with_the_greedy_result():
    s = SensitivitySearch(fake_space(), then="evolutionary", evolutionary_population=4)
    greedy = drive(SensitivitySearch(fake_space(), then="none"))
    asked = drive(s, steps=len(greedy) + 1)  # singles + combinations, then the first evolutionary proposal
    assert s._evo is not None and asked[:-1] == greedy
    assert s.current in {g for g, _ in s._evo.population}  # the greedy result is in its population
    asked += drive(s, steps=10)
    assert len(asked) == len(greedy) + 11 == len(set(asked))  # nothing proposed twice


def test_plain_tell_still_works_and_strategy_is_registered():
    assert STRATEGIES.get("sensitivity") is SensitivitySearch
    s = SensitivitySearch(fake_space(), then="none")
    g = s.ask(1)[0]
    s.tell([(g, 90.0)])  # a caller without tell_results
    assert s.results[g].latency_ms == 90.0
    with pytest.raises(ValueError, match="mode='bogus'"):
        SensitivitySearch(fake_space(), mode="bogus")
    with pytest.raises(ValueError, match="needs the int8 pass"):
        SensitivitySearch(fake_space(), mode="int8")


# -------------------------------------------------------------------------------- end to end
def _node_count_target(int8: bool = False):
    """Latency = node count; int8: 100 - number of DequantizeLinear nodes (int8 pays)."""
    class NodeCount(Target):
        name = "node_count"

        def compile(self, model, workdir):
            n = 100 - sum(x.op_type == "DequantizeLinear" for x in model.graph.node) if int8 else len(model.graph.node)
            return Artifact(target=self.name, handle=n)

        def measure(self, artifact, inputs):
            return Measurement(latency=LatencyStats.from_samples([float(artifact.handle)]), method="estimated",
                               tuned=None)

    return NodeCount


def fragile_mlp(seed: int = 0) -> onnx.ModelProto:
    """x -> /l1 -> /l2 -> Relu -> /l3. The data's channel 0 of x is 1000x larger than the others
    (fragile_data) and /l1 reads it with a tiny weight: quantizing /l1's input to one int8 range
    loses every other channel. /l2 and /l3 see ordinary ranges."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.25, (16, 16))
    w1[0, :] *= 1e-3
    w2 = rng.normal(0, 0.25, (16, 16))
    w3 = rng.normal(0, 0.25, (16, 8))
    mk = helper.make_node
    nodes = [mk("MatMul", ["x", "w1"], ["h1"], name="/l1"), mk("MatMul", ["h1", "w2"], ["h2"], name="/l2"),
             mk("Relu", ["h2"], ["h2r"], name="/relu"), mk("MatMul", ["h2r", "w3"], ["y"], name="/l3")]
    return make_model(nodes, {"x": [4, 16]}, ["y"], [float_init("w1", w1), float_init("w2", w2), float_init("w3", w3)])


def fragile_data(samples: int = 16) -> np.ndarray:
    x = np.random.default_rng(1).normal(0, 1, (samples, 4, 16))
    x[..., 0] *= 1000.0
    return x.astype(np.float32)


def test_int8_accuracy_control_reverts_the_fragile_layer(tmp_path):
    p, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(fragile_mlp(), p)
    np.savez(data, x=fragile_data())
    TARGETS.register("node_count", _node_count_target(int8=True))
    try:
        res = optimize(p, "node_count", passes="int8", strategy="sensitivity", budget=12, data=data, metric="cosine",
                       min_fidelity=0.99, out=tmp_path / "o", strategy_options={"mode": "int8", "then": "none"})
    finally:
        TARGETS.unregister("node_count")
    by_g = {r.genotype: r for r in res.records}
    all8 = Genotype({"int8:/l1": "int8", "int8:/l2": "int8", "int8:/l3": "int8"})
    assert by_g[all8].status == "infeasible"  # everything int8: /l1's input range is ruined
    # ranked by measuring each layer back in float: /l2 recovers the most
    without = {k: by_g[Genotype({x: v for x, v in all8.items() if x != k})].fidelity for k in all8}
    assert max(without, key=without.get) == "int8:/l1", without
    chosen = Genotype({"int8:/l2": "int8", "int8:/l3": "int8"})
    assert by_g[chosen].status == "ok" and by_g[chosen].fidelity >= 0.99
    assert res.best.genotype == chosen
    # 1 (all) + 3 (ranking) candidates; the first revert is a ranking candidate, measured already
    assert len(res.records) == 1 + 1 + 3


def test_moves_mode_end_to_end_on_a_fake_target(tmp_path):
    """Through the driver: latency (node count) and fidelity reach the strategy apart."""
    from test_depth import resnet

    p = tmp_path / "m.onnx"
    onnx.save(resnet(zero_branch=True), p)
    TARGETS.register("node_count", _node_count_target())
    try:
        res = optimize(p, "node_count", passes="conv_bn,depth", strategy="sensitivity", budget=10,
                       min_fidelity=0.999, out=tmp_path / "o", strategy_options={"then": "none"})
    finally:
        TARGETS.unregister("node_count")
    gs = [r.genotype for r in res.records]
    both = Genotype({"conv_bn:*exact": "fuse", "depth:/b1/add": "remove"})
    assert gs[1:3] == [Genotype({"depth:/b1/add": "remove"}), Genotype({"conv_bn:*exact": "fuse"})]
    assert gs[3:] == [both]  # the combination, measured again
    # the only BN is inside the removed block: the combination is no faster than removal alone
    assert res.best.genotype == Genotype({"depth:/b1/add": "remove"})
    assert res.report["search"]["stopped_because"] == "search space exhausted"


def test_evolutionary_can_start_from_given_genotypes():
    from graphopt.search.evolutionary import EvolutionarySearch

    start = {"width:/a": 0.5, "width:/c": 0.5}
    evo = EvolutionarySearch(fake_space(), seed=3, start=[start, '{"width:/b": 0.5}'])
    assert evo.ask(2) == [Genotype(start), Genotype({"width:/b": 0.5})]
    with pytest.raises(ValueError, match="start genotype .*unknown site 'width:/zz'"):
        EvolutionarySearch(fake_space(), start=[{"width:/zz": 0.5}])


def test_min_gain_is_a_noise_margin():
    """min_gain=0.04: /b (3 ms of 100) and /f (2 ms) no longer count as faster, alone or combined."""
    s = SensitivitySearch(fake_space(), then="none", min_gain=0.04)
    drive(s)
    assert [next(iter(g)) for g in s.order] == ["width:/a", "width:/c"]
    assert s.current == Genotype({"width:/a": 0.5, "width:/c": 0.5})
