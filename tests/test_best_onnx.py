"""OUT/best.onnx loads on its own: an original kept from a model with external data is written with its
weights inlined (a copy of the .onnx alone names a data file that is not in --out), and a model past
protobuf's 2 GB limit is written with its weights in best.onnx.data next to it, atomically."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import conv_bn_model, file_sha, run_cli
from graphopt.runstore import outputs
from graphopt.runstore.outputs import atomic_write_model, uses_external_data


def _save_external(model: onnx.ModelProto, path) -> None:
    model = onnx.ModelProto.FromString(model.SerializeToString())  # save_model moves a proto's weights out in place
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data",
                    size_threshold=0)


def _run(path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.fixture
def external_model(tmp_path):
    """conftest's 16x16 conv-BN model, its weights in w.data next to it (in its own folder, so a
    best.onnx that names w.data cannot find it by accident)."""
    src = tmp_path / "src"
    src.mkdir()
    path = src / "ext.onnx"
    _save_external(conv_bn_model(size=16), path)
    assert uses_external_data(onnx.load(str(path), load_external_data=False))
    return path


def test_kept_original_with_external_data_is_written_self_contained(external_model, tmp_path):
    """--passes resolution has no site on a 16x16 image: the run keeps the original. best.onnx was
    the .onnx copied byte for byte without w.data: onnxruntime and onnx.checker could not load it."""
    shas = {p.name: file_sha(p) for p in external_model.parent.iterdir()}
    out = tmp_path / "out"
    res = run_cli("run", external_model, "--target", "ort", "--passes", "resolution", "--budget", "1",
                  "--confirm-rounds", "0", "--out", out, "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["best"]["is_original"] is True
    best = out / "best.onnx"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "best.onnx", "report.html", "report.json", "runs.sqlite"]  # no data file: the weights are inside
    proto = onnx.load(str(best), load_external_data=False)
    assert not uses_external_data(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.checker.check_model(str(best))
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(best, x), _run(external_model, x))
    assert {p.name: file_sha(p) for p in external_model.parent.iterdir()} == shas  # the input only read


def test_kept_original_without_external_data_stays_byte_for_byte(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(size=16), path)
    res = run_cli("run", path, "--target", "ort", "--passes", "resolution", "--budget", "1", "--confirm-rounds", "0",
                  "--out", tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "best.onnx").read_bytes() == path.read_bytes()


def test_a_model_past_the_inline_limit_gets_its_data_file_next_to_it(external_model, tmp_path, monkeypatch):
    """Past protobuf's 2 GB limit (here: a limit of 0 bytes) best.onnx names best.onnx.data in --out;
    the pair loads from --out alone, and the caller's ModelProto keeps its weights."""
    from graphopt import optimize

    monkeypatch.setattr(outputs, "INLINE_LIMIT", 0)
    out = tmp_path / "out"
    res = optimize(external_model, "ort", passes="resolution", budget=1, confirm_rounds=0, out=out)
    assert res.exit_code == 0 and res.report["best"]["is_original"] is True
    best, data = out / "best.onnx", out / "best.onnx.data"
    assert res.report["outputs"]["best_onnx_data"] == str(data)
    header = onnx.load(str(best), load_external_data=False)
    assert uses_external_data(header)
    assert {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"} == {data.name}
    onnx.checker.check_model(str(best))
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(best, x), _run(external_model, x))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_atomic_write_model_leaves_the_model_as_it_was(tmp_path):
    model = conv_bn_model(size=16)
    before = model.SerializeToString()
    path, data = atomic_write_model(tmp_path / "m.onnx", model, inline_limit=0)
    assert model.SerializeToString() == before
    assert data == tmp_path / "m.onnx.data" and data.stat().st_size > 1000
    loaded = onnx.load(str(path))  # the data read back from m.onnx.data
    for a, b in zip(loaded.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    path, data = atomic_write_model(tmp_path / "s.onnx", model)  # small: one file
    assert data is None and path.read_bytes() == before
