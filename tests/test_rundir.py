"""The run directory under faults and hostile input (issue 22): nothing overwritten, nothing
mixed, nothing wrong. Real processes and real signals: two runs on one --out, SIGTERM, kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import ROOT, conv_bn_model, file_sha, run_cli

LOCK_NAME = ".graphopt.lock"


def read_lock(path):
    from graphopt.runstore.rundir import read_lock

    return read_lock(path)


def _graphopt(*args, cwd=ROOT, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "graphopt", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


class _Stderr:
    """Collects a process's stderr in a thread, so the test can wait for a progress line."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.t = threading.Thread(target=lambda: self.lines.extend(proc.stderr), daemon=True)
        self.t.start()

    def wait_for(self, proc: subprocess.Popen, needle: str, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not any(needle in ln for ln in self.lines):
            time.sleep(0.05)
        assert any(needle in ln for ln in self.lines), "".join(self.lines)[-2000:]

    def text(self) -> str:
        self.t.join(timeout=10)
        return "".join(self.lines)


def _slow_run(model: Path, out: Path, budget: int = 50) -> tuple[subprocess.Popen, _Stderr]:
    proc = _graphopt("run", model, "--target", "ort", "--search-exact", "--budget", budget, "--target-opt",
                     "repeat=2000", "--out", out, "--json")
    return proc, _Stderr(proc)


@pytest.fixture
def six_blocks(tmp_path: Path) -> Path:
    p = tmp_path / "m6.onnx"
    onnx.save(conv_bn_model(blocks=6), p)  # 2^6 genotypes: a budget of 50 cannot run out
    return p


def _last_error(res) -> str:
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1] if err else ""


# ------------------------------------------------------------------ 1: the input is never an output
@pytest.mark.parametrize("name", ["report.json", "best.onnx", "runs.sqlite"])
def test_model_inside_out_as_an_output_file_is_refused(tmp_path, name):
    out = tmp_path / "o"
    out.mkdir()
    model = out / name
    onnx.save(conv_bn_model(), model)
    sha = file_sha(model)
    res = run_cli("run", model, "--target", "ort", "--budget", "2", "--out", out)
    assert res.returncode == 2, res.stderr
    assert "is a file graphopt writes in --out" in _last_error(res)
    assert file_sha(model) == sha
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing else written


def test_model_hard_linked_as_an_output_is_refused(tmp_path, convbn_path):
    out = tmp_path / "o"
    out.mkdir()
    os.link(convbn_path, out / "best.onnx")
    sha = file_sha(convbn_path)
    res = run_cli("run", convbn_path, "--target", "ort", "--budget", "2", "--out", out)
    assert res.returncode == 2 and "is a file graphopt writes" in _last_error(res), res.stderr
    assert file_sha(convbn_path) == sha


