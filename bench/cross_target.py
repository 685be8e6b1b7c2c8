"""Is the search compiler-aware? The best graph found for each target, measured on the other targets.

For one bundled model, in order:
  1. `graphopt run` once per target (ort, x86 tuned with a per-model budget, rpi4 --estimate), same
     passes, data, gate, seed and candidate budget; each run's best.onnx is its pick (a run whose
     out folder already holds best.onnx is not repeated: --rerun to force);
  2. the original and every pick, measured on every target in one process:
       ort   onnxruntime CPU (ORT_ENABLE_ALL, --threads), rounds interleaved across the graphs;
       x86   graphopt's x86 target, tuned through the x86 run's tuning database with the same budget
             options (a pick's new workloads get their share of it), rounds interleaved;
       rpi4  the Cortex-A72 cost model (targets/rpi4.py estimate_ms): estimated, no device;
  3. a table: rows are graphs (whose pick), columns are targets, cells ms and x speedup over the
     original on that column's target; the fastest cell of each column is marked, and the diagonal
     (a target's own pick on that target) is checked against it.

    nice -n 19 .venv/bin/python bench/cross_target.py --out /tmp/xt [--budget 8] [--x86-trials 200]

Latencies on a shared machine are noisy: only ratios within one column of one run mean anything.
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

from graphopt.targets.host import cpu_summary as cpu_model  # noqa: E402 (name, SIMD flags)

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"efficientnet": ("models/efficientnet_lite0.onnx", "models/loaders.py:effnet_photos", "imagenet_top1"),
          "minilm": ("models/minilm.onnx", "models/loaders.py:minilm_sentences", "sts_spearman")}
TITLES = {"efficientnet": "EfficientNet-Lite0", "minilm": "MiniLM (all-MiniLM-L6-v2, 128 tokens)"}
TARGETS = ("ort", "x86", "rpi4")


def log(msg: str) -> None:
    print(f"[cross_target {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def x86_opts(args) -> list[str]:
    return ["--target-opt", f"trials={args.x86_warm}", "--target-opt", f"tune_trials={args.x86_trials}",
            "--tuning-db", str(args.tuning_db)]


def search(target: str, args, model: str, data: str, metric: str) -> Path:
    out = args.out / target
    best = out / "best.onnx"
    if best.exists() and not args.rerun:
        log(f"{target}: reusing {best}")
        return best
    cmd = [str(ROOT / ".venv" / "bin" / "graphopt"), "run", model, "--target", target, "--threads", str(args.threads),
           "--passes", args.passes, "--data", data, "--metric", metric, "--max-drop", str(args.max_drop),
           "--select-samples", str(args.select_samples), "--strategy", args.strategy, "--budget", str(args.budget),
           "--seed", str(args.seed), "--out", str(out)]
    if target == "rpi4":
        cmd += ["--estimate", "--target-opt", "check=0"]
    if target == "x86":
        cmd += x86_opts(args)
    log(" ".join(cmd))
    t0 = time.monotonic()
    with open(args.out / f"{target}.log", "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    log(f"{target}: rc={rc} in {time.monotonic() - t0:.0f} s")
    if not best.exists():
        raise SystemExit(f"{target} search wrote no {best} (rc={rc}); see {args.out / f'{target}.log'}")
    return best


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def measure_all(graphs: dict[str, Path], args, feed) -> dict[str, dict[str, float]]:
    import onnx

    from graphopt.targets.ort import OrtTarget
    from graphopt.targets.rpi4 import estimate_ms
    from graphopt.targets.x86 import X86Target

    res: dict[str, dict[str, float]] = {g: {} for g in graphs}
    protos = {g: onnx.load(str(p)) for g, p in graphs.items()}
    from graphopt.modelio.ir import fold_constants

    for g, m in protos.items():  # as the rpi4 target estimates a candidate: constants folded, its threads
        res[g]["rpi4"] = estimate_ms(fold_constants(m), args.threads)[0]
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    ort_t = OrtTarget(threads=args.threads)
    ort_arts = {g: ort_t.compile(m, work) for g, m in protos.items()}
    on = set(args.measure_on.split(","))
    x86 = X86Target(threads=args.threads, trials=args.x86_warm, tune_trials=args.x86_trials,
                    tuning_db=str(args.tuning_db))
    x86_arts, tuning = {}, {}
    for g, m in (protos.items() if "x86" in on else ()):
        t0 = time.monotonic()
        art = x86.compile(m, work)
        x86_arts[g] = art
        st = art.info.get("tuning", {})
        tuning[g] = {k: st.get(k) for k in ("workloads_seen", "workloads_reused", "workloads_tuned", "trials",
                                            "workloads_untuned")}
        log(f"x86 compile {g}: {time.monotonic() - t0:.0f} s {json.dumps(tuning[g])}")
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for g in graphs:
            samples.setdefault((g, "ort"), []).append(ort_t.measure(ort_arts[g], feed).latency.median_ms)
            if g in x86_arts:
                samples.setdefault((g, "x86"), []).append(x86.measure(x86_arts[g], feed).latency.median_ms)
    for (g, t), v in samples.items():
        res[g][t] = statistics.median(v)
    x86.close()
    res["_tuning"] = tuning  # type: ignore[assignment]
    return res


def table(res, graphs, cpu: str, args, same: dict[str, str] | None = None) -> str:
    """`same`: graph name -> the earlier name of the identical graph (its twin), from main."""
    same = same or {}
    rows = [g for g in graphs]
    cols = [t for t in TARGETS if all(t in res[g] for g in rows)]
    best = {t: min(rows, key=lambda g: res[g][t]) for t in cols}
    head = (f"{TITLES[args.model]}, passes {args.passes}, {args.budget} candidates per search, seed {args.seed}; "
            f"{cpu}, {args.threads} threads; ort/x86 measured (median of {args.rounds} interleaved rounds), "
            f"rpi4 estimated (Cortex-A72 cost model).")
    out = [head, "", "| graph | ort ms | x86 (tuned TVM) ms | rpi4 estimate ms |", "|---|---|---|---|"]
    for g in rows:
        cells = []
        for t in TARGETS:
            if t not in cols:
                cells.append("not measured")
                continue
            v, base = res[g][t], res["original"][t]
            mark = " **best**" if best[t] == g and res[g][t] < min(res[o][t] for o in rows if o != g) else ""
            own = " (own pick)" if g == f"{t} pick" else ""
            cells.append(f"{v:.2f} (x{base / v:.2f}){mark}{own}")
        out.append(f"| {g} | " + " | ".join(cells) + " |")
    out.append("")
    for t in cols:
        own = f"{t} pick"
        if own not in res:
            continue
        if best[t] == own or res[own][t] <= res[best[t]][t]:
            out.append(f"- {t}: its own pick is the fastest on {t}.")
        elif same.get(own, own) == same.get(best[t], best[t]):
            out.append(f"- {t}: its own pick is the fastest on {t}: {best[t]} is the same graph, measured "
                       f"{res[best[t]][t]:.2f} vs {res[own][t]:.2f} ms (the spread of two measurements of one graph).")
        else:
            out.append(f"- {t}: its own pick ({res[own][t]:.2f} ms) is NOT the fastest on {t}: {best[t]} is "
                       f"({res[best[t]][t]:.2f} ms, x{res[own][t] / res[best[t]][t]:.2f}).")
    return "\n".join(out)


def candidate_table(out: Path) -> str:
    """The candidates the searches share (same strategy and seed: the same single moves), each
    one's latency as each search measured it (from its run store), ranked per target."""
    import sqlite3

    lat: dict[str, dict[str, float]] = {}
    fid: dict[str, float] = {}
    for t in TARGETS:
        db = out / t / "runs.sqlite"
        if not db.exists():
            continue
        con = sqlite3.connect(str(db))
        for geno, status, fidelity, ms in con.execute(
                "select genotype, status, fidelity, latency_ms from candidates"):
            fid[geno] = fidelity
            if status == "ok" and ms is not None:
                lat.setdefault(geno, {})[t] = float(ms)
        con.close()
    cols = [t for t in TARGETS if any(t in v for v in lat.values())]
    shared = [g for g, v in lat.items() if all(t in v for t in cols)]
    if len(cols) < 2 or not shared:
        return ""
    rank = {t: {g: i + 1 for i, g in enumerate(sorted(shared, key=lambda g: lat[g][t]))} for t in cols}
    lines = ["| candidate (genotype) | fidelity | " + " | ".join(f"{t} ms (rank)" for t in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for g in sorted(shared, key=lambda g: lat[g][cols[0]]):
        lines.append(f"| `{g if g != '{}' else 'original'}` | {fid[g]:.1f} | "
                     + " | ".join(f"{lat[g][t]:.2f} ({rank[t][g]})" for t in cols) + " |")
    n = len(shared)
    if n >= 3:
        for i, a in enumerate(cols):
            for b in cols[i + 1:]:
                d2 = sum((rank[a][g] - rank[b][g]) ** 2 for g in shared)
                lines.append(f"\nSpearman rank correlation {a} vs {b} over these {n} graphs: "
                             f"{1 - 6 * d2 / (n * (n * n - 1)):.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet", choices=sorted(MODELS))
    ap.add_argument("--passes", default="conv_bn,depthwise,kernel,width")
    ap.add_argument("--budget", default="8", help="candidates (or time) per search")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", default="sensitivity",
                    help="search strategy (sensitivity: single moves first, the same candidates on every target)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-drop", type=float, default=2.0, help="gate: top-1 agreement points below the original")
    ap.add_argument("--select-samples", type=int, default=64)
    ap.add_argument("--x86-warm", type=int, default=4, help="x86: warm-up trials per new workload")
    ap.add_argument("--x86-trials", type=int, default=400, help="x86: per-model trial budget (tune_trials)")
    ap.add_argument("--tuning-db", type=Path, default=None, help="x86 tuning database root (default OUT/tuning-db)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="which searches to run/reuse")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--measure-on", default=",".join(TARGETS),
                    help="targets to measure every graph on (x86 tunes each graph's new workloads: minutes each)")
    ap.add_argument("--rerun", action="store_true", help="repeat searches whose best.onnx exists")
    ap.add_argument("--search-only", action="store_true", help="run the searches, measure nothing")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.tuning_db = args.tuning_db or args.out / "tuning-db"
    model, data, metric = MODELS[args.model]
    cpu = cpu_model()
    log(f"CPU: {cpu}")
    picks = {f"{t} pick": search(t, args, model, data, metric) for t in args.targets.split(",") if t}
    cand = candidate_table(args.out)
    if cand:
        print("Feasible candidates of the searches, latency as each search measured it (one measurement each):\n")
        print(cand + "\n", flush=True)
    if args.search_only:
        return
    graphs: dict[str, Path] = {"original": ROOT / model}
    seen = {digest(ROOT / model): "original"}
    same: dict[str, str] = {}
    for name, p in picks.items():
        d = digest(p)
        if d in seen:
            same[name] = seen[d]
        seen.setdefault(d, name)
        graphs[name] = p
    for a, b in same.items():
        log(f"{a} is the same graph as {b}")
    import numpy as np

    from graphopt.modelio.ir import load_model

    sys.path.insert(0, str(ROOT / "bench"))
    from tvm_vs_ort import MODELS as CALIB
    from tvm_vs_ort import feed_for

    feed = feed_for(CALIB[args.model][1], load_model(ROOT / model).inputs)  # one calibration sample
    res = measure_all(graphs, args, feed)
    text = table(res, graphs, cpu, args, same)
    if cand:
        text += "\n\nFeasible candidates of the searches, latency as each search measured it:\n\n" + cand
    if same:
        text += "\n" + "\n".join(f"- {a} is the same graph as {b}." for a, b in same.items())
    print(text)
    (args.out / "cross_target.md").write_text(text + "\n")
    (args.out / "cross_target.json").write_text(json.dumps({"cpu": cpu, "results": res,
                                                             "graphs": {k: str(v) for k, v in graphs.items()}},
                                                            indent=1))


if __name__ == "__main__":
    main()
