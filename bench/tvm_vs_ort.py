"""TVM (MetaSchedule-tuned, x86 target) vs onnxruntime on the same fp32 model, at several tuning budgets.

For each model and each budget (MetaSchedule trials per workload), in one process:
  1. a fresh tuning database; compile the original with graphopt's x86 target (tunes every
     workload), and time it against onnxruntime (ORT_ENABLE_ALL, same thread count), interleaved
     in rounds: prints TVM/ORT;
  2. compile a slightly mutated model (one conv's kernel grown by 2, graphopt's `kernel` pass on
     the first site) against the same database: prints how many workloads it reused and how
     many it had to tune, and the tuning seconds, vs tuning it from scratch.

    .venv/bin/python bench/tvm_vs_ort.py [--models efficientnet,minilm] [--budgets 2,4] [--rounds 3]

Tuning is minutes per model on a 2-core machine; run it on a quiet machine. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphopt.driver import materialize
from graphopt.genotype import Genotype, SearchSpace
from graphopt.modelio.ir import load_model
from graphopt.passes.kernel import KernelResize
from graphopt.plugin import MoveContext
from graphopt.targets.ort import OrtTarget
from graphopt.targets.x86 import X86Target

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "efficientnet": (ROOT / "models" / "efficientnet_lite0.onnx", ROOT / "models" / "efficientnet_lite0_calib.npz"),
    "minilm": (ROOT / "models" / "minilm.onnx", ROOT / "models" / "minilm_calib.npz"),
}
THREADS = 2


def log(msg: str) -> None:
    print(f"[tvm_vs_ort {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def feed_for(calib: Path, inputs) -> dict[str, np.ndarray]:
    data = np.load(calib)
    if len(inputs) == 1 and "input" in data.files and inputs[0].name not in data.files:
        return {inputs[0].name: data["input"][0]}
    return {i.name: data[i.name][0] for i in inputs}


def mutated(loaded):
    """The model with one conv's kernel grown by 2 (exact, new workload for that conv only)."""
    p = KernelResize()
    sites = p.sites(loaded.graph())
    if not sites:
        return None, "no kernel site"
    site = sites[0]
    grow = max(c for c in site.choices[1:])  # choices: keep, K-2, K+2
    geno = Genotype({site.key: grow})
    model, _ = materialize(loaded, SearchSpace(sites), geno, {"kernel": p}, MoveContext(base_model=loaded.proto))
    return model, f"{site.key} -> {grow}x{grow}"


def ort_ms(sess, feed, number: int = 10, repeat: int = 7) -> float:
    for _ in range(3):
        sess.run(None, feed)
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            sess.run(None, feed)
        samples.append((time.perf_counter() - t) * 1000 / number)
    return statistics.median(samples)


def bench_model(name: str, budgets: list[int], rounds: int, work: Path, db_root: Path) -> list[dict]:
    path, calib = MODELS[name]
    if not path.exists():
        log(f"{name}: {path} missing: run `make models`; skipped")
        return []
    loaded = load_model(path)
    feed = feed_for(calib, loaded.inputs)
    sess = ort.InferenceSession(str(path), OrtTarget(threads=THREADS)._options(), providers=["CPUExecutionProvider"])
    mut, mut_desc = mutated(loaded)
    rows = []
    for b in budgets:
        db = db_root / f"{name}-b{b}"  # kept: `graphopt run --tuning-db` can start from it
        shutil.rmtree(db, ignore_errors=True)
        tgt = X86Target(threads=THREADS, trials=b, tuning_db=str(db))
        log(f"{name}: tuning the original, {b} trials per workload (fresh database {db})")
        t0 = time.monotonic()
        art = tgt.compile(loaded.proto, work)
        compile_s = time.monotonic() - t0
        st = art.info["tuning"]
        log(f"{name} b={b}: {st['workloads_seen']} workloads tuned in {st['tuning_s']:.0f} s")
        tvm_r, ort_r = [], []
        for _ in range(rounds):
            tvm_r.append(tgt.measure(art, feed).latency.median_ms)
            ort_r.append(ort_ms(sess, feed))
        row = {"model": name, "trials_per_workload": b, "workloads": st["workloads_seen"],
               "tuning_s": st["tuning_s"], "compile_s": round(compile_s, 1),
               "untuned_workloads": st["workloads_untuned"],
               "tvm_ms": statistics.median(tvm_r), "ort_ms": statistics.median(ort_r),
               "tvm_rounds_ms": tvm_r, "ort_rounds_ms": ort_r}
        row["tvm_over_ort"] = row["tvm_ms"] / row["ort_ms"]
        if mut is not None:
            t0 = time.monotonic()
            mst = tgt.compile(mut, work).info["tuning"]
            row["mutation"] = mut_desc
            row["mutated"] = {k: mst[k] for k in ("workloads_seen", "workloads_reused", "workloads_tuned",
                                                  "tuning_s")}
            row["mutated"]["compile_s"] = round(time.monotonic() - t0, 1)
            log(f"{name} b={b} mutated ({mut_desc}): reused {mst['workloads_reused']}/{mst['workloads_seen']}, "
                f"tuned {mst['workloads_tuned']} in {mst['tuning_s']:.0f} s")
        tgt.close()
        rows.append(row)
        log(json.dumps(row))
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | trials/workload | workloads | tuning s | ORT ms | TVM ms | TVM/ORT | mutated: reused/seen, "
           "tuned, tuning s (vs from scratch) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r.get("mutated")
        mut = (f"{m['workloads_reused']}/{m['workloads_seen']}, {m['workloads_tuned']}, {m['tuning_s']:.0f} s "
               f"(vs {r['tuning_s']:.0f} s)") if m else "-"
        out.append(f"| {r['model']} | {r['trials_per_workload']} | {r['workloads']} | {r['tuning_s']:.0f} | "
                   f"{r['ort_ms']:.3f} | {r['tvm_ms']:.3f} | x{r['tvm_over_ort']:.2f} | {mut} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet,minilm")
    ap.add_argument("--budgets", default="2,4", help="MetaSchedule trials per workload, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tvm-vs-ort-", dir=args.out))
    rows = []
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            rows += bench_model(name, budgets, args.rounds, work, args.out / "tuning-db")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(rows)
    print(text)
    (args.out / "tvm_vs_ort.md").write_text(text + "\n")
    (args.out / "tvm_vs_ort.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
