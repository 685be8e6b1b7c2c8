"""`graphopt runs`, `export` and `report` on a finished run directory."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from conftest import run_cli


def _out(s, x):
    return ort.InferenceSession(str(s), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_runs_export_report(convbn_path, tmp_path):
    out = tmp_path / "o"
    assert run_cli("run", convbn_path, "--target", "ort", "--search-exact", "--budget", "3", "--out", out).returncode == 0
    res = run_cli("runs", out, "--sort", "id", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["id"] for r in rows] == [1, 2, 3, 4]
    assert any(r["pareto"] for r in rows)
    text = run_cli("runs", out).stdout
    lat = [float(line.split()[4]) for line in text.splitlines()[2:]]
    assert lat == sorted(lat)  # default sort: fastest first

    # export a candidate with two fusions: no BN left, same numerics as the original
    two = next(r for r in rows if len(r["genotype"]) == 2)
    dest = tmp_path / "picked.onnx"
    res = run_cli("export", out, "--candidate", two["id"], "-o", dest)
    assert res.returncode == 0, res.stderr
    m = onnx.load(dest)
    onnx.checker.check_model(m)
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_out(dest, x), _out(convbn_path, x), atol=1e-4)

    (out / "report.html").unlink()
    res = run_cli("report", out)
    assert res.returncode == 0 and 'id="pareto-plot"' in (out / "report.html").read_text()

    bad = run_cli("export", out, "--candidate", "99", "-o", tmp_path / "x.onnx")
    assert bad.returncode == 2 and "no candidate 99" in bad.stderr
    bad = run_cli("runs", tmp_path)
    assert bad.returncode == 2 and "holds no run store" in bad.stderr


def test_export_rebuilds_a_repaired_candidate_exactly(tmp_path):
    """Repair fits weights to the run's calibration half: export must use the same half, so the
    exported file is the graph that was measured (the model hash stored in the run)."""
    from conftest import conv_bn_model

    from graphopt.modelio.ir import model_hash
    from graphopt.runstore.store import RunStore

    path = tmp_path / "m.onnx"
    path.write_bytes(conv_bn_model(channels=8, size=12, blocks=2).SerializeToString())
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(3).standard_normal((8, 1, 3, 12, 12)).astype(np.float32))
    out = tmp_path / "o"
    res = run_cli("run", path, "--target", "ort", "--passes", "depthwise", "--data", data, "--budget", "3",
                  "--min-fidelity", "0", "--out", out)
    assert res.returncode == 0, res.stderr
    store = RunStore.in_dir(out)
    try:
        rec = next(r for r in store.records() if r.genotype and r.graph_hash)
    finally:
        store.close()
    dest = tmp_path / "e.onnx"
    res = run_cli("export", out, "--candidate", rec.id, "-o", dest)
    assert res.returncode == 0, res.stderr
    assert model_hash(onnx.load(dest)) == rec.graph_hash


def test_resume_refuses_other_move_options(convbn_path, tmp_path):
    out = tmp_path / "o"
    assert run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--out", out).returncode == 0
    res = run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--no-repair", "--out", out)
    assert res.returncode == 2
    assert "different move_options" in res.stderr
