"""EfficientNet-Lite0: the measured Pareto frontier, latency ratio vs held-out top-1, in one run.

Candidates: the original; moves built here with graphopt's passes (no recovery: cropS / resizeS
from `resolution`, bN = MBConv block N removed by `depth`, '+'-joined); ONNX files given with
--files (distilled candidates from bench/effnet_resolution.py, a `graphopt run`'s best.onnx).
Held-out: top-1 on models/data/imagenet-sample (labels.tsv; never used for a choice), one image
at a time through onnxruntime. Latency: onnxruntime 2 threads, ORT_ENABLE_ALL (the `ort`
target's options, bench/compare.py), every candidate and the original timed round-robin in this
process (--rounds rounds, start rotated), median ms per candidate; ratio = original / candidate,
both from this run. Top-1 is deterministic for given model bytes: a model's top-1 is cached in
<out>/effnet_top1_cache.json by the SHA-256 of its bytes and the number of held-out images
(--no-cache to recompute).

    .venv/bin/python bench/effnet_frontier.py --moves crop208,crop192,crop176 \
        --files bench/out/effnet_crop192.onnx [--held-out 1000] [--rounds 5]

Prints the table (markdown) with the CPU model and the frontier (no other candidate both faster
and at least as accurate); writes <out>/effnet_frontier.md / .json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from compare import interleaved_rounds, session  # noqa: E402
from effnet_resolution import build  # noqa: E402
from recover import HELD_OUT, MODEL, Photos, top1  # noqa: E402

from graphopt.reporting.analysis import analyze  # noqa: E402
from graphopt.modelio.ir import load_model  # noqa: E402
from graphopt.runstore.outputs import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402


def log(msg: str) -> None:
    print(f"[frontier {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moves", default="crop208,crop192,crop176,crop160,resize192,resize176")
    ap.add_argument("--files", default="", help="comma-separated ONNX files (name=path or path)")
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    t0 = time.monotonic()
    base = load_model(MODEL, {})
    rows = [{"name": "original", "path": MODEL}]
    for spec in [s for s in args.moves.split(",") if s]:
        p = out / f"frontier_{spec.replace('+', '_')}.onnx"
        atomic_write_bytes(p, build(base, spec).SerializeToString())
        rows.append({"name": spec, "path": p})
    for item in [s for s in args.files.split(",") if s]:
        name, _, path = item.rpartition("=")
        rows.append({"name": name or Path(path).stem, "path": Path(path)})
    rs = [ln.split("\t") for ln in (HELD_OUT / "labels.tsv").read_text().splitlines()[1:]][:args.held_out]
    held = Photos([HELD_OUT / r[0] for r in rs])
    labels = [int(r[1]) for r in rs]
    cache_path = out / "effnet_top1_cache.json"
    cache = {} if args.no_cache or not cache_path.exists() else json.loads(cache_path.read_text())
    for r in rows:
        data = Path(r["path"]).read_bytes()
        key = f"{hashlib.sha256(data).hexdigest()}:{len(labels)}"
        if key not in cache:
            t = time.monotonic()
            cache[key] = top1(data, held, labels)
            log(f"{r['name']}: top-1 {cache[key]:.1f} ({time.monotonic() - t:.0f} s)")
            atomic_write_json(cache_path, cache)
        r["top1"] = cache[key]
    if args.rounds <= 0:  # top-1 only (fills the cache)
        log("top-1 only (--rounds 0): " + ", ".join(f"{r['name']} {r['top1']:.1f}" for r in rows))
        return 0
    for r in rows:  # FLOPs by formula (graphopt.reporting.analysis, on the loaded model: shapes folded), whatever the load
        r["gflops"] = analyze(load_model(Path(r["path"]), {}).proto).total_flops / 1e9
    sessions = {r["name"]: session(r["path"]) for r in rows}
    interleaved_rounds(rows, sessions, held.sample(0), args.rounds, say=log)
    base_ms = statistics.median(rows[0]["rounds_ms"])
    for r in rows:
        r["ms"] = statistics.median(r["rounds_ms"])
        r["ratio"] = base_ms / r["ms"]
        r["drop"] = rows[0]["top1"] - r["top1"]
    for r in rows:
        r["flops_ratio"] = rows[0]["gflops"] / r["gflops"]
    for r in rows:  # frontier on FLOPs (the measured ms swing by +-40% on a loaded machine)
        r["frontier"] = not any(o is not r and o["flops_ratio"] >= r["flops_ratio"] and o["top1"] >= r["top1"]
                                and (o["flops_ratio"] > r["flops_ratio"] or o["top1"] > r["top1"]) for o in rows)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"{date}, {cpu}, onnxruntime 2 threads ORT_ENABLE_ALL, {args.rounds} interleaved rounds; "
             f"held-out top-1 on {len(labels)} imagenet-sample photos",
             "", "| candidate | GFLOPs (x fewer) | ORT ms (median) | x original (measured) | held-out top-1 | vs original | "
             "frontier (FLOPs) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["flops_ratio"], -r["top1"])):
        lines.append(f"| {r['name']} | {r['gflops']:.3f} ({r['flops_ratio']:.2f}x) | {r['ms']:.2f} | "
                     f"{r['ratio']:.2f}x | {r['top1']:.1f}% | "
                     f"{-r['drop']:+.1f} | {'*' if r['frontier'] else ''} |")
    goal = [r for r in rows if r["ratio"] >= 1.5 and r["drop"] <= 1.0]
    best_ok = max((r for r in rows if r["drop"] <= 1.0), key=lambda r: r["ratio"])
    lines += ["", f"goal (>= 1.5x, top-1 within 1.0 point): {'met by ' + ', '.join(r['name'] for r in goal) if goal else 'not met'}; "
              f"fastest within 1.0 point: {best_ok['name']} {best_ok['ratio']:.2f}x ({best_ok['top1']:.1f}%)"]
    md = "\n".join(lines) + "\n"
    print(md)
    atomic_write_text(out / "effnet_frontier.md", md)
    atomic_write_json(out / "effnet_frontier.json", {"date": date, "cpu": cpu, "args": vars(args),
                                                       "rows": [{k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in r.items()} for r in rows]})
    log(f"done in {time.monotonic() - t0:.0f} s; {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
