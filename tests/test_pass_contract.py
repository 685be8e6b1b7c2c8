"""The contract every registered pass keeps (graphopt/plugin.py, Pass), checked on small models built
in code: sites() and rejections() leave the graph unchanged; apply() at a stale site (its nodes
gone) returns False; exact choices compute what the original computes under onnxruntime; a pass
with approximate choices says how they change outputs (`fidelity`).

A new pass is checked here as soon as it is registered; give it a model in CONTRACT_MODELS where
it has sites. The checks are graphopt.testing.pass_contract's, which a pass in another package
calls from its own tests (check_pass).
"""

from __future__ import annotations

import pytest

from conftest import conv_bn_model, net_model
from graphopt.modelio.ir import load_proto
from graphopt.registry import PASSES
from graphopt.testing import pass_contract as contract
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


def _cases():
    """(pass, model) pairs where the pass has sites."""
    out = []
    for p in PASSES.names():
        for m in CONTRACT_MODELS:
            if PASSES.create(p).sites(_model(m).graph()):
                out.append((p, m))
    return out


CASES = _cases()


@pytest.mark.parametrize("pass_name", PASSES.names())
def test_every_pass_has_a_contract_model(pass_name):
    if not any(p == pass_name for p, _ in CASES):
        pytest.skip(f"{pass_name}: no model in CONTRACT_MODELS has a site of it; add one")


@pytest.mark.parametrize("pass_name,model", CASES)
def test_sites_and_rejections_are_read_only(pass_name, model):
    contract.sites_are_read_only(PASSES.create(pass_name), _model(model))


@pytest.mark.parametrize("pass_name,model", CASES)
def test_a_stale_site_returns_false(pass_name, model):
    contract.stale_sites_return_false(PASSES.create(pass_name), _model(model))


@pytest.mark.parametrize("pass_name,model", CASES)
def test_an_unknown_choice_raises(pass_name, model):
    """apply() refuses a choice it never takes (Pass.check_choice) before it edits anything."""
    contract.unknown_choices_raise(PASSES.create(pass_name), _model(model))


@pytest.mark.parametrize("pass_name,model", CASES)
def test_exact_choices_match_onnxruntime(pass_name, model):
    contract.exact_choices_match_onnxruntime(PASSES.create(pass_name), _model(model))


@pytest.mark.parametrize("pass_name,model", CASES)
def test_approximate_passes_declare_fidelity(pass_name, model):
    contract.declares_fidelity(PASSES.create(pass_name), _model(model))


def test_check_pass_for_a_plugin_package():
    """check_pass, as a pass in another package calls it: a good pass passes; a pass whose sites()
    edits the graph, or whose 'exact' choice changes the outputs, fails naming the check."""
    from graphopt.passes.conv_bn import ConvBnFusion

    contract.check_pass(ConvBnFusion(), conv_bn_model())

    class Meddling(ConvBnFusion):
        name = "meddling"

        def sites(self, graph):
            found = super().sites(graph)
            graph.nodes[0].name = "renamed"
            return found

    with pytest.raises(AssertionError, match="meddling: sites\\(\\) or rejections\\(\\) changed the graph"):
        contract.check_pass(Meddling(), conv_bn_model())

    class Wrong(ConvBnFusion):
        name = "wrong"

        def rewrite(self, graph, m, choice, ctx):
            ok = super().rewrite(graph, m, choice, ctx)
            conv = m.nodes[0]
            conv.inputs[1].values = conv.inputs[1].values * 1.5  # not the same function any more
            return ok

    with pytest.raises(AssertionError, match="wrong: wrong:bn0=.fuse."):
        contract.check_pass(Wrong(), conv_bn_model())
