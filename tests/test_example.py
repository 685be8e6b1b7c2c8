"""End to end on the bundled example (EfficientNet-Lite0, real calibration images)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import EXAMPLE_CALIB, file_sha, run_cli


def _eval_logits(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"input": xi})[0] for xi in x])


@pytest.mark.slow
@pytest.mark.parametrize("target,budget", [("ort", "4"), pytest.param("x86", "1", marks=pytest.mark.tvm)])
def test_example_conv_bn(example_model, tmp_path, target, budget):
    sha = file_sha(example_model)
    out = tmp_path / target
    res = run_cli("run", example_model, "--target", target, "--passes", "conv_bn", "--search-exact", "--budget", budget,
                  "--data", EXAMPLE_CALIB, "--out", out, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(res.stdout)
    assert file_sha(example_model) == sha
    # exact moves only: no fit split; the 16 samples are split into select (the gate) and held-out
    assert rep["status"] == "ok" and rep["fidelity"]["synthetic"] is False and rep["fidelity"]["samples"] == 8
    assert rep["data"]["sizes"]["held_out"] == 8 and rep["held_out"]["original"] == 1.0
    assert rep["best"]["fidelity"] >= 0.9999
    assert rep["search"]["space"]["sites_per_pass"] == {"conv_bn": 49}
    assert rep["latency_method"] == "measured"
    if target == "x86":
        assert rep["tuned"] is False  # never presented as TVM's speed
        assert "untuned" in rep["baseline"]["notes"]["note"]
        assert any(p.endswith("model.so") for p in rep["outputs"]["artifact"])
    best = onnx.load(out / "best.onnx")
    onnx.checker.check_model(best)
    # held-out real images: the best graph classifies them as the original does
    x = np.load(example_model.parent / "efficientnet_lite0_eval.npz")["input"]
    a, b = _eval_logits(example_model, x), _eval_logits(out / "best.onnx", x)
    assert (a.argmax(1) == b.argmax(1)).all()
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_inspect_example(example_model):
    res = run_cli("inspect", example_model, "--passes", "conv_bn", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["inputs"] == [{"name": "input", "shape": [1, 3, 224, 224], "dtype": "float32"}]
    assert info["op_histogram"]["Conv"] == 49 and info["op_histogram"]["BatchNormalization"] == 49
    assert len(info["passes"]["conv_bn"]["sites"]) == 49
    assert 4.6e6 < info["stats"]["total_params"] < 4.8e6
    assert 0.7e9 < info["stats"]["total_flops"] < 0.9e9
    text = run_cli("inspect", example_model, "--top", "3")
    assert "total: 4,694,107 params" in text.stdout and "conv_bn: 49 sites" in text.stdout
