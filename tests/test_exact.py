"""Exact moves as one gene per pass (graphopt.exact), --search-exact for one gene per site."""

from __future__ import annotations

import numpy as np
import onnx

from conftest import conv_bn_model, run_ort_unoptimized
from graphopt import optimize
from graphopt.driver import materialize
from graphopt.exact import build_space, expand
from graphopt.genotype import Genotype, Site
from graphopt.modelio.ir import load_proto
from graphopt.passes.conv_bn import ConvBnFusion
from graphopt.plugin import MoveContext


def _attention_sites():
    return [Site("attention:/a", "attention", ("/a",), ("keep", "fused", "prune_1"), exact_choice="fused", cost=2.0),
            Site("attention:/b", "attention", ("/b",), ("keep", "fused"), exact_choice="fused", cost=3.0)]


def test_one_gene_per_pass_by_default_and_per_site_with_search_exact():
    loaded = load_proto(conv_bn_model(blocks=3))
    sites = ConvBnFusion().sites(loaded.graph())
    assert len(sites) == 3
    space = build_space({"conv_bn": sites})
    (g,) = space.sites
    assert g.key == "conv_bn:*exact" and g.choices == ("keep", "fuse") and g.exact_choice == "fuse"
    assert g.cost == sum(s.cost for s in sites) and "all 3 conv_bn sites" in g.note
    assert space.exact_genotype() == Genotype({"conv_bn:*exact": "fuse"})
    assert [s.key for s in build_space({"conv_bn": sites}, search_exact=True).sites] == [s.key for s in sites]


def test_a_site_with_approximate_choices_keeps_them_as_its_own_gene():
    space = build_space({"attention": _attention_sites(), "width": [
        Site("width:/c", "width", ("/c",), (1.0, 0.5), cost=1.0)]})
    assert [(s.key, s.choices, s.exact_choice) for s in space.sites] == [
        ("attention:*exact", ("keep", "fused"), "fused"),
        ("attention:/a", ("keep", "prune_1"), None),
        ("width:/c", (1.0, 0.5), None)]
    # the group gene fuses every site without its own gene; a site's own gene overrides it there
    moves = expand(space, Genotype({"attention:*exact": "fused", "attention:/a": "prune_1"}))
    assert [(s.key, c, k) for s, c, k in moves] == [("attention:/b", "fused", "attention:*exact"),
                                                    ("attention:/a", "prune_1", "attention:/a")]
    moves = expand(space, Genotype({"attention:*exact": "fused", "width:/c": 0.5}))
    assert [(s.key, c) for s, c, _ in moves] == [("attention:/a", "fused"), ("attention:/b", "fused"),
                                                 ("width:/c", 0.5)]


def test_the_group_gene_applies_every_fusion_exactly():
    loaded = load_proto(conv_bn_model(blocks=3))
    space = build_space({"conv_bn": ConvBnFusion().sites(loaded.graph())})
    model, applied = materialize(loaded, space, Genotype({"conv_bn:*exact": "fuse"}), {"conv_bn": ConvBnFusion()},
                                 MoveContext(loaded.proto))
    onnx.checker.check_model(model, full_check=True)
    assert applied == {"conv_bn:*exact": "applied"}
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_ort_unoptimized(model, {"x": x})[0],
                               run_ort_unoptimized(loaded.proto, {"x": x})[0], atol=1e-4)


def test_run_searches_one_exact_gene(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=4), p)
    res = optimize(p, "ort", passes="conv_bn", budget=5, out=tmp_path / "o")
    assert res.report["search"]["space"]["sites_per_pass"] == {"conv_bn": 1}
    assert [r.genotype for r in res.records] == [Genotype(), Genotype({"conv_bn:*exact": "fuse"})]
    assert res.report["search"]["stopped_because"] == "search space exhausted"
    res = optimize(p, "ort", passes="conv_bn", budget=5, out=tmp_path / "o2", search_exact=True)
    assert res.report["search"]["space"]["sites_per_pass"] == {"conv_bn": 4}
    assert len(res.records) == 6


def test_resume_with_the_other_space_ignores_candidates_it_cannot_rebuild(tmp_path):
    """A run with --search-exact, then one without on the same --out: the per-site candidates in
    the store are not in the new space, so they are never chosen (nor rebuilt) as the best. Latency
    = node count: the stored per-site "both fused" (7 nodes) ties with the new group gene's graph
    and has the lower id."""
    from test_sensitivity import _node_count_target

    from graphopt.registry import TARGETS

    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=2), p)
    TARGETS.register("node_count", _node_count_target())
    try:
        first = optimize(p, "node_count", passes="conv_bn", budget=3, out=tmp_path / "o", search_exact=True,
                         min_fidelity=0.9)
        assert first.exit_code == 0 and len(first.records) == 4
        second = optimize(p, "node_count", passes="conv_bn", budget=3, out=tmp_path / "o", min_fidelity=0.9)
    finally:
        TARGETS.unregister("node_count")
    assert second.exit_code == 0
    assert second.best.genotype == Genotype({"conv_bn:*exact": "fuse"}) and second.best.latency_ms == 7.0
    # and `graphopt export` rebuilds a candidate of either space from that store
    from conftest import run_cli

    for rec in (first.records[-1], second.best):
        dest = tmp_path / f"c{rec.id}.onnx"
        res = run_cli("export", tmp_path / "o", "--candidate", str(rec.id), "-o", dest)
        assert res.returncode == 0, res.stderr
        fused = 2 if "conv_bn:*exact" in rec.genotype else len(rec.genotype)
        assert sum(n.op_type == "BatchNormalization" for n in onnx.load(dest).graph.node) == 2 - fused
