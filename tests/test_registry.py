"""Registries: built-ins by name, third-party plugins through entry points (outside this tree)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, conv_bn_model
from graphopt.errors import UsageError
from graphopt.registry import PASSES, STRATEGIES, TARGETS, parse_names

PLUGIN_SRC = '''
"""A third-party plugin package: one pass and one target, known to graphopt only by entry points."""
import time
from graphopt.genotype import Site
from graphopt.plugin import Artifact, LatencyStats, Measurement, Pass, Target
from graphopt.modelio.ir import node_by_name


class DropIdentity(Pass):
    name = "drop_identity"
    description = "removes Identity nodes (a plugin pass)"

    def sites(self, graph):
        return [Site(f"drop_identity:{n.name}", "drop_identity", (n.name,), ("keep", "drop"), exact_choice="drop")
                for n in graph.nodes if n.op == "Identity"]

    def apply(self, graph, site, choice, ctx):
        node = node_by_name(graph, site.nodes[0])
        if node is None:
            return False
        src, dst = node.inputs[0], node.outputs[0]
        for consumer in list(dst.outputs):
            consumer.inputs[consumer.inputs.index(dst)] = src
        node.outputs.clear()
        return True


class CountingTarget(Target):
    """Latency = number of nodes (an estimate: it says so)."""
    name = "node_count"
    description = "estimates latency as the node count (a plugin target)"

    def compile(self, model, workdir):
        return Artifact(target=self.name, handle=len(model.graph.node))

    def measure(self, artifact, inputs):
        return Measurement(latency=LatencyStats.from_samples([float(artifact.handle)]), method="estimated",
                           tuned=None)
'''


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict:
    site = tmp_path / "site"
    pkg = site / "ext_graphopt_plugins"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(PLUGIN_SRC)
    dist = site / "ext_graphopt_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ext-graphopt-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [graphopt.passes]
        drop_identity = ext_graphopt_plugins:DropIdentity

        [graphopt.targets]
        node_count = ext_graphopt_plugins:CountingTarget
        """))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "graphopt", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_builtin_names():
    assert "conv_bn" in PASSES.names()
    assert {"ort", "x86"} <= set(TARGETS.names())
    assert "random" in STRATEGIES.names()
    assert parse_names(PASSES, "conv_bn") == ["conv_bn"]
    with pytest.raises(UsageError, match="valid pass names: .*conv_bn"):
        parse_names(PASSES, "conv_bn,nope")


def test_entry_point_plugins_are_listed_and_run(plugin_env, tmp_path):
    res = _cli(plugin_env, "list", "passes")
    assert res.returncode == 0, res.stderr
    assert "drop_identity  removes Identity nodes (a plugin pass)" in res.stdout
    assert "conv_bn" in res.stdout
    res = _cli(plugin_env, "list", "targets")
    assert "node_count" in res.stdout and "ort" in res.stdout

    # a model with an Identity after each BN: the plugin pass removes them, the plugin target ranks by node count
    import onnx
    from onnx import helper

    m = conv_bn_model()
    g = m.graph
    for i, node in enumerate(list(g.node)):
        if node.op_type == "BatchNormalization":
            out = node.output[0]
            node.output[0] = out + "_pre"
            g.node.insert(list(g.node).index(node) + 1,
                          helper.make_node("Identity", [out + "_pre"], [out], name=f"id{i}"))
    p = tmp_path / "ids.onnx"
    onnx.save(m, p)
    res = _cli(plugin_env, "run", p, "--target", "node_count", "--passes", "drop_identity,conv_bn", "--search-exact", "--budget", "30",
               "--out", tmp_path / "o", "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["latency_method"] == "estimated"
    assert rep["search"]["space"]["sites_per_pass"] == {"drop_identity": 2, "conv_bn": 2}
    # best: both Identities dropped and both BNs fused: 11 nodes - 4 = 7
    assert rep["best"]["median_ms"] == 7.0
    assert {m["pass"] for m in rep["best"]["moves"]} == {"drop_identity", "conv_bn"}
    best = onnx.load(tmp_path / "o" / "best.onnx")
    assert not any(n.op_type in ("Identity", "BatchNormalization") for n in best.graph.node)


def test_broken_plugin_does_not_hide_others(tmp_path):
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[graphopt.passes]\nbroken = no_such_module:Nope\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    res = _cli(env, "list", "passes")
    assert res.returncode == 0
    assert re.search(r"^broken +\(failed to load: .*no_such_module", res.stdout, re.M) and "conv_bn" in res.stdout
    # a real model, so the exit 2 can only come from the plugin: one line naming it and why it failed
    model = tmp_path / "m.onnx"
    import onnx

    onnx.save(conv_bn_model(), model)
    res = _cli(env, "run", model, "--target", "ort", "--passes", "broken", "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr
    assert "pass 'broken' (entry point no_such_module:Nope) failed to load: No module named 'no_such_module'" \
        in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    res = _cli(env, "run", model, "--target", "ort", "--passes", "conv_bn", "--budget", "2", "--out", tmp_path / "o2")
    assert res.returncode == 0, res.stderr  # the broken plugin does not stop runs that do not use it


def test_a_plugin_class_that_does_not_fit_its_entry_point_is_refused(plugin_env, tmp_path):
    """An entry point whose name differs from its class's `name` (the run failed every candidate with
    KeyError and exited 0), or that points at something other than a Pass: exit 2, saying what to fix."""
    site = Path(plugin_env["PYTHONPATH"].split(os.pathsep)[0])
    (site / "ext_graphopt_plugins-0.1.dist-info" / "entry_points.txt").write_text(textwrap.dedent("""\
        [graphopt.passes]
        dropid = ext_graphopt_plugins:DropIdentity
        notapass = ext_graphopt_plugins:CountingTarget
        """))
    import onnx

    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), model)
    res = _cli(plugin_env, "run", model, "--target", "ort", "--passes", "dropid", "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr
    assert ("pass 'dropid' (entry point ext_graphopt_plugins:DropIdentity): its class DropIdentity says name = "
            "'drop_identity'; the entry point's name and the class's `name` must be the same ('dropid')") in res.stderr
    res = _cli(plugin_env, "run", model, "--target", "ort", "--passes", "notapass", "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr
    assert "not a subclass of graphopt.plugin.Pass: point the entry point at your Pass class" in res.stderr
    assert "Traceback" not in res.stderr
