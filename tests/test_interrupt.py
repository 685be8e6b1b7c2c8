"""Ctrl-C (SIGINT) mid-search: exit 130, the store keeps finished candidates, the report says so."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import onnx

from conftest import ROOT, conv_bn_model


def test_sigint_keeps_store_and_writes_report(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=6), p)  # 2^6 genotypes: the budget of 50 cannot run out of space
    out = tmp_path / "o"
    # slow measurements (many repeats) so the run is still going when the signal arrives
    proc = subprocess.Popen([sys.executable, "-m", "graphopt", "run", str(p), "--target", "ort", "--budget", "50",
                             "--search-exact", "--target-opt", "repeat=2000", "--out", str(out), "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a test run started in the background (`make test &`) inherits SIGINT as
                            # ignored, and Python then installs no KeyboardInterrupt handler: restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # wait until the progress log (stderr) shows two candidates done, then Ctrl-C
    lines: list[str] = []

    def read_err():
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and not any("[2/50]" in ln for ln in lines) and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout = proc.stdout.read()
    proc.wait(timeout=120)
    reader.join(timeout=10)
    stderr = "".join(lines)
    store = out / "runs.sqlite"
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    rep = json.loads(stdout)
    assert rep["status"] == "interrupted" and rep["search"]["stopped_because"] == "interrupted"
    rows = sqlite3.connect(store).execute("SELECT status, latency_ms FROM candidates").fetchall()
    assert len(rows) >= 2 and all(s == "ok" and lat > 0 for s, lat in rows)
    assert rep["search"]["candidates"]["total_in_store"] == len(rows)
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted"
    onnx.checker.check_model(onnx.load(out / "best.onnx"))
    # resuming continues: nothing already stored is measured again. rows = the original + k candidates;
    # --budget k+1 asks for exactly one more.
    res = subprocess.run([sys.executable, "-m", "graphopt", "run", str(p), "--target", "ort", "--search-exact",
                          "--budget", str(len(rows)), "--out", str(out), "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    r2 = json.loads(res.stdout)
    assert r2["search"]["candidates"]["new"] == 1 and r2["search"]["candidates"]["total_in_store"] == len(rows) + 1
