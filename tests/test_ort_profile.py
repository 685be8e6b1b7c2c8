"""Per-layer latency: onnxruntime's profiler through targets/ort.py, and its table in report.html."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from conftest import conv_bn_model
from graphopt.targets.ort import OrtTarget, profile_layers
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import UsageError
from graphopt.reporting.html_report import LAYERS_SHOWN, best_layers, render_html

X = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}


def big_and_small_model() -> onnx.ModelProto:
    """x -> big 3x3 Conv (64->64 at 64x64, ~300 MFLOP) -> Relu -> Flatten (a copy-free reshape)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="big_conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["y"], name="flat")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64 * 64 * 64])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_profile_layers_conv_bn_model():
    t = OrtTarget(threads=1)
    res = t.profile(conv_bn_model(), X, runs=4)
    layers = res["layers"]
    assert res["layers_count"] == len(layers) >= 3
    assert [x["ms"] for x in layers] == sorted((x["ms"] for x in layers), reverse=True)
    assert all(x["ms"] > 0 for x in layers)
    assert res["layers_total_ms"] == pytest.approx(sum(x["ms"] for x in layers))
    assert "mean of 4 runs" in res["layers_how"] and "enable_profiling" in res["layers_how"]
    by_nodes = {frozenset(x["nodes"]): x for x in layers}
    # ORT fuses Conv + BatchNormalization + Relu into one kernel: one layer stands for all three
    assert by_nodes[frozenset({"conv0", "bn0", "relu0"})]["op"] == "Conv"
    assert by_nodes[frozenset({"conv1", "bn1", "relu1"})]["op"] == "Conv"
    assert by_nodes[frozenset({"fc"})]["op"] == "Gemm"
    json.dumps(res)  # goes into Measurement.extra and the run store as JSON


def test_profile_finds_the_expensive_layer():
    m = big_and_small_model()
    x = {"x": np.random.default_rng(1).standard_normal((1, 64, 64, 64)).astype(np.float32)}
    res = profile_layers(m, x, OrtTarget(threads=1)._options(), warmup=1, runs=3)
    top = res["layers"][0]
    assert "big_conv" in top["nodes"] and top["op"] == "Conv"
    assert top["ms"] > 0.5 * res["layers_total_ms"]  # ~300 MFLOP against a reshape


def test_measure_with_profile_option():
    m = conv_bn_model()
    plain = OrtTarget(threads=1, repeat=2, number=2)
    assert "layers" not in plain.measure(plain.compile(m, None), X).extra
    prof = OrtTarget(threads=1, repeat=2, number=2, profile=1)
    meas = prof.measure(prof.compile(m, None), X)
    layers = meas.extra["layers"]
    assert layers and {"node", "op", "ms", "nodes"} <= set(layers[0])
    assert meas.extra["layers_count"] == len(layers)
    assert meas.method == "measured" and meas.latency.median_ms > 0
    assert json.loads(json.dumps(meas.to_dict()))["extra"]["layers"] == layers
    with pytest.raises(UsageError, match=r"profile='maybe': expected 1 \(per-layer latency\) or 0"):
        OrtTarget(profile="maybe")


@pytest.mark.parametrize("flag,on", [("1", True), (1, True), (True, True), ("true", True), ("Yes", True), (" on ", True),
                                     ("0", False), (0, False), (False, False), ("false", False), ("no", False),
                                     ("off", False), ("", False)])
def test_profile_flag_spellings_turn_profiling_on_or_off(flag, on):
    """Each accepted spelling of --target-opt profile=... really turns per-layer profiling on or off."""
    t = OrtTarget(threads=1, warmup=0, repeat=1, number=1, profile=flag)
    extra = t.measure(t.compile(conv_bn_model(), None), X).extra
    assert ("layers" in extra) is on, (flag, sorted(extra))
    if on:
        assert extra["layers"] and extra["layers_count"] == len(extra["layers"])


# ------------------------------------------------------------------------------- report.html
def _report(best: dict) -> dict:
    return {"status": "ok", "model": {"path": "m.onnx"}, "target": {"name": "ort"}, "best": best,
            "baseline": {"candidate_id": 1, "status": "ok", "median_ms": 2.0}}


def _layers_rows(page: str) -> list[list[str]]:
    root = ET.fromstring(page.split("\n", 1)[1])  # the page is well-formed XML after the doctype
    table = next(t for t in root.iter("table") if t.get("id") == "layers")
    return [["".join(td.itertext()) for td in tr.iter("td")] for tr in table.iter("tr") if tr.find("td") is not None]


def test_html_layers_table_top20_and_moved():
    layers = [{"node": f"L{i}", "op": "Conv", "ms": 0.1 * (i + 1), "nodes": [f"conv{i}", f"bn{i}"]} for i in range(30)]
    layers.append({"node": "conv5/depthwise_nchwc", "op": "Conv", "ms": 9.0, "nodes": ["conv5/depthwise"]})
    best = {"candidate_id": 3, "moves": [{"site": "conv_bn:bn29", "pass": "conv_bn", "choice": "fuse",
                                          "nodes": ["conv29", "bn29"]},
                                         {"site": "depthwise:conv5", "pass": "depthwise", "choice": "split",
                                          "nodes": ["conv5"]}],
            "notes": {"layers": layers, "layers_total_ms": 55.5, "layers_count": 31,
                      "layers_how": "onnxruntime <b>profiler</b>"}}
    page = render_html(_report(best), [], set())
    rows = _layers_rows(page)
    assert len(rows) == LAYERS_SHOWN
    assert rows[0][1] == "conv5/depthwise_nchwc" and rows[0][-1] == "yes"  # a node the depthwise move made
    assert rows[1][1] == "L29" and rows[1][-1] == "yes" and rows[1][4] == f"{100 * 3.0 / 55.5:.1f}%"
    assert rows[2][1] == "L28" and rows[2][-1] == "no"
    assert sum(r[-1] == "yes" for r in rows) == 2
    assert "The 20 slowest of 31 layers" in page and "onnxruntime &lt;b&gt;profiler&lt;/b&gt;" in page


def test_html_without_layers_has_no_table():
    page = render_html(_report({"candidate_id": 1, "moves": [], "notes": {}}), [], set())
    assert 'id="layers"' not in page and "Per-layer latency" not in page
    assert best_layers({"layers": [{"node": "a", "ms": 1.0}]})[0] == [{"node": "a", "ms": 1.0}]


def test_run_with_profile_reports_layers(tmp_path):
    from graphopt import optimize

    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=2), model)
    res = optimize(model, "ort", passes="conv_bn", budget=3, out=tmp_path / "o",
                   target_options={"threads": 1, "profile": 1, "repeat": 2, "number": 2})
    assert res.exit_code == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    layers, facts = best_layers(report["best"])
    assert layers and facts["layers_count"] == len(layers)
    assert any({"conv0", "relu0"} <= set(x["nodes"]) for x in layers)
    page = (tmp_path / "o" / "report.html").read_text()
    rows = _layers_rows(page)
    assert len(rows) == min(LAYERS_SHOWN, len(layers))
    moved = {n for m in report["best"]["moves"] for n in m["nodes"]}
    want = ["yes" if set(x["nodes"]) & moved else "no" for x in layers[:LAYERS_SHOWN]]
    assert [r[-1] for r in rows] == want
