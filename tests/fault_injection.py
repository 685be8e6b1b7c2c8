"""Fault injection: run graphopt the way a careful (and a careless) user would, and check the promises.

    .venv/bin/python tests/fault_injection.py [--only SUBSTRING] [--json FILE]

Each case builds its own small model (conv-BN, built in code) in a fresh temp folder, runs the real
`graphopt` command in subprocesses from an empty working directory, and prints one table row:
case, exit code (and the one expected), the first line graphopt printed on stderr (with -q: the
error or warning), and whether the state is intact:
  - the input model and data files are byte-for-byte unchanged;
  - the working directory is still empty (nothing written outside --out and the temp folder);
  - --out holds no work-* folder and no half-written temp file after the command;
  - what the case itself promises (no --out created on bad input, a store left unchanged, a
    report written after SIGTERM, ...).
Exits 1 if any row fails (exit code other than expected, or state not intact). Not a pytest
module (its rows are covered one by one in tests/test_rundir.py); about 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("GRAPHOPT_TUNE_TRIALS", "0")

from conftest import conv_bn_model  # noqa: E402


def sha(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


@dataclass
class Row:
    case: str
    expected: int
    code: int | None = None
    line: str = ""
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        return all(self.checks.values())

    @property
    def ok(self) -> bool:
        return self.code == self.expected and self.intact


class Env:
    """One case's sandbox: a temp folder, a clean cwd, the model and data whose bytes must not change."""

    def __init__(self, root: Path):
        self.root = root
        self.cwd = root / "cwd"
        self.cwd.mkdir()
        self.out = root / "out"
        self.model = root / "model.onnx"
        onnx.save(conv_bn_model(), self.model)
        self.watch: list[Path] = [self.model]
        self._sha: dict[Path, str | None] = {}

    def snapshot(self) -> None:
        self._sha = {p: sha(p) for p in self.watch}

    def graphopt(self, *args, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "graphopt", *map(str, args)], cwd=self.cwd, env=_env(),
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, *args) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "graphopt", *map(str, args)], cwd=self.cwd, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def common_checks(self) -> dict[str, bool]:
        c = {f"{p.name} unchanged": sha(p) == self._sha.get(p) for p in self.watch}
        c["cwd clean"] = not any(self.cwd.iterdir())
        if self.out.is_dir():
            c["no work-*/tmp left"] = not any(p.name.startswith("work-") or p.name.endswith(".tmp")
                                              for p in self.out.iterdir())
        return c


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def first_line(res: subprocess.CompletedProcess | tuple[str, str]) -> str:
    err = res[1] if isinstance(res, tuple) else res.stderr
    out = res[0] if isinstance(res, tuple) else res.stdout
    lines = [ln for ln in err.splitlines() if ln.strip()] or [ln for ln in out.splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if "Traceback" in err:
        text = "TRACEBACK: " + text
    return text


def run_args(env: Env, *extra, budget: int = 2) -> list:
    return ["run", env.model, "--target", "ort", "--budget", budget, "--out", env.out, "-q", *extra]


def wait_for_progress(proc: subprocess.Popen, needle: str = "[1/", timeout: float = 240) -> list[str]:
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not any(needle in ln for ln in lines):
        time.sleep(0.05)
    return lines


# --------------------------------------------------------------------------------- the cases
CASES: list[tuple[str, int, Callable[[Env, Row], subprocess.CompletedProcess | None]]] = []


def case(name: str, expected: int):
    def deco(fn):
        CASES.append((name, expected, fn))
        return fn
    return deco


def _six_blocks(env: Env) -> None:
    onnx.save(conv_bn_model(blocks=6), env.model)


def _slow(env: Env) -> subprocess.Popen:
    return env.popen("run", env.model, "--target", "ort", "--budget", 50, "--target-opt", "repeat=2000",
                     "--out", env.out, "--json")


@case("model stored as OUT/report.json", 2)
def _(env, row):
    env.out.mkdir()
    env.model = env.out / "report.json"
    onnx.save(conv_bn_model(), env.model)
    env.watch = [env.model]
    env.snapshot()
    return env.graphopt(*run_args(env))


@case("model stored as OUT/best.onnx", 2)
def _(env, row):
    env.out.mkdir()
    env.model = env.out / "best.onnx"
    onnx.save(conv_bn_model(), env.model)
    env.watch = [env.model]
    env.snapshot()
    return env.graphopt(*run_args(env))


@case("two runs on one --out at once (the second)", 2)
def _(env, row):
    _six_blocks(env)
    env.snapshot()
    first = _slow(env)
    wait_for_progress(first)
    res = env.graphopt(*run_args(env))
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    recs = sqlite3.connect(env.out / "runs.sqlite").execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
    row.checks["store holds only the first run's rows"] = recs >= 1
    return res


@case("SIGTERM mid-run (report kept)", 143)
def _(env, row):
    _six_blocks(env)
    env.snapshot()
    proc = _slow(env)
    lines = wait_for_progress(proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    time.sleep(0.2)
    rep = json.loads((env.out / "report.json").read_text()) if (env.out / "report.json").is_file() else {}
    row.checks["report.json says interrupted"] = rep.get("status") == "interrupted"
    row.checks["lock released"] = (env.out / ".graphopt.lock").read_text() == ""
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(ln for ln in lines
                                                                              if "error" in ln or "interrupt" in ln))


@case("kill -9 mid-run, then the next run", 0)
def _(env, row):
    _six_blocks(env)
    env.snapshot()
    proc = _slow(env)
    wait_for_progress(proc)
    proc.kill()
    proc.wait(timeout=60)
    row.checks["kill -9 left work-* (to clean)"] = any(env.out.glob("work-*"))
    res = env.graphopt("run", env.model, "--target", "ort", "--budget", 3, "--out", env.out)
    row.checks["stale lock taken over"] = "took over the lock" in res.stderr
    res.stderr = "\n".join(ln for ln in res.stderr.splitlines() if "took over" in ln)
    return res


@case("export after the calibration data changed", 2)
def _(env, row):
    data = env.root / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((8, 1, 3, 16, 16)).astype(np.float32))
    env.graphopt(*run_args(env, "--data", data, "--passes", "depthwise", "--min-fidelity", "0", budget=3))
    np.savez(data, x=rng.standard_normal((8, 1, 3, 16, 16)).astype(np.float32))
    env.snapshot()
    dest = env.root / "e.onnx"
    res = env.graphopt("export", env.out, "--candidate", 2, "-o", dest)
    row.checks["nothing exported"] = not dest.exists()
    return res


