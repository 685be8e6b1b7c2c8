"""The contract every pass keeps (graphopt/plugin.py, Pass), as functions a test can call.

graphopt's own tests (tests/test_pass_contract.py) run each check on every registered pass; a pass
in another package runs them all from its own tests on a small model where it has sites:

    from graphopt.testing.pass_contract import check_pass

    def test_my_pass_keeps_the_contract():
        check_pass(MulOneFold(), my_model())   # an onnx.ModelProto; raises AssertionError naming the check

The checks: sites() and rejections() leave the graph unchanged; apply() at a stale site (its nodes
gone) returns False; an unknown choice raises ValueError before anything is edited; exact choices
compute what the original computes under onnxruntime (every choice when `fidelity = "exact"`); a
pass with approximate choices says how they change outputs (`fidelity`).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def graph_bytes(graph: Any) -> bytes:
    import onnx_graphsurgeon as gs

    return gs.export_onnx(graph.copy(), do_type_check=False).SerializeToString()


def random_feeds(loaded: Any, seed: int = 123) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.normal(0, 1, i.shape).astype(i.dtype) for i in loaded.inputs}


def move_context(loaded: Any, samples: int = 4, seed: int = 7) -> Any:
    """A MoveContext with a few calibration samples near one random input (least-squares repair, int8)."""
    from graphopt.plugin import MoveContext

    feeds = random_feeds(loaded, seed=seed)
    rng = np.random.default_rng(1)
    calib = {k: np.repeat(v[None], samples, axis=0) + rng.normal(0, 0.1, (samples,) + v.shape).astype(v.dtype)
             for k, v in feeds.items()}
    return MoveContext(base_model=loaded.proto, calibration=calib)


def run_unoptimized(model: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime with its graph optimizations off: the model as written."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def sites_are_read_only(p: Any, loaded: Any) -> None:
    graph = loaded.graph()
    before = graph_bytes(graph)
    p.sites(graph)
    p.rejections(graph)
    assert graph_bytes(graph) == before, f"{p.name}: sites() or rejections() changed the graph"


def stale_sites_return_false(p: Any, loaded: Any) -> None:
    for site in p.sites(loaded.graph()):
        if site.key.endswith(":*") or not site.nodes:
            continue  # a whole-model site (int8:*) or one on the graph's inputs (trim_padding) has no nodes to lose
        graph = loaded.graph()
        for n in [n for n in graph.nodes if n.name in site.nodes]:  # an earlier move removed them
            graph.nodes.remove(n)
        assert p.apply(graph, site, site.choices[-1], move_context(loaded)) is False, \
            f"{p.name}: apply() at {site.key}, whose nodes are gone, did not return False"


def unknown_choices_raise(p: Any, loaded: Any) -> None:
    site = p.sites(loaded.graph())[0]
    graph = loaded.graph()
    before = graph_bytes(graph)
    try:
        p.apply(graph, site, "no_such_choice", move_context(loaded))
    except ValueError as e:
        assert f"{p.name}: " in str(e) and "choice 'no_such_choice' for site" in str(e), str(e)
    else:
        raise AssertionError(f"{p.name}: apply() took the unknown choice 'no_such_choice' (Pass.check_choice)")
    assert graph_bytes(graph) == before, f"{p.name}: apply() edited the graph before refusing a choice"


def exact_choices_match_onnxruntime(p: Any, loaded: Any, rtol: float = 1e-4, atol: float = 1e-4) -> int:
    """The exact choices checked (every choice when the pass says fidelity = "exact")."""
    import onnx

    from graphopt.modelio.ir import export_graph

    exact_everywhere = getattr(p, "fidelity", "") == "exact"
    feeds = random_feeds(loaded)
    ref = run_unoptimized(loaded.proto, feeds)
    checked = 0
    for site in p.sites(loaded.graph()):
        for choice in site.choices[1:] if exact_everywhere else [site.exact_choice] * (site.exact_choice is not None):
            graph = loaded.graph()
            assert p.apply(graph, site, choice, move_context(loaded)) is True, f"{p.name}: {site.key}={choice!r} " \
                "did not apply on the graph it was found on"
            model = export_graph(graph)
            onnx.checker.check_model(model)
            for r, g in zip(ref, run_unoptimized(model, feeds)):
                np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, err_msg=f"{p.name}: {site.key}={choice!r}")
            checked += 1
    assert checked or not exact_everywhere, f"{p.name} says fidelity='exact' but has no choice to check"
    return checked


def declares_fidelity(p: Any, loaded: Any) -> None:
    sites = p.sites(loaded.graph())
    approximate = any(c != s.exact_choice for s in sites for c in s.choices[1:])
    fidelity = getattr(p, "fidelity", "")
    if approximate:
        assert fidelity and fidelity != "exact", f"{p.name} has approximate choices: set `fidelity` to say how"
    else:
        assert fidelity, f"{p.name}: set fidelity = 'exact'"


def check_pass(p: Any, model: Any) -> None:
    """Every check above, on an onnx.ModelProto where the pass `p` (an instance) has sites."""
    from graphopt.modelio.ir import load_proto

    loaded = load_proto(model)
    assert p.sites(loaded.graph()), f"{p.name}: no site on this model; check it on one where it has sites"
    for check in (sites_are_read_only, stale_sites_return_false, unknown_choices_raise,
                  exact_choices_match_onnxruntime, declares_fidelity):
        check(p, loaded)
