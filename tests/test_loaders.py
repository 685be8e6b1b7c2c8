"""models/loaders.py: the bundled models' fit / select / held-out data from the files vendored
under models/data/, read through graphopt's --data loader form; end to end on EfficientNet-Lite0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import run_cli
from graphopt.evaluation.data import open_data, split_data
from graphopt.modelio.ir import load_model

ROOT = Path(__file__).resolve().parents[1]
LOADERS = ROOT / "models" / "loaders.py"
EFFNET = ROOT / "models" / "efficientnet_lite0.onnx"
MINILM = ROOT / "models" / "minilm.onnx"


def test_effnet_loaders_preprocess_and_label():
    inputs = load_model(EFFNET).inputs
    photos = open_data(f"{LOADERS}:effnet_photos", inputs)
    held = open_data(f"{LOADERS}:effnet_imagenet", inputs, "--eval-data")
    assert photos.num_samples == 1000 and not photos.has_labels
    assert held.num_samples == 1000 and held.has_labels and held.label(0) == 0 and held.label(999) == 999
    x = held.sample(1)["input"]  # goldfish
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
    sess = ort.InferenceSession(str(EFFNET), providers=["CPUExecutionProvider"])
    assert int(np.argmax(sess.run(None, {"input": x})[0])) == 1
    # no photo of the held-out set is in the fit/select source
    names = {p.name for p in (ROOT / "models" / "data" / "photos-unlabelled").glob("*.jpg")}
    assert not names & {p.name for p in (ROOT / "models" / "data" / "imagenet-sample").glob("*.jpg")}


def test_minilm_loaders_pairs_stay_together():
    inputs = load_model(MINILM).inputs
    fit_select = open_data(f"{LOADERS}:minilm_sentences", inputs)
    test = open_data(f"{LOADERS}:minilm_sts_test", inputs, "--eval-data")
    assert test.num_samples == 2 * 1379 and fit_select.num_samples == 2 * 5749 + 34761
    feed = test.sample(0)
    assert set(feed) == {"input_ids", "attention_mask", "token_type_ids"} and feed["input_ids"].shape == (1, 128)
    assert test.label(0)[0] == test.label(1)[0] == 0 and test.label(0)[1] == 2.5
    assert fit_select.label(fit_select.num_samples - 1) is None  # WordNet sentences are unlabelled
    s = split_data(fit_select, test, needs_fit=True)
    assert s.select.num_samples == 256 and s.held_out is test  # 2758 <= the held-out cap (5000)
    sel = s.select
    pair_ids = [int(sel.label(i)[0]) for i in range(sel.num_samples)]
    assert all(pair_ids.count(p) == 2 for p in pair_ids)  # scored STS-B train pairs, both sentences


@pytest.mark.slow
def test_bundled_effnet_int8_judged_on_real_photos(tmp_path):
    """Static int8 calibrated on the unlabelled photos, chosen on them, top-1 reported on held-out
    ImageNet photos (a capped run: 64 select, 100 held-out, 1 candidate)."""
    out = tmp_path / "o"
    res = run_cli("run", EFFNET, "--target", "ort", "--threads", "2", "--passes", "int8", "--strategy", "grid",
                  "--budget", "1", "--data", f"{LOADERS}:effnet_photos", "--eval-data", f"{LOADERS}:effnet_imagenet",
                  "--metric", "imagenet_top1", "--max-drop", "2", "--select-samples", "64", "--eval-samples", "100",
                  "--calib-samples", "16", "--out", out, "--json", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(res.stdout)
    assert rep["data"]["sizes"] == {"fit": 936, "select": 64, "held_out": 100, "calibration": 16}
    assert rep["data"]["data_moves"] == ["int8: static int8 calibration (activation ranges)"]
    assert rep["trust"]["trusted"] is True
    # unlabelled select photos: top-1 estimated from the original's soft labels (its mean confidence)
    f = rep["fidelity"]
    assert 50.0 < f["original"] < 100.0 and f["min_required"] == pytest.approx(f["original"] - 2.0)
    assert f["basis"].startswith("estimated top-1") and rep["held_out"]["metric"]["basis"] == "top-1 on labels"
    h = rep["held_out"]
    assert h["metric"]["name"] == "imagenet_top1" and h["samples"] == 100 and h["original"] >= 80.0
    assert h["best"] is not None
