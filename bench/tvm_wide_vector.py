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


def best_us(ms, task, target, space, trials: int) -> float | None:
    from graphopt.targets import tuning_ms

    db = ms.database.MemoryDatabase()
    with tempfile.TemporaryDirectory() as wd:
        ctxs, w = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [task], work_dir=wd, num_threads=2, seed=0, strategy=tuning_ms.search_strategy(ms, trials), space=space)
        ms.tune.tune_tasks(tasks=ctxs, task_weights=w, work_dir=wd, max_trials_global=trials,
                           max_trials_per_task=trials, num_trials_per_iter=16, builder=tuning_ms.local_builder(ms),
                           runner=tuning_ms.local_runner(ms), database=db)
    runs = [sum(float(s) for s in r.run_secs) / len(r.run_secs) for r in db.get_all_tuning_records() if r.run_secs]
    return min(runs) * 1e6 if runs else None


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
    print(f"CPU: {tc.cpu_model_name()}; target {tgt.target_json()}; vector {bits} bits; TVM {tc.tvm_version()}; "
          f"2 threads; {args.model} {args.layout}; {args.trials} trials per workload in each space")
    rows = []
    for t in chosen:
        row = {"workload": t.task_name, "calls": int(t.weight)}
        for kind, space in (("default", "post-order-apply"), ("wide", tuning_ms.space(ms, tgt.target, bits))):
            t0 = time.monotonic()
            row[f"{kind}_us"] = best_us(ms, t, tgt.target, space, args.trials)
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
    (args.out / "tvm_wide_vector.json").write_text(json.dumps({"cpu": tc.cpu_model_name(), "vector_bits": bits,
                                                               "model": args.model, "layout": args.layout,
                                                               "trials": args.trials, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
