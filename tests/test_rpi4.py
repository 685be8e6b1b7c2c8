"""rpi4 target: aarch64 artifacts, the refusal to pretend without a device, and the cost model."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sqlite3
import subprocess
import tarfile

import numpy as np
import onnx
import pytest
from conftest import conv_bn_model, run_cli

from graphopt.errors import UsageError

if importlib.util.find_spec("tvm") is None:
    pytest.skip("apache-tvm not installed", allow_module_level=True)

pytestmark = pytest.mark.tvm


def _file(path) -> str:
    if shutil.which("file") is None:
        pytest.skip("the `file` command is not installed")
    return subprocess.run(["file", "-b", str(path)], capture_output=True, text=True, check=True).stdout


def test_cost_model_ranks_half_the_channels_faster():
    from graphopt.targets.rpi4 import estimate_ms

    full, detail = estimate_ms(conv_bn_model(channels=32, size=32))
    half, _ = estimate_ms(conv_bn_model(channels=16, size=32))
    assert 0 < half < 0.6 * full
    assert detail["flops"] > 0 and "Conv" in detail["by_op_ms"]
    # fewer cores: slower, never faster
    assert estimate_ms(conv_bn_model(channels=32, size=32), threads=1)[0] > full


def test_no_device_and_no_estimate_refuses(tmp_path, monkeypatch):
    from graphopt.targets.rpi4 import Rpi4Target

    for var in ("GRAPHOPT_RPC_TRACKER", "GRAPHOPT_RPC_KEY", "GRAPHOPT_RPC_SERVER"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match="estimate=1"):  # no device was named: exit 2, not 4 (unreachable)
        Rpi4Target().check()
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), model)
    r = run_cli("run", model, "--target", "rpi4", "--out", tmp_path / "out", "--budget", "1", timeout=120)
    assert r.returncode == 2, r.stderr
    assert "tracker=HOST:PORT" in r.stderr and "--target-opt estimate=1" in r.stderr
    assert "Traceback" not in r.stderr


def test_options_are_checked():
    from graphopt.targets.rpi4 import Rpi4Target

    with pytest.raises(UsageError, match="mcpu is fixed"):
        Rpi4Target(mcpu="znver3")
    with pytest.raises(UsageError, match="estimate"):
        Rpi4Target(estimate="maybe")
    with pytest.raises(UsageError, match="unknown rpi4 target option"):
        Rpi4Target(estimate=1, colour="red")
    with pytest.raises(UsageError, match="no such command"):
        Rpi4Target(estimate=1, cc="no-such-cc-xyz").check()


def test_env_tracker_is_used_by_rpi4_not_x86(monkeypatch):
    from graphopt.targets.rpi4 import Rpi4Target
    from graphopt.targets.x86 import X86Target

    monkeypatch.setenv("GRAPHOPT_RPC_TRACKER", "127.0.0.1:9")
    monkeypatch.setenv("GRAPHOPT_RPC_KEY", "pi4")
    assert Rpi4Target().rpc_config.tracker == ("127.0.0.1", 9)
    assert X86Target().rpc_config is None  # x86 means this machine unless told otherwise


def test_estimate_run_marks_every_latency_estimated(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), model)
    out = tmp_path / "out"
    r = run_cli("run", model, "--target", "rpi4", "--target-opt", "estimate=1", "--target-opt", "cc=tar",
                "--out", out, "--budget", "3", timeout=400)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["latency_method"] == "estimated"
    assert "cost_model" in rep["target"] and rep["target"]["deploy"]
    with sqlite3.connect(out / "runs.sqlite") as db:
        ms = [json.loads(m) for (m,) in db.execute("SELECT measurement FROM candidates WHERE measurement IS NOT NULL")]
    assert ms and {m["method"] for m in ms} == {"estimated"}
    summary = [ln for ln in r.stdout.splitlines() if ln.startswith(("original:", "best:"))]
    assert len(summary) == 2 and all("(estimated" in ln for ln in summary), r.stdout
    # conv_bn fusion removes BN nodes: the cost model must rank it cheaper than the original
    assert rep["best"]["median_ms"] < rep["baseline"]["median_ms"]
    assert (out / "model.tar").exists() and (out / "run_on_pi.py").exists()
    compile((out / "run_on_pi.py").read_text(), "run_on_pi.py", "exec")  # valid Python


def _compiled(tmp_path, **opts):
    from graphopt.targets.rpi4 import Rpi4Target

    t = Rpi4Target(estimate=1, **opts)
    t.check()
    return t, t.compile(conv_bn_model(), tmp_path)


def test_tar_fallback_holds_aarch64_objects(tmp_path):
    t, art = _compiled(tmp_path, cc="tar")
    files = t.export(art, tmp_path / "out")
    assert [p.name for p in files] == ["model.tar", "run_on_pi.py"]
    with tarfile.open(files[0]) as tf:
        names = tf.getnames()
        tf.extractall(tmp_path / "x", filter="data")
    objs = [n for n in names if n.endswith(".o")]
    assert objs
    assert "ARM aarch64" in _file(tmp_path / "x" / objs[0])
    assert "model.tar" in " ".join(t.deploy_lines())


def test_so_is_arm_aarch64_when_a_cross_linker_exists(tmp_path):
    from graphopt.targets.rpi4 import find_cross_compiler

    cc = find_cross_compiler("auto")
    if cc is None:
        pytest.skip("no aarch64 cross linker: apt install g++-aarch64-linux-gnu, or pip install ziglang")
    t, art = _compiled(tmp_path)
    lib, script = t.export(art, tmp_path / "out")
    assert lib.name == "model.so" and script.name == "run_on_pi.py"
    desc = _file(lib)
    assert "ELF 64-bit" in desc and "ARM aarch64" in desc and "shared object" in desc, desc


def test_estimate_measurement_checks_inputs(tmp_path):
    from graphopt.errors import DataError

    t, art = _compiled(tmp_path, cc="tar")
    m = t.measure(art, {"x": np.zeros((1, 3, 16, 16), np.float32)})
    assert m.method == "estimated" and m.latency.repeats == 1 and m.tuned is None
    assert "no device ran" in m.device
    with pytest.raises(DataError):
        t.measure(art, {"x": np.zeros((1, 3, 8, 8), np.float32)})
