"""MetaSchedule's default x86 space vs the full-width-vector space the x86 target tunes in.

TVM's MultiLevelTiling samples the innermost tile of a kernel freely, so a tuned kernel often
vectorizes at 8 or 4 float32 lanes on a CPU with 16 (AVX-512). The x86 target's `wide_vector`
option (default on; targets/tuning_ms.space) replaces it with MultiLevelTilingWideVector, which
always vectorizes the innermost output axis at the CPU's width. This bench tunes the same
workloads of a bundled model in both spaces, each from an empty in-memory database with the same
trials and seed, and prints each one's best record and the ratio, measured in the same run.

    .venv/bin/python bench/tvm_wide_vector.py [--model efficientnet] [--layout nhwc] [--trials 48] \\
        [--tasks NAME,NAME | --top 3] [--out bench/out]

Prints the CPU and its vector width, then a table: best us per workload in each space.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# EfficientNet-Lite0's three 1x1 convs with the most time in a tuned NHWC model (docs/compiler.md)
DEFAULT_TASKS = ("fused_conv2d26_add20_maximum10_minimum10", "fused_conv2d28_add19_add21",
                 "fused_conv2d6_add5_maximum3_minimum3")


def best_us(ms, task, target, bits: int, trials: int) -> float | None:
    """The best record of `task` tuned `trials` trials from an empty database, the way the x86
    target tunes (tuning._tune_tasks) with vector_bits=`bits` (0: TVM's space)."""
    from graphopt.targets import tuning

    db = ms.database.MemoryDatabase()
    with tempfile.TemporaryDirectory() as wd:
        tuning._tune_tasks(ms, [task], target, db, Path(wd), trials, None, None, 2, 0, bits)
    best = tuning.task_best_seconds(db, task)
    return None if best is None else best * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet", choices=("efficientnet", "minilm"))
    ap.add_argument("--layout", default="nhwc", choices=("nchw", "nhwc"))
    ap.add_argument("--trials", type=int, default=48, help="trials per workload in each space")
    ap.add_argument("--tasks", default=None, help="comma-separated workload names (default: three 1x1 convs "
                    "of EfficientNet-Lite0; with --top, the most-called workloads)")
    ap.add_argument("--top", type=int, default=0, help="the N most-called workloads instead of --tasks")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args(argv)

    from tvm_vs_ort import MODELS

    from graphopt.modelio.ir import load_model
    from graphopt.targets import tuning, tuning_ms
    from graphopt.targets import tvm_common as tc
    from graphopt.targets.x86 import X86Target

    tgt = X86Target(threads=2, trials=1, layout=args.layout)
    tc.load_tvm(2)
    import tvm.s_tir.meta_schedule as ms

    tuning._quiet_meta_schedule()
    bits = tuning_ms.vector_bits(tgt.target)
    if not bits:
        print("this CPU has no AVX2/AVX-512: the x86 target tunes in TVM's default space here", file=sys.stderr)
        return 2
    _, fused = tuning.prepare(tgt.relax_module(load_model(MODELS[args.model][0]).proto), tgt.target)
    tasks = ms.relax_integration.extract_tasks(fused, tgt.target)
    if args.top:
        chosen = sorted(tasks, key=lambda t: -int(t.weight))[:args.top]
    else:
        names = args.tasks.split(",") if args.tasks else DEFAULT_TASKS if args.model == "efficientnet" else ()
        chosen = [t for t in tasks if t.task_name in names]
        if not chosen:
            print(f"none of {names} is a workload of {args.model}; try --top 3", file=sys.stderr)
            return 2
    print(f"CPU: {tc.cpu_summary()}; target {tgt.target_json()}; vector {bits} bits; TVM {tc.tvm_version()}; "
          f"2 threads; {args.model} {args.layout}; {args.trials} trials per workload in each space")
    rows = []
    for t in chosen:
        row = {"workload": t.task_name, "calls": int(t.weight)}
        for kind, b in (("default", 0), ("wide", bits)):
            t0 = time.monotonic()
            row[f"{kind}_us"] = best_us(ms, t, tgt.target, b, args.trials)
            row[f"{kind}_s"] = round(time.monotonic() - t0, 1)
        if row["default_us"] and row["wide_us"]:
            row["default_over_wide"] = round(row["default_us"] / row["wide_us"], 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("\n| workload | calls | default space, best us | wide, best us | default / wide |\n|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: "failed" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {r['workload']} | {r['calls']} | {fmt(r['default_us'])} | {fmt(r['wide_us'])} | "
              f"x{r.get('default_over_wide', '-')} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tvm_wide_vector.json").write_text(json.dumps({"cpu": tc.cpu_summary(), "vector_bits": bits,
                                                               "model": args.model, "layout": args.layout,
                                                               "trials": args.trials, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
