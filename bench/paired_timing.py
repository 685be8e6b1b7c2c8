"""How far a search's one measurement per candidate strays on this shared host, with and without
paired timing (graphopt/timing.py): searches of exact moves, whose true speedup is 1.

    .venv/bin/python bench/paired_timing.py [--target ort|x86] [--budget 16] [--runs 3] [--tuning-db DIR] [--out DIR]

Each run is a real search (graphopt.api.optimize) of EfficientNet-Lite0 over `conv_bn` site by
site (`--search-exact`): every candidate folds some BatchNorms into their convs, which onnxruntime
does itself at load, and the x86 target before import, so every candidate computes the same
function at the same speed as the original. With paired timing on, each record holds both
estimates a search could rank it by:
  unpaired: the original's latency at the start of the search / the candidate's latency;
  paired:   the original timed again right after the candidate / the candidate's latency.
Both should be 1.0. The bench prints each candidate's two ratios, then per estimate the median and
largest |ratio - 1| and how many candidates it misreads by more than 5% (a search would credit or
blame an exact move), over all runs. At the end, `--check K` candidates are re-timed alternately
with the original (5 rounds) to show their speedup is 1. Run it alone (nice -n 5); the host line
says where it ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphopt.api import optimize  # noqa: E402
from graphopt.targets.host import cpu_summary  # noqa: E402


def ratios(out: Path) -> list[dict]:
    """Per measured candidate of one run: its unpaired and paired ratio (from runs.sqlite)."""
    import sqlite3

    with sqlite3.connect(out / "runs.sqlite") as db:
        rows = db.execute("SELECT id, genotype, status, measurement FROM candidates WHERE measurement IS NOT NULL "
                          "AND duplicate_of IS NULL ORDER BY id").fetchall()
    base = next(json.loads(m) for _, g, s, m in rows if json.loads(g) == {})
    base_ms = base["latency"]["median_ms"]
    res = []
    for cid, g, s, m in rows:
        m = json.loads(m)
        p = (m.get("extra") or {}).get("paired")
        if json.loads(g) == {} or s != "ok" or not p:
            continue
        res.append({"id": cid, "unpaired": base_ms / p["raw_ms"], "paired": p["original_ms"] / p["raw_ms"],
                    "raw_ms": p["raw_ms"], "original_now_ms": p["original_ms"], "original_first_ms": base_ms})
    return res


def check(out: Path, ids: list[int], target: str, threads: int, rounds: int = 5, **opts) -> list[tuple[int, float]]:
    """Each candidate re-timed alternately with the original: (id, median original / median candidate)."""
    from graphopt.modelio.ir import load_model
    from graphopt.registry import TARGETS
    from graphopt.runstore.runs import export_candidate
    from graphopt.timing import measure_feeds

    tgt = TARGETS.get(target)(threads=threads, **opts)
    work = Path(tempfile.mkdtemp(prefix="paired-check-"))
    x = load_model(ROOT / "models" / "efficientnet_lite0.onnx")
    feed = {x.inputs[0].name: np.random.default_rng(0).standard_normal(x.inputs[0].shape).astype(np.float32)}
    orig = tgt.compile(x.proto, work / "orig")
    out_rows = []
    for cid in ids:
        path = export_candidate(out, cid, work / f"c{cid}.onnx")
        cand = tgt.compile(load_model(path).proto, work / f"c{cid}")
        b, c = [], []
        for _ in range(rounds):
            b.append(measure_feeds(tgt, orig, [feed]).latency.median_ms)
            c.append(measure_feeds(tgt, cand, [feed]).latency.median_ms)
        out_rows.append((cid, statistics.median(b) / statistics.median(c)))
    tgt.close()
    return out_rows


def summary(name: str, values: list[float]) -> str:
    dev = sorted(abs(v - 1.0) for v in values)
    off = sum(d > 0.05 for d in dev)
    return (f"| {name} | {len(values)} | {statistics.median(dev) * 100:.1f}% | {dev[-1] * 100:.1f}% | "
            f"{min(values):.3f}-{max(values):.3f} | {off} ({off / len(values):.0%}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="ort", choices=["ort", "x86"])
    ap.add_argument("--budget", type=int, default=16, help="candidates per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tuning-db", help="x86: the tuning database root (a tuned one: the bench tunes nothing new "
                    "with it; default: the target's)")
    ap.add_argument("--check", type=int, default=3, help="candidates re-timed alternately at the end")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder, removed)")
    args = ap.parse_args()
    print(f"host: {cpu_summary()}")
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; target {args.target}, "
          f"{args.threads} threads; {args.runs} runs x {args.budget} candidates")
    root = args.out or Path(tempfile.mkdtemp(prefix="paired-timing-"))
    rows = []
    for i in range(args.runs):
        out = root / f"run{i}"
        t0 = time.monotonic()
        optimize(ROOT / "models" / "efficientnet_lite0.onnx", args.target, passes="conv_bn", search_exact=True,
                 budget=args.budget, seed=i, out=out, data=f"{ROOT}/models/loaders.py:effnet_photos",
                 select_samples=16, confirm_rounds=0, ort_reference=False, target_options={"threads": args.threads,
                                 **({"tuning_db": args.tuning_db} if args.tuning_db else {})})
        r = ratios(out)
        rows += r
        print(f"run {i} ({time.monotonic() - t0:.0f} s): original first {r[0]['original_first_ms']:.3f} ms; "
              + ", ".join(f"#{x['id']} {x['unpaired']:.3f}/{x['paired']:.3f}" for x in r) + "  (unpaired/paired)")
    print("\n| estimate | candidates | median abs(ratio - 1) | largest | range | misread by > 5% |\n|---|---|---|---|---|---|")
    print(summary("unpaired (original timed once, at the start)", [x["unpaired"] for x in rows]))
    print(summary("paired (original timed right after each)", [x["paired"] for x in rows]))
    if args.check:
        last = root / f"run{args.runs - 1}"
        ids = [x["id"] for x in ratios(last)][:args.check]
        for cid, r in check(last, ids, args.target, args.threads,
                            **({"tuning_db": args.tuning_db} if args.tuning_db else {})):
            print(f"check: run {args.runs - 1} candidate {cid}: original / candidate over 5 alternating rounds x{r:.3f}")
    if args.out is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