@case("export -o onto the run's own model", 2)
def _(env, row):
    env.snapshot()
    env.graphopt(*run_args(env, budget=1))
    return env.graphopt("export", env.out, "--candidate", 2, "-o", env.model)


@case("--threads 100000", 0)
def _(env, row):
    env.snapshot()
    res = env.graphopt(*run_args(env, "--threads", 100000, "--json", budget=1))
    row.checks["threads capped"] = json.loads(res.stdout)["target"]["threads"] == os.cpu_count()
    return res


@case("--shape x=1x3x20000x20000", 2)
def _(env, row):
    m = conv_bn_model()
    for d in m.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.ClearField("dim_value")
        d.dim_param = "S"
    onnx.save(m, env.model)
    env.snapshot()
    t = time.monotonic()
    res = env.graphopt(*run_args(env, "--shape", "x=1x3x20000x20000"))
    row.checks["refused in < 30 s"] = time.monotonic() - t < 30
    row.checks["no --out created"] = not env.out.exists()
    return res


@case("NaN/Inf calibration data", 2)
def _(env, row):
    data = env.root / "nan.npz"
    x = np.random.default_rng(0).standard_normal((4, 1, 3, 16, 16)).astype(np.float32)
    x[1, 0, 0, 0, 0] = np.nan
    np.savez(data, x=x)
    env.watch.append(data)
    env.snapshot()
    res = env.graphopt(*run_args(env, "--data", data))
    row.checks["no rows stored"] = not (env.out / "runs.sqlite").exists()
    return res


@case("pickled .npz", 2)
def _(env, row):
    data = env.root / "pickle.npz"
    np.savez(data, x=np.array([{"a": 1}], dtype=object))
    env.watch.append(data)
    env.snapshot()
    return env.graphopt(*run_args(env, "--data", data))


for _cmd in ("run", "runs", "export", "report"):
    def _truncated(env, row, cmd=_cmd):
        env.graphopt(*run_args(env, budget=3))
        db = env.out / "runs.sqlite"
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
        env.watch.append(db)
        env.snapshot()
        args = {"run": run_args(env), "runs": ["runs", env.out],
                "export": ["export", env.out, "--candidate", 2, "-o", env.root / "e.onnx"],
                "report": ["report", env.out]}[cmd]
        return env.graphopt(*args)
    case(f"truncated runs.sqlite: graphopt {_cmd}", 2)(_truncated)


@case("garbage report.json: graphopt report", 2)
def _(env, row):
    env.graphopt(*run_args(env, budget=1))
    (env.out / "report.json").write_text("{garbage")
    return env.graphopt("report", env.out)


@case("--seed -1 without --data", 2)
def _(env, row):
    env.snapshot()
    res = env.graphopt(*run_args(env, "--seed", -1))
    row.checks["no --out created"] = not env.out.exists()
    return res


@case("export -o into a missing folder", 2)
def _(env, row):
    env.snapshot()
    env.graphopt(*run_args(env, budget=1))
    return env.graphopt("export", env.out, "--candidate", 2, "-o", env.root / "nope" / "e.onnx")


