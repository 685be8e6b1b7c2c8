"""The contract every registered pass keeps (graphopt/plugin.py, Pass), checked on small models built
in code: sites() and rejections() leave the graph unchanged; apply() at a stale site (its nodes
gone) returns False; exact choices compute what the original computes under onnxruntime; a pass
with approximate choices says how they change outputs (`fidelity`).

A new pass is checked here as soon as it is registered; give it a model in CONTRACT_MODELS where
it has sites.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import net_model, random_feeds, run_ort_unoptimized
from graphopt.modelio.ir import export_graph, load_proto
from graphopt.plugin import MoveContext
from graphopt.registry import PASSES
from test_attention import classic_model
from test_conv_mul import conv_mul
from test_depth import encoder
from test_trim_padding import tiny_encoder

CONTRACT_MODELS = {
    "net": net_model,  # conv_bn, depth, depthwise, int8, kernel, width
    "conv_mul": lambda: conv_mul((6, 1, 1)),
    "attention": classic_model,
    "encoder": encoder,  # depth and width over transformer layers
    "padded_encoder": tiny_encoder,  # trim_padding
}

_loaded: dict = {}


def _model(name):
    if name not in _loaded:
        _loaded[name] = load_proto(CONTRACT_MODELS[name]())
    return _loaded[name]


def _ctx(loaded) -> MoveContext:
    feeds = random_feeds(loaded, seed=7)
    calib = {k: np.repeat(v[None], 4, axis=0) + np.random.default_rng(1).normal(0, 0.1, (4,) + v.shape).astype(v.dtype)
             for k, v in feeds.items()}
    return MoveContext(base_model=loaded.proto, calibration=calib)


def _cases():
    """(pass, model) pairs where the pass has sites."""
    out = []
    for p in PASSES.names():
        for m in CONTRACT_MODELS:
            if PASSES.create(p).sites(_model(m).graph()):
                out.append((p, m))
    return out


CASES = _cases()


def _bytes(graph) -> bytes:
    import onnx_graphsurgeon as gs

    return gs.export_onnx(graph.copy(), do_type_check=False).SerializeToString()


@pytest.mark.parametrize("pass_name", PASSES.names())
def test_every_pass_has_a_contract_model(pass_name):
    if not any(p == pass_name for p, _ in CASES):
        pytest.skip(f"{pass_name}: no model in CONTRACT_MODELS has a site of it; add one")


@pytest.mark.parametrize("pass_name,model", CASES)
def test_sites_and_rejections_are_read_only(pass_name, model):
    graph = _model(model).graph()
    before = _bytes(graph)
    p = PASSES.create(pass_name)
    p.sites(graph)
    p.rejections(graph)
    assert _bytes(graph) == before


@pytest.mark.parametrize("pass_name,model", CASES)
def test_a_stale_site_returns_false(pass_name, model):
    loaded = _model(model)
    p = PASSES.create(pass_name)
    for site in p.sites(loaded.graph()):
        if site.key.endswith(":*") or not site.nodes:
            continue  # a whole-model site (int8:*) or one on the graph's inputs (trim_padding) has no nodes to lose
        graph = loaded.graph()
        for n in [n for n in graph.nodes if n.name in site.nodes]:  # an earlier move removed them
            graph.nodes.remove(n)
        assert p.apply(graph, site, site.choices[-1], _ctx(loaded)) is False, site.key


@pytest.mark.parametrize("pass_name,model", CASES)
def test_an_unknown_choice_raises(pass_name, model):
    """apply() refuses a choice it never takes (Pass.check_choice) before it edits anything."""
    loaded = _model(model)
    p = PASSES.create(pass_name)
    site = p.sites(loaded.graph())[0]
    graph = loaded.graph()
    before = _bytes(graph)
    with pytest.raises(ValueError, match=f"{pass_name}: .*choice 'no_such_choice' for site"):
        p.apply(graph, site, "no_such_choice", _ctx(loaded))
    assert _bytes(graph) == before


@pytest.mark.parametrize("pass_name,model", CASES)
def test_exact_choices_match_onnxruntime(pass_name, model):
    loaded = _model(model)
    p = PASSES.create(pass_name)
    sites = p.sites(loaded.graph())
    exact_everywhere = getattr(p, "fidelity", "") == "exact"
    feeds = random_feeds(loaded)
    ref = run_ort_unoptimized(loaded.proto, feeds)
    checked = 0
    for site in sites:
        for choice in site.choices[1:] if exact_everywhere else [site.exact_choice] * (site.exact_choice is not None):
            graph = loaded.graph()
            assert p.apply(graph, site, choice, _ctx(loaded)) is True, (site.key, choice)
            model_out = export_graph(graph)
            onnx.checker.check_model(model_out)
            got = run_ort_unoptimized(model_out, feeds)
            for r, g in zip(ref, got):
                np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=f"{site.key}={choice!r}")
            checked += 1
    if exact_everywhere:
        assert checked, f"{pass_name} says fidelity='exact' but has no choice to check"


@pytest.mark.parametrize("pass_name,model", CASES)
def test_approximate_passes_declare_fidelity(pass_name, model):
    p = PASSES.create(pass_name)
    sites = p.sites(_model(model).graph())
    approximate = any(c != s.exact_choice for s in sites for c in s.choices[1:])
    fidelity = getattr(p, "fidelity", "")
    if approximate:
        assert fidelity and fidelity != "exact", f"{pass_name} has approximate choices: set `fidelity` to say how"
    else:
        assert fidelity, f"{pass_name}: set fidelity = 'exact'"
