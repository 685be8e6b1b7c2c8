"""Re-time a tuning database's best records with the CPU caches flushed, and keep the winner.

MetaSchedule ranks a workload's records by their time with hot caches (its runner repeats the
kernel on the same weights); inside the model each kernel reads weights another kernel evicted,
and the models ran 1.3-1.5x slower than their records add up to (docs/compiler.md). This bench
takes the workloads that hold most of the model's time, builds each of their top-K records,
times it with the cache flushed before each call (`cache_flush_cpu_non_first_arg`), and builds
the model twice in one run: with the database as tuned (hot winner), and with each retimed
workload's flushed winner first. Both models are then timed alternately, next to onnxruntime.

    .venv/bin/python bench/tvm_retime.py --tuning-db DB_ROOT [--model minilm] [--top 8] [--k 8]

DB_ROOT is the root the x86 target was given (`--tuning-db`), e.g. a tvm_tuning_curve.py run's
`OUT/tuning-db/minilm-curve`. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def log(msg: str) -> None:
    print(f"[retime {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def time_record(rec, target, dev, runs: int) -> tuple[float, float]:
    """(hot s, flushed s) of one tuning record's schedule, built alone (tvm_profile.time_kernel)."""
    import tvm
    from tvm_profile import time_kernel

    sch = tvm.s_tir.Schedule(rec.workload.mod)
    rec.trace.apply_to_schedule(sch, remove_postproc=False)
    return time_kernel(sch.mod["main"], target, dev, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", choices=("minilm", "efficientnet"))
    ap.add_argument("--tuning-db", type=Path, required=True)
    ap.add_argument("--top", type=int, default=8, help="workloads to retime (most time first)")
    ap.add_argument("--k", type=int, default=8, help="records per workload")
    ap.add_argument("--runs", type=int, default=15, help="flushed timings per record (median)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating model timings")
    args = ap.parse_args()

    import onnxruntime as ort
    from tvm_vs_ort import MODELS, THREADS, feed_for, ort_ms

    from graphopt.modelio.ir import load_model
    from graphopt.plugin import Artifact
    from graphopt.targets import tuning
    from graphopt.targets import tvm_common as tc
    from graphopt.targets.ort import OrtTarget
    from graphopt.targets.x86 import X86Target

    path, calib = MODELS[args.model]
    loaded = load_model(path)
    feed = feed_for(calib, loaded.inputs)
    tgt = X86Target(threads=THREADS, trials=1, tuning_db=str(args.tuning_db))
    tvm = tc.load_tvm(THREADS)
    import tvm.s_tir.meta_schedule as ms

    tuning._quiet_meta_schedule()
    target, dev = tgt.target, tvm.cpu()
    prepared, fused = tuning.prepare(tgt.relax_module(loaded.proto), target)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    db = tuning.open_db(tgt.tuning_db_dir)
    known = [(t, tuning.task_best_seconds(db, t)) for t in tasks]
    known = sorted([(t, s) for t, s in known if s is not None], key=lambda ts: -ts[1] * float(ts[0].weight))
    new = ms.database.MemoryDatabase(module_equality="structural")
    rows = []
    for i, (task, best) in enumerate(known):
        wl = db.commit_workload(task.dispatched[0])
        top = db.get_top_k(wl, args.k if i < args.top else 1)
        pick = top[0]
        timed = []
        if i < args.top and len(top) > 1:  # (a workload whose records no longer build keeps its hot winner)
            for rec in top:
                try:
                    timed.append((rec, *time_record(rec, target, dev, args.runs)))
                except Exception as e:  # noqa: BLE001 - a record that no longer builds is skipped
                    log(f"{task.task_name}: a record did not build ({type(e).__name__}: {str(e).splitlines()[-1][:200]})")
        if i < args.top and len(top) > 1 and timed:
            pick, hot, cold = min(timed, key=lambda r: r[2])
            first = timed[0]
            rows.append((task.task_name, float(task.weight), first[1] * 1e6, first[2] * 1e6, hot * 1e6, cold * 1e6,
                         top.index(pick) if pick in top else -1))
            log(f"{task.task_name} x{float(task.weight):.0f}: hot winner {first[1] * 1e6:.1f}/{first[2] * 1e6:.1f} us "
                f"(hot/flushed); flushed winner is record #{rows[-1][-1]}: {hot * 1e6:.1f}/{cold * 1e6:.1f} us")
        nwl = new.commit_workload(task.dispatched[0])
        new.commit_tuning_record(ms.database.TuningRecord(pick.trace, nwl, [1e-6], target, pick.args_info))
    specs = tc.input_specs(loaded.proto)
    info = {"inputs": [(n, list(s), d) for n, s, d in specs], "tuned": True}
    arts = {"hot winners": Artifact(target="x86", files=[], handle=tuning.build_with_db(db, prepared, target), info=info),
            "flushed winners": Artifact(target="x86", files=[], handle=tuning.build_with_db(new, prepared, target),
                                        info=info)}
    sess = ort.InferenceSession(str(path), OrtTarget(threads=THREADS)._options(), providers=["CPUExecutionProvider"])
    res: dict[str, list[float]] = {k: [] for k in list(arts) + ["onnxruntime"]}
    for _ in range(args.rounds):
        for k, a in arts.items():
            res[k].append(tgt.measure(a, feed).latency.median_ms)
        res["onnxruntime"].append(ort_ms(sess, feed))
    print(f"{args.model}: {tc.cpu_summary()}, {THREADS} threads; top {args.top} workloads, {args.k} records each, "
          f"{args.runs} flushed timings per record\n")
    print("| workload | calls | hot winner us (hot / flushed) | flushed winner us (hot / flushed) | its hot rank |")
    print("|---|---|---|---|---|")
    for name, w, h0, c0, h1, c1, rank in rows:
        print(f"| {name} | {w:.0f} | {h0:.1f} / {c0:.1f} | {h1:.1f} / {c1:.1f} | {rank} |")
    ort_med = statistics.median(res["onnxruntime"])
    print("\n| build | model ms (median of rounds) | vs onnxruntime |\n|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {statistics.median(v):.2f} | x{statistics.median(v) / ort_med:.2f} |")


if __name__ == "__main__":
    main()