@case("export -o onto a folder", 2)
def _(env, row):
    env.snapshot()
    env.graphopt(*run_args(env, budget=1))
    return env.graphopt("export", env.out, "--candidate", 2, "-o", env.root)


@case("--passes ',,'", 2)
def _(env, row):
    env.snapshot()
    res = env.graphopt(*run_args(env, "--passes", ",,"))
    row.checks["no --out created"] = not env.out.exists()
    return res


@case("--passes 'conv_bn, depthwise'", 0)
def _(env, row):
    env.snapshot()
    res = env.graphopt(*run_args(env, "--passes", "conv_bn, depthwise", budget=1))
    rep = json.loads((env.out / "report.json").read_text())
    row.checks["both passes used"] = rep["search"]["passes"] == ["conv_bn", "depthwise"]
    return res


@case("--max-size-mb rules out the original", 0)
def _(env, row):
    env.snapshot()
    env.graphopt(*run_args(env, budget=3))
    rows = json.loads(env.graphopt("runs", env.out, "--json").stdout)
    orig = next(r for r in rows if not r["genotype"])["size_bytes"]
    env.out = env.root / "out2"
    res = env.graphopt(*run_args(env, "--max-size-mb", f"{(orig - 1) / 1e6:.6f}", budget=3))
    row.checks["summary printed"] = "speedup unknown" in res.stdout
    row.checks["report.json written"] = (env.out / "report.json").is_file()
    return res


@case("bad model file", 2)
def _(env, row):
    env.model.write_text("not an onnx model")
    env.snapshot()
    res = env.graphopt(*run_args(env))
    row.checks["no --out created"] = not env.out.exists()
    return res


@case("bad flag (--jobs 2 on ort)", 2)
def _(env, row):
    env.snapshot()
    res = env.graphopt(*run_args(env, "--jobs", 2))
    row.checks["no --out created"] = not env.out.exists()
    return res


for _kind in ("foreign", "empty"):
    def _foreign(env, row, kind=_kind):
        env.out.mkdir()
        db = env.out / "runs.sqlite"
        if kind == "foreign":
            c = sqlite3.connect(db)
            c.execute("CREATE TABLE notes (t TEXT)")
            c.commit()
            c.close()
        else:
            db.touch()
        env.watch.append(db)
        env.snapshot()
        res = env.graphopt("runs", env.out)
        row.checks["no -wal/-shm"] = sorted(p.name for p in env.out.iterdir()) == ["runs.sqlite"]
        return res
    case(f"graphopt runs on {'a foreign' if _kind == 'foreign' else 'an empty'} runs.sqlite", 2)(_foreign)


def _incomplete(env: Env) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "d"])
    g = helper.make_graph([helper.make_node("Inverse", ["x"], ["v"], name="inv", domain="com.microsoft"),
                           helper.make_node("Relu", ["v"], ["y"], name="relu")], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    onnx.save(m, env.model)


@case("inspect: incomplete symbolic shapes", 0)
def _(env, row):
    _incomplete(env)
    env.snapshot()
    return env.graphopt("inspect", env.model)


@case("run: incomplete symbolic shapes", 0)
def _(env, row):
    _incomplete(env)
    env.snapshot()
    return env.graphopt(*run_args(env, "--passes", "", budget=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the cases whose name contains this")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    rows: list[Row] = []
    print(f"{'case':<46} {'exit':>8}  {'state':<7} first line")
    for name, expected, fn in CASES:
        if args.only and args.only not in name:
            continue
        row = Row(name, expected)
        with tempfile.TemporaryDirectory(prefix="graphopt-fault-") as tmp:
            env = Env(Path(tmp))
            env.snapshot()
            try:
                res = fn(env, row)
                row.code = res.returncode
                row.line = first_line(res)
            except Exception as e:  # the harness itself failed: a failed row
                row.line = f"HARNESS: {type(e).__name__}: {e}"
            row.checks.update(env.common_checks())
            row.checks["no traceback"] = not row.line.startswith("TRACEBACK")
        rows.append(row)
        bad = [k for k, v in row.checks.items() if not v]
        state = "intact" if not bad else "BROKEN"
        mark = "" if row.ok else "  <-- " + (f"expected exit {expected}" if row.code != expected else "") \
            + (f" {', '.join(bad)}" if bad else "")
        print(f"{name:<46} {str(row.code):>3} ({expected:>3})  {state:<7} {row.line[:110]}{mark}", flush=True)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} cases hold the promises"
          + (f"; failing: {', '.join(r.case for r in failed)}" if failed else ""))
    if args.json:
        Path(args.json).write_text(json.dumps([{"case": r.case, "expected": r.expected, "exit": r.code,
                                                "first_line": r.line, "checks": r.checks} for r in rows], indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
