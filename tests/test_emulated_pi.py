"""The rpi4 artifact runs: an emulated Cortex-A72 Pi behind a TVM tracker (tests/emulated_pi.py), end to end.

The module's fixture sets the emulated Pi up (apt + pip downloads into ~/.cache/graphopt/emulated-pi:
about a minute the first time, nothing afterwards) and starts a tracker and one emulated Pi
(~30-50 s). Every artifact here is aarch64 code run by the aarch64 TVM runtime under
`qemu-aarch64-static -cpu cortex-a72`, and its outputs are compared with onnxruntime's on the host.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import EXAMPLE, EXAMPLE_CALIB, conv_bn_model, run_cli

if importlib.util.find_spec("tvm") is None:
    pytest.skip("apache-tvm not installed", allow_module_level=True)

import emulated_pi  # noqa: E402

pytestmark = [pytest.mark.tvm, pytest.mark.emulated]


@pytest.fixture(scope="module")
def pi():
    try:
        emulated_pi.setup()
    except (emulated_pi.SetupError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"the emulated Pi cannot be set up here: {e}")
    dev = emulated_pi.EmulatedPi(threads=1)
    with dev:
        yield dev
    assert dev.leftover_processes() == [], "tracker/emulated Pi processes (or their popen workers) left running"


def _opts(pi, *extra: str) -> list[str]:
    out = ["--target-opt", f"tracker={pi.tracker}", "--target-opt", f"key={pi.key}"]
    for e in extra:
        out += ["--target-opt", e]
    return out


def _ort(model_path, feed: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _run_on_pi_as_printed(out_dir, feed: dict, bare: bool = True) -> list[np.ndarray]:
    """run_on_pi.py exactly as the report's deploy lines print it, in the emulated Pi's shell
    (its PATH has the Pi's python3) (bare: as printed), then with the inputs.npz/outputs.npz
    arguments its docstring documents: the outputs it saved."""
    rep = json.loads((out_dir / "report.json").read_text())
    line = next(ln.strip() for ln in rep["target"]["deploy"] if "python3 run_on_pi.py" in ln)
    assert line == "TVM_NUM_THREADS=4 TVM_USE_RUNTIME_LIB=1 python3 run_on_pi.py"
    np.savez(out_dir / "inputs.npz", **feed)
    env = emulated_pi.emulated_env()
    for cmd in ([line] if bare else []) + [f"{line} inputs.npz outputs.npz"]:
        r = subprocess.run(["sh", "-c", cmd], cwd=out_dir, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "median" in r.stdout and " ms" in r.stdout, r.stdout
    with np.load(out_dir / "outputs.npz") as z:
        return [z[k] for k in sorted(z.files, key=lambda s: int(s.split("_")[1]))]


def _device_checks(out_dir) -> list[dict]:
    with sqlite3.connect(out_dir / "runs.sqlite") as db:
        ms = [json.loads(m) for (m,) in db.execute("SELECT measurement FROM candidates WHERE measurement IS NOT NULL")]
    assert ms and {m["method"] for m in ms} == {"estimated"}  # never a timing from the emulator
    return [m["extra"]["device_check"] for m in ms]


def test_small_model_runs_on_the_emulated_pi(pi, tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), model)
    out = tmp_path / "out"
    r = run_cli("run", model, "--target", "rpi4", *_opts(pi, "estimate=1"), "--budget", "2", "--out", out,
                timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["latency_method"] == "estimated"
    assert "emulated" in rep["target"]["device"] and "outputs checked on" in rep["target"]["measured"]
    checks = _device_checks(out)
    assert len(checks) >= 2 and all(c["ok"] and c["max_scaled_err"] < 1e-4 and c["emulated"] for c in checks)
    d = rep["device_check"]
    assert d["checked"] == d["matched"] == len(checks) and d["failed_candidates"] == [] and d["emulated"]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("device check:"))
    assert f"{len(checks)} of {len(checks)} candidates' outputs" in line and "(emulated Cortex-A72)" in line
    # the deployable artifact, run with the printed command under the emulator: onnxruntime's numbers
    assert (out / "run_on_pi.py").exists() and ((out / "model.so").exists() or (out / "model.tar").exists())
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (got,) = _run_on_pi_as_printed(out, {"x": x})
    (want,) = _ort(out / "best.onnx", {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_tar_fallback_is_linked_by_the_pis_gcc(pi, tmp_path):
    """cc=tar: the Pi's g++ (emulated) links model.tar when TVM loads it, over RPC and as printed."""
    from graphopt.targets.rpi4 import Rpi4Target

    t = Rpi4Target(tracker=pi.tracker, key=pi.key, estimate=1, cc="tar")
    t.check()
    model = conv_bn_model(seed=3)
    art = t.compile(model, tmp_path)
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    m = t.measure(art, {"x": x})
    assert m.method == "estimated" and m.extra["device_check"]["ok"], m.extra
    assert str(t.rpc_config.where()) in m.device and "emulator" in m.device
    (got,) = t.run_once(art, {"x": x})  # the aarch64 code's outputs, fetched from the remote VM
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    out = tmp_path / "out"
    files = t.export(art, out)
    assert [p.name for p in files] == ["model.tar", "run_on_pi.py"]
    (out / "report.json").write_text(json.dumps({"target": t.describe()}))  # where the deploy lines are printed
    (ran,) = _run_on_pi_as_printed(out, {"x": x}, bare=False)
    np.testing.assert_allclose(ran, want, rtol=1e-4, atol=1e-5)
    t.close()


def test_device_check_fails_a_candidate_that_computes_something_else(pi, tmp_path):
    """The check compares numbers: a device whose code differs from the graph fails the candidate."""
    from graphopt.targets.rpi4 import Rpi4Target

    t = Rpi4Target(tracker=pi.tracker, key=pi.key, estimate=1, cc="tar")
    t.check()
    art = t.compile(conv_bn_model(seed=0), tmp_path)
    onnx.save(conv_bn_model(seed=5), art.info["reference_onnx"])  # the device runs seed 0's weights
    with pytest.raises(RuntimeError, match="differ from onnxruntime's .* check_tol"):
        t.measure(art, {"x": np.ones((1, 3, 16, 16), np.float32)})
    t.close()


def test_timing_on_the_emulator_is_refused(pi, tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), model)
    r = run_cli("run", model, "--target", "rpi4", *_opts(pi), "--budget", "1", "--out", tmp_path / "out", timeout=300)
    assert r.returncode == 2, r.stderr
    assert "is an emulator" in r.stderr and "--target-opt estimate=1" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_efficientnet_lite0_runs_on_the_emulated_pi(pi, tmp_path):
    """The bundled model's rpi4 artifact: cross-compiled here, run by the emulated Cortex-A72 over
    the tracker, outputs within 1e-4 (scaled) of onnxruntime's for the original and a candidate."""
    if not EXAMPLE.exists():
        pytest.skip("models/efficientnet_lite0.onnx is not built (make models)")
    out = tmp_path / "out"
    r = run_cli("run", EXAMPLE, "--target", "rpi4", *_opts(pi, "estimate=1"), "--passes", "conv_bn", "--data",
                EXAMPLE_CALIB, "--budget", "1", "--out", out, timeout=900)
    assert r.returncode == 0, r.stderr
    checks = _device_checks(out)
    assert len(checks) == 2 and all(c["ok"] and c["max_scaled_err"] < 1e-4 for c in checks), checks
    assert all(c["outputs"][0]["scale"] > 1 for c in checks)  # real logits, not zeros
    if os.environ.get("GRAPHOPT_EMULATED_RUN_ON_PI"):  # ~1 min more: 50 timed runs under QEMU
        with np.load(EXAMPLE_CALIB) as z:
            feed = {k: z[k][0] for k in z.files}
        (got,) = _run_on_pi_as_printed(out, feed, bare=False)
        (want,) = _ort(out / "best.onnx", feed)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_fast_math_kernels_match_onnxruntime_on_the_emulated_pi(pi, tmp_path):
    """exp, erf, tanh, sigmoid and softmax as the rpi4 target compiles them by default (fast_math:
    TOPI polynomials, targets/tvm_prep.fast_math), run on the emulated Cortex-A72, against
    onnxruntime on this machine."""
    from tests.test_tvm_prep import _transcendental_net

    model = tmp_path / "t.onnx"
    onnx.save(_transcendental_net(), model)
    out = tmp_path / "out"
    r = run_cli("run", model, "--target", "rpi4", *_opts(pi, "estimate=1"), "--budget", "1", "--out", out,
                "--allow-synthetic", timeout=600)
    assert r.returncode == 0, r.stderr
    (check,) = _device_checks(out)
    assert check["ok"] and check["max_scaled_err"] < 1e-5 and check["emulated"], check
    x = np.linspace(-10, 10, 256, dtype=np.float32).reshape(1, 4, 64)
    got = _run_on_pi_as_printed(out, {"x": x}, bare=False)
    for g, w in zip(got, _ort(model, {"x": x})):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-6)