def test_model_elsewhere_inside_out_is_fine(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    model = out / "mine.onnx"
    onnx.save(conv_bn_model(), model)
    sha = file_sha(model)
    res = run_cli("run", model, "--target", "ort", "--budget", "1", "--out", out)
    assert res.returncode == 0, res.stderr
    assert file_sha(model) == sha


# ------------------------------------------- 2 + 4: one run per --out; SIGTERM acts like Ctrl-C
def test_second_run_on_a_locked_out_is_refused_and_sigterm_writes_the_report(tmp_path, six_blocks):
    out = tmp_path / "o"
    first, err1 = _slow_run(six_blocks, out)
    err1.wait_for(first, "[1/50]")
    second = run_cli("run", six_blocks, "--target", "ort", "--budget", "2", "--out", out)
    line = _last_error(second)
    assert second.returncode == 2, second.stderr
    assert f"is in use by graphopt process {first.pid} on" in line and "choose another --out" in line
    assert read_lock(out / LOCK_NAME)["pid"] == first.pid
    first.send_signal(signal.SIGTERM)  # what timeout, docker stop, systemd and CI send
    stdout = first.stdout.read()
    first.wait(timeout=120)
    stderr = err1.text()
    assert first.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    rep = json.loads(stdout)
    assert rep["status"] == "interrupted"
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted"
    rows = sqlite3.connect(out / "runs.sqlite").execute("SELECT id FROM candidates").fetchall()
    assert len(rows) >= 1 and rep["search"]["candidates"]["total_in_store"] == len(rows)
    assert not list(out.glob("work-*"))
    assert read_lock(out / LOCK_NAME) is None  # released
    onnx.checker.check_model(onnx.load(out / "best.onnx"))


def test_kill_9_leaves_a_stale_lock_the_next_run_takes_over_and_cleans(tmp_path, six_blocks):
    out = tmp_path / "o"
    proc, err = _slow_run(six_blocks, out)
    err.wait_for(proc, "[1/50]")
    proc.kill()
    proc.wait(timeout=60)
    err.text()
    assert list(out.glob("work-*")), "a killed run leaves its work folder"
    assert read_lock(out / LOCK_NAME)["pid"] == proc.pid  # the dead holder's note is still there
    res = run_cli("run", six_blocks, "--target", "ort", "--budget", "3", "--out", out)
    assert res.returncode == 0, res.stderr
    assert f"took over the lock left by graphopt process {proc.pid}" in res.stderr
    assert "removed work-" in res.stderr
    assert not list(out.glob("work-*"))


def test_lock_in_process_is_exclusive_and_released(tmp_path):
    from graphopt.errors import UsageError
    from graphopt.runstore.rundir import RunLock

    with RunLock(tmp_path, "run"):
        with pytest.raises(UsageError, match=f"in use by graphopt process {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: taken again
        pass


# ---------------------------------------------------------- 3: export checks what it depends on
def test_export_refuses_changed_calibration_data(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(conv_bn_model(channels=8, size=12, blocks=2).SerializeToString())
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(3)
    np.savez(data, x=rng.standard_normal((8, 1, 3, 12, 12)).astype(np.float32))
    out = tmp_path / "o"
    res = run_cli("run", path, "--target", "ort", "--passes", "depthwise", "--data", data, "--budget", "3",
                  "--min-fidelity", "0", "--out", out)
    assert res.returncode == 0, res.stderr
    rows = json.loads(run_cli("runs", out, "--json").stdout)
    cand = next(r for r in rows if r["genotype"] and r["status"] == "ok")["id"]
    np.savez(data, x=rng.standard_normal((8, 1, 3, 12, 12)).astype(np.float32))  # the data changes
    dest = tmp_path / "e.onnx"
    res = run_cli("export", out, "--candidate", cand, "-o", dest)
    assert res.returncode == 2, res.stderr
    assert f"--data {data} changed since the run" in _last_error(res) and "restore that file" in res.stderr
    assert not dest.exists()


def test_export_refuses_a_graph_other_than_the_measured_one(tmp_path, convbn_path):
    out = tmp_path / "o"
    assert run_cli("run", convbn_path, "--target", "ort", "--budget", "2", "--out", out).returncode == 0
    db = sqlite3.connect(out / "runs.sqlite", isolation_level=None)
    cid = db.execute("SELECT id FROM candidates WHERE genotype != '{}' ORDER BY id LIMIT 1").fetchone()[0]
    # what a graphopt whose pass builds the move differently would see
    db.execute("UPDATE candidates SET graph_hash = 'f00d' || graph_hash WHERE id = ?", (cid,))
    db.close()
    res = run_cli("export", out, "--candidate", cid, "-o", tmp_path / "e.onnx")
    assert res.returncode == 2, res.stderr
    assert f"candidate {cid} rebuilds as a different graph than the one measured" in _last_error(res)


def test_export_never_overwrites_the_runs_model(tmp_path, convbn_path):
    out = tmp_path / "o"
    assert run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--out", out).returncode == 0
    sha = file_sha(convbn_path)
    res = run_cli("export", out, "--candidate", 2, "-o", convbn_path)
    assert res.returncode == 2 and "is the run's model" in _last_error(res), res.stderr
    assert file_sha(convbn_path) == sha
    res = run_cli("export", out, "--candidate", 2, "-o", out / "best.onnx")
    assert res.returncode == 2 and "is a file the run" in _last_error(res), res.stderr


# ----------------------------------------------------------------------------- 5: resources
def test_threads_capped_at_the_cpus(tmp_path, convbn_path):
    out = tmp_path / "o"
    res = run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--threads", "100000", "--out", out,
                  "--json")
    assert res.returncode == 0, res.stderr
    n = os.cpu_count()
    assert f"--threads 100000: this machine has {n} CPUs; using {n} threads" in res.stderr
    assert json.loads(res.stdout)["target"]["threads"] == n


def test_huge_shape_is_refused_before_allocating(tmp_path):
    p = tmp_path / "dyn.onnx"
    onnx.save(conv_bn_model(dynamic_batch=False, size=16), p)
    m = onnx.load(p)
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.ClearField("dim_value")
        d.dim_param = "S"
    for d in m.graph.output[0].type.tensor_type.shape.dim:
        d.ClearField("dim_value")
        d.dim_param = "B"
    onnx.save(m, p)
    out = tmp_path / "o"
    t = time.monotonic()
    res = run_cli("run", p, "--target", "ort", "--shape", "x=1x3x20000x20000", "--out", out)
    assert res.returncode == 2, res.stderr
    line = _last_error(res)
    assert "--shape x=1x3x20000x20000" in line and "use a smaller --shape" in line and "GB" in line
    assert time.monotonic() - t < 60 and not out.exists()


def test_memory_estimate_counts_samples_and_dtype():
    from graphopt.errors import UsageError
    from graphopt.modelio.ir import InputSpec
    from graphopt.runstore.rundir import check_synthetic_memory

    spec = [InputSpec("x", (1, 3, 100, 100), np.dtype(np.float16))]
    assert check_synthetic_memory(spec, 8, limit=10**9) == 8 * 3 * 100 * 100 * 2
    with pytest.raises(UsageError, match="more than the 0.0 GB graphopt allows"):
        check_synthetic_memory(spec, 8, limit=1000)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
def test_synthetic_inputs_built_in_the_models_dtype(dtype):
    from graphopt.evaluation.evaluate import synthetic_data
    from graphopt.modelio.ir import InputSpec

    spec = InputSpec("x", (1, 256, 256), np.dtype(dtype))
    model = helper.make_model(helper.make_graph([], "g", [], []))
    tracemalloc.start()
    data = synthetic_data([spec], model, samples=8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    a = data.arrays["x"]
    assert a.dtype == dtype and a.shape == (8, 1, 256, 256)
    # float16 is drawn as float32 (numpy has no float16 normal): at most 2x + the result
    assert peak <= a.nbytes * (3.2 if dtype == np.float16 else 1.2), (peak, a.nbytes)


# --------------------------------------------------------------- 6: bad input -> exit 2
def test_nan_calibration_data_is_refused_before_storing(tmp_path, convbn_path):
    data = tmp_path / "d.npz"
    x = np.random.default_rng(0).standard_normal((4, 1, 3, 16, 16)).astype(np.float32)
    x[1, 0, 0, 0, 0] = np.nan
    x[2, 0, 0, 0, 1] = np.inf
    np.savez(data, x=x)
    out = tmp_path / "o"
    res = run_cli("run", convbn_path, "--target", "ort", "--data", data, "--out", out)
    assert res.returncode == 2, res.stderr
    assert "'x' holds 2 NaN/Inf value(s)" in _last_error(res)
    assert not out.exists()


def _truncated_run(tmp_path, convbn_path) -> Path:
    out = tmp_path / "o"
    assert run_cli("run", convbn_path, "--target", "ort", "--budget", "3", "--out", out).returncode == 0
    db = out / "runs.sqlite"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    return out


def test_truncated_store_is_exit_2_for_every_command(tmp_path, convbn_path):
    out = _truncated_run(tmp_path, convbn_path)
    before = (out / "runs.sqlite").read_bytes()
    for args in (("run", convbn_path, "--target", "ort", "--budget", "2", "--out", out), ("runs", out),
                 ("export", out, "--candidate", "2", "-o", tmp_path / "e.onnx"), ("report", out)):
        res = run_cli(*args)
        assert res.returncode == 2, (args[0], res.returncode, res.stderr)
        line = _last_error(res)
        assert "runs.sqlite" in line and ("malformed" in line or "not a database" in line), (args[0], line)
    assert (out / "runs.sqlite").read_bytes() == before


def test_garbage_report_json(tmp_path, convbn_path):
    out = tmp_path / "o"
    assert run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--out", out).returncode == 0
    for data, needle in ((b"{not json", "is not valid JSON"), (b"\xff\xfe\x00garbage", "is not valid JSON"),
                         (b"[1, 2]", "is not a graphopt report"), (b'{"status": "ok"}', "is not a graphopt report")):
        (out / "report.json").write_bytes(data)
        res = run_cli("report", out)
        assert res.returncode == 2, res.stderr
        assert needle in _last_error(res)


@pytest.mark.parametrize("flags, needle", [
    (("--seed", "-1"), "--seed -1: must be a whole number >= 0"),
    (("--passes", ",,"), "--passes ',,': an empty pass name"),
    (("--passes", "conv_bn,,depthwise"), "an empty pass name"),
])
def test_bad_flags_exit_2_and_create_nothing(tmp_path, convbn_path, flags, needle):
    out = tmp_path / "o"
    res = run_cli("run", convbn_path, "--target", "ort", *flags, "--out", out)
    assert res.returncode == 2, res.stderr
    assert needle in _last_error(res)
    assert not out.exists()


def test_pass_names_are_trimmed(tmp_path, convbn_path):
    res = run_cli("run", convbn_path, "--target", "ort", "--passes", "conv_bn, depthwise", "--budget", "1",
                  "--allow-synthetic", "--out", tmp_path / "o", "--json")  # depthwise repair fits to data
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["search"]["passes"] == ["conv_bn", "depthwise"]


def test_export_destination_errors(tmp_path, convbn_path):
    out = tmp_path / "o"
    assert run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--out", out).returncode == 0
    res = run_cli("export", out, "--candidate", "2", "-o", tmp_path / "missing" / "e.onnx")
    assert res.returncode == 2 and "does not exist; create it first" in _last_error(res), res.stderr
    res = run_cli("export", out, "--candidate", "2", "-o", tmp_path)
    assert res.returncode == 2 and "is a directory; give a file name" in _last_error(res), res.stderr


# ------------------------------------------------------ 7: --max-size-mb rules out the original
def test_size_limit_that_rules_out_the_original_prints_a_summary(tmp_path, convbn_path):
    first = tmp_path / "a"
    assert run_cli("run", convbn_path, "--target", "ort", "--budget", "3", "--out", first).returncode == 0
    rows = json.loads(run_cli("runs", first, "--json").stdout)
    orig = next(r for r in rows if not r["genotype"])["size_bytes"]
    smaller = min(r["size_bytes"] for r in rows if r["genotype"])
    assert smaller < orig
    limit = (orig - 1) / 1e6
    res = run_cli("run", convbn_path, "--target", "ort", "--budget", "3", "--max-size-mb", f"{limit:.6f}",
                  "--out", tmp_path / "b")
    assert res.returncode == 0, res.stderr
    assert "speedup unknown (the original was not measured)" in res.stdout
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------------- 8: small leaks
def test_bad_model_or_flag_leaves_no_out_folder(tmp_path, convbn_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not onnx")
    out = tmp_path / "o"
    assert run_cli("run", bad, "--target", "ort", "--out", out).returncode == 2
    assert not out.exists()
    for flags in (("--target-opt", "profile=maybe"), ("--jobs", "2")):
        assert run_cli("run", convbn_path, "--target", "ort", *flags, "--out", out).returncode == 2
        assert not out.exists()


@pytest.mark.parametrize("kind", ["foreign", "empty"])
def test_runs_on_a_foreign_or_empty_sqlite_does_not_write(tmp_path, kind):
    out = tmp_path / "o"
    out.mkdir()
    db = out / "runs.sqlite"
    if kind == "foreign":
        c = sqlite3.connect(db)
        c.execute("CREATE TABLE notes (t TEXT)")
        c.execute("INSERT INTO notes VALUES ('mine')")
        c.commit()
        c.close()
    else:
        db.touch()
    before = db.read_bytes()
    for args in (("runs", out), ("export", out, "--candidate", "1", "-o", tmp_path / "e.onnx")):
        res = run_cli(*args)
        assert res.returncode == 2, res.stderr
        assert "is not a graphopt run store" in _last_error(res)
    assert db.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["runs.sqlite"]  # no -wal, no -shm
    if kind == "foreign":  # and a run refuses to write its tables into it
        m = tmp_path / "m.onnx"
        onnx.save(conv_bn_model(), m)
        res = run_cli("run", m, "--target", "ort", "--budget", "1", "--out", out)
        assert res.returncode == 2 and "not a graphopt run store" in _last_error(res), res.stderr
        assert db.read_bytes() == before


def test_runs_on_a_finished_run_does_not_write(tmp_path, convbn_path):
    out = tmp_path / "o"
    assert run_cli("run", convbn_path, "--target", "ort", "--budget", "1", "--out", out).returncode == 0
    names = sorted(p.name for p in out.iterdir())
    before = (out / "runs.sqlite").read_bytes()
    assert run_cli("runs", out).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == names and (out / "runs.sqlite").read_bytes() == before


# --------------------------------------------------------------------- 9: no litter in the cwd
def _incomplete_shapes_model() -> onnx.ModelProto:
    """A contrib op onnxruntime runs but its symbolic shape inference does not know (com.microsoft
    Inverse), with a dynamic output dim: the inference is incomplete, and its helper saves
    sym_shape_infer_temp.onnx (+ external data) into the current directory."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "d"])
    g = helper.make_graph([helper.make_node("Inverse", ["x"], ["v"], name="inv", domain="com.microsoft"),
                           helper.make_node("Relu", ["v"], ["y"], name="relu")], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


def test_inspect_and_run_leave_the_cwd_clean(tmp_path):
    model = tmp_path / "inv.onnx"
    onnx.save(_incomplete_shapes_model(), model)
    cwd = tmp_path / "clean"
    cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "graphopt", "inspect", str(model)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert list(cwd.iterdir()) == []
    out = tmp_path / "o"
    res = subprocess.run([sys.executable, "-m", "graphopt", "run", str(model), "--target", "ort", "--passes", "",
                          "--budget", "1", "--out", str(out)], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert list(cwd.iterdir()) == []
