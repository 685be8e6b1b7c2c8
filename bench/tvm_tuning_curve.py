"""Model latency vs tuning time on the x86 target, with a per-model budget spent where the latency is.

For each model, in one process, from a fresh tuning database:
  1. the budgeted tuner of targets/tune_budget.py (warm-up trials for every workload, then rounds of
     `step` trials on the workloads with the largest expected gain) runs for --tune-time seconds;
  2. at checkpoints (after the warm-up, then every --every seconds of tuning) the model is built
     from the database and timed against onnxruntime (ORT_ENABLE_ALL, same threads), interleaved:
     prints TVM ms, ORT ms and TVM/ORT, with the tuning seconds and trials so far (build and
     measuring time are not counted as tuning time);
  3. a mutated model (one conv's kernel grown by 2) is compiled with graphopt's x86 target and the
     same budget options against the same database: how many workloads it reused, and its tuning s;
  4. the profile: the workloads with the largest share of the tuned model's time (calls x best time);
  5. with --refine K (default 4, the x86 default), before 3: the in-model selection of
     targets/in_model.py (the top-K records of each heavy workload timed inside the model); its
     seconds count as tuning time, and its point is the table's last row, marked "in-model".

With --quantize dynamic|static the model tuned is graphopt's int8 form of it (dynamic: every
MatMul with a constant weight, passes/int8.quantize_dynamic_nodes; static: QDQ on every op the
quantizer supports, calibrated on the model's calibration samples), lowered onto the x86 target's
int8 kernels (`int8_kernels=auto`: vpdpbusd with AVX-512 VNNI). TVM/ORT is then against
onnxruntime running the *fp32* original (what a user compares against); the table adds
onnxruntime running the same int8 model, and the log the largest output difference between TVM's
int8 model and onnxruntime's. Task quality of the int8 forms: bench/task_quality.py. No second
(mutated) compile.

    nice -n 19 .venv/bin/python bench/tvm_tuning_curve.py [--models efficientnet] [--tune-time 1200]

Tuning is minutes per model on a 2-core machine; run it on a quiet machine. See docs/compiler.md.
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

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tvm_vs_ort import MODELS, THREADS, feed_for, mutated, ort_ms  # noqa: E402

from graphopt.targets.host import cpu_summary as cpu_model  # noqa: E402 (name, SIMD flags)
from graphopt.modelio.ir import load_model  # noqa: E402
from graphopt.plugin import Artifact  # noqa: E402
from graphopt.targets.ort import OrtTarget  # noqa: E402
from graphopt.targets.x86 import X86Target  # noqa: E402


def log(msg: str) -> None:
    print(f"[tuning_curve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def curve(name: str, args, work: Path, db_root: Path) -> dict:
    from graphopt.targets import tuning
    from graphopt.targets import tvm_common as tc

    path, calib = MODELS[name]
    loaded = load_model(path)
    feed = feed_for(calib, loaded.inputs)
    sess = ort.InferenceSession(str(path), OrtTarget(threads=THREADS)._options(), providers=["CPUExecutionProvider"])
    model, qsess = quantized(loaded.proto, calib, args.quantize)
    if not args.resume:
        shutil.rmtree(db_root, ignore_errors=True)
    tgt = X86Target(threads=THREADS, trials=args.warm, tuning_db=str(db_root), tune_time=args.tune_time,
                    tune_trials=args.tune_trials, canonicalize=args.canonicalize, layout=args.layout,
                    tune_cache_flush=args.tune_cache_flush, prepack=args.prepack,
                    wide_vector=args.wide_vector, pad_channels=args.pad_channels, refine=args.refine,
                    alloc_in_model=args.alloc_in_model, vm_exec=args.vm_exec)
    db_dir = tgt.tuning_db_dir  # the folder graphopt's x86 target uses too (the mutated compile below)
    tgt.budget.step, tgt.budget.per_round, tgt.budget.warm_batch = args.step, args.per_round, args.warm_batch
    tgt.budget.gain_window = args.gain_window
    tc.load_tvm(THREADS)
    import tvm.s_tir.meta_schedule as ms

    tuning._quiet_meta_schedule()
    target = tgt.target
    log(f"{name}: target {tgt.target_json()}; vector_bits {tgt.vector_bits}; int8_kernels {tgt.int8_kernels}")
    mod = tgt.relax_module(model)  # what the x86 target tunes and builds (canonicalized, its layout)
    prepared, fused = tuning.prepare(mod, target, prepack=tgt.prepack)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    db = tuning.open_db(db_dir)
    specs = tc.input_specs(loaded.proto)
    points: list[dict] = []
    t_start = time.monotonic()
    paused = [0.0]
    last = [-1e9]
    stats = tuning.TuningStats()
    base_trials = [0]  # trials the resumed database's workloads count as (warm each): not this run's

    def checkpoint(rnd: int, states, ex=None) -> None:
        tp = time.monotonic()
        tuned_s = tp - t_start - paused[0] + args.offset_s
        trials = sum(s.trials for s in states) - base_trials[0] + args.offset_trials
        ex_given = ex is not None
        ex = ex if ex_given else tuning.build_with_db(db, prepared, target, prepack=tgt.prepack, exec_mode=tgt.vm_exec)
        art = Artifact(target="x86", files=[], handle=ex, info={"inputs": [(n, list(s), d) for n, s, d in specs],
                                                                "tuned": True})
        tv, orr, orq = [], [], []
        for _ in range(args.rounds):
            tv.append(tgt.measure(art, feed).latency.median_ms)
            orr.append(ort_ms(sess, feed))
            if qsess is not None:
                orq.append(ort_ms(qsess, feed))
        est = sum(s.share_s for s in states) * 1000
        row = {"round": rnd, "tuning_s": round(tuned_s, 1), "trials": trials, "tvm_ms": statistics.median(tv),
               "ort_ms": statistics.median(orr), "db_estimate_ms": round(est, 3),
               "untuned": sum(1 for s in states if s.best_s is None), "in_model": ex_given}
        # the median of per-round ratios: this host's speed can change between rounds (tvm_db_compare.py)
        row["tvm_over_ort"] = statistics.median(a / b for a, b in zip(tv, orr))
        if orq:
            row["ort_int8_ms"] = statistics.median(orq)
            row["max_diff_vs_ort_int8"] = max(float(abs(a - b).max()) for a, b in
                                              zip(tgt.run_once(art, feed), qsess.run(None, feed)))
        points.append(row)
        log(json.dumps(row))
        paused[0] += time.monotonic() - tp

    def on_round(rnd: int, states) -> None:
        tuned_s = time.monotonic() - t_start - paused[0]
        if rnd == 1 or tuned_s - last[0] >= args.every:
            last[0] = tuned_s
            checkpoint(rnd, states)

    log(f"{name}: {len(tasks)} workloads; budget tune_time={args.tune_time} s tune_trials={args.tune_trials} "
        f"warm={args.warm} step={args.step} per_round={args.per_round}")
    captured: dict = {}

    def on_round_keep(rnd, states):
        captured["states"] = states
        on_round(rnd, states)

    # resumed: the workloads the database knows count as warmed up (tuning._spend_budget); their
    # trials belong to the earlier run (--offset-trials), not to this one
    base_trials[0] = args.warm * sum(1 for t in tasks if tuning.task_best_seconds(db, t) is not None)
    tuning._spend_budget(ms, list(tasks), len(tasks), tgt.budget, target, db, work, None, None, THREADS, 0, None,
                         stats, on_round=on_round_keep, vector_bits=tgt.vector_bits, prepared=prepared,
                         prepack=tgt.prepack)
    states = captured.get("states", [])
    if points and points[-1]["trials"] != sum(s.trials for s in states):
        checkpoint(len(stats.budget.get("per_round", [])), states)
    refine = None
    if args.refine >= 2:  # the x86 target's in-model selection (targets/in_model.py), counted as tuning time
        from graphopt.targets import in_model

        ex, refine = in_model.build(db, db_dir, prepared, tasks, target, k=args.refine,
                                    build_fn=lambda d: tuning.build_with_db(d, prepared, target, prepack=tgt.prepack),
                                    final_fn=lambda d: tuning.build_with_db(d, prepared, target, prepack=tgt.prepack,
                                                                            exec_mode=tgt.vm_exec))
        log(f"{name}: in-model selection: {json.dumps(refine)}")
        checkpoint(len(stats.budget.get("per_round", [])), states, ex=ex)
    total_s = time.monotonic() - t_start - paused[0]
    log(f"{name}: budget done: {stats.budget.get('rounds')} rounds, {stats.trials} trials, {total_s:.0f} s tuning "
        f"({stats.budget.get('stopped_because')}); in-model profiles: {json.dumps(stats.budget.get('profiles'))}")
    keyed = {f"{k}:{t.task_name}": t for k, t in enumerate(tasks)}
    prof = sorted(states, key=lambda s: -s.share_s)
    total = sum(s.share_s for s in prof) or 1.0
    profile = [{"task": s.name.split(":", 1)[1], "calls": float(keyed[s.name].weight), "trials": s.trials,
                "best_us": None if s.best_s is None else round(s.best_s * 1e6, 1),
                "share": round(s.share_s / total, 3), **({"in_model_x": round(s.scale, 2)} if s.scale != 1.0 else {})}
               for s in prof[:args.top]]
    out = {"model": name, "quantize": args.quantize, "int8_kernels": tgt.int8_kernels, "workloads": len(tasks), "points": points, "tuning_s": round(total_s, 1), "refine": refine,
           "trials": stats.trials, "budget": {k: v for k, v in stats.budget.items() if k != "per_round"},
           "profile": profile}
    mut, mut_desc = mutated(loaded) if qsess is None else (None, None)
    if mut is not None:  # the second compile: graphopt's x86 target, same budget options, same database
        t0 = time.monotonic()
        mst = tgt.compile(mut, work).info["tuning"]
        out["mutated"] = {"mutation": mut_desc, "compile_s": round(time.monotonic() - t0, 1),
                          **{k: mst[k] for k in ("workloads_seen", "workloads_reused", "workloads_tuned",
                                                 "trials", "tuning_s")}}
        log(f"{name} mutated: {json.dumps(out['mutated'])}")
    tgt.close()
    return out


def quantized(proto, calib: Path, how: str):
    """(model to tune, onnxruntime session of it or None): `proto` itself for "none", else its int8 form."""
    if how == "none":
        return proto, None
    import numpy as np

    from graphopt.passes import int8

    if how == "dynamic":
        q = int8.quantize_dynamic_nodes(proto, int8._dynamic_candidates(proto))
    else:
        with np.load(calib) as z:
            q = int8.quantize(proto, {k: z[k] for k in z.files}, None)
    so = OrtTarget(threads=THREADS)._options()
    return q, ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])


def table(res: dict, cpu: str) -> str:
    q = res.get("quantize", "none") != "none"
    out = [f"### {res['model']}{' int8 ' + res['quantize'] if q else ''} ({res['workloads']} workloads; {cpu}, "
           f"{THREADS} threads{'; int8_kernels ' + res['int8_kernels'] if q else ''})", "",
           "| tuning s | trials | untuned | ORT fp32 ms |" + (" ORT int8 ms |" if q else "") + " TVM ms | TVM/ORT |",
           "|---|---|---|---|---|---|" + ("---|" if q else "")]
    for p in res["points"]:
        out.append(f"| {p['tuning_s']:.0f}{' in-model' if p.get('in_model') else ''} | {p['trials']} | {p['untuned']} | "
                   f"{p['ort_ms']:.2f} |" + (f" {p['ort_int8_ms']:.2f} |" if q else "") +
                   f" {p['tvm_ms']:.2f} | x{p['tvm_over_ort']:.2f} |")
    m = res.get("mutated")
    if m:
        out += ["", f"Second compile ({m['mutation']}): reused {m['workloads_reused']}/{m['workloads_seen']}, tuned "
                f"{m['workloads_tuned']} with {m['trials']} trials in {m['tuning_s']:.0f} s "
                f"(compile {m['compile_s']:.0f} s) "
                f"vs {res['tuning_s']:.0f} s for the first."]
    out += ["", "| workload | calls | trials | best us | share of TVM time |", "|---|---|---|---|---|"]
    for p in res["profile"]:
        out.append(f"| {p['task']} | {p['calls']:.0f} | {p['trials']} | {p['best_us']} | {p['share']:.1%} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet")
    ap.add_argument("--tune-time", type=float, default=1200.0, help="tuning seconds per model (default 1200)")
    ap.add_argument("--tune-trials", type=int, default=None, help="trial budget per model (default: none)")
    ap.add_argument("--warm", type=int, default=8, help="warm-up trials per workload")
    ap.add_argument("--step", type=int, default=16, help="trials per workload in a later round")
    ap.add_argument("--per-round", type=int, default=4, help="workloads per later round")
    ap.add_argument("--warm-batch", type=int, default=16, help="new workloads per warm-up round")
    ap.add_argument("--every", type=float, default=180.0, help="seconds of tuning between checkpoints")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved TVM/ORT timing rounds per checkpoint")
    ap.add_argument("--resume", action="store_true", help="keep the database of an earlier run (its workloads "
                    "count as warmed up) and go on tuning")
    ap.add_argument("--offset-s", type=float, default=0.0, help="resumed: tuning seconds the earlier run spent")
    ap.add_argument("--offset-trials", type=int, default=0, help="resumed: trials the earlier run spent")
    ap.add_argument("--canonicalize", type=int, default=1, help="x86 target option (1: BN and zero Pads folded first)")
    ap.add_argument("--layout", default="auto", choices=("auto", "nchw", "nhwc"), help="x86 target option")
    ap.add_argument("--tune-cache-flush", type=int, default=0, help="x86 target option (1: tune with caches flushed)")
    ap.add_argument("--prepack", type=int, default=0, help="x86 target option (1: weights pre-packed in the layout "
                    "the schedules chose)")
    ap.add_argument("--wide-vector", type=int, default=1, help="x86 target option (1: tune with full-width "
                    "vectors, the default; 0: TVM's default space)")
    ap.add_argument("--pad-channels", type=int, default=1, help="x86 target option (1: in NHWC, conv channels "
                    "padded to the vector width, the default; 0: off)")
    ap.add_argument("--refine", type=int, default=4, help="x86 target option: after the budget, time the top-K "
                    "records of the heavy workloads inside the model and keep the fastest there (0: off)")
    ap.add_argument("--alloc-in-model", type=int, default=0, help="x86 target option (1: the budget weighs "
                    "workloads by their kernels' time in the model, profiled after the warm-up and every 300 s)")
    ap.add_argument("--gain-window", type=int, default=3, help="rounds a workload's expected improvement is "
                    "averaged over (targets/tune_budget.py GAIN_WINDOW; 1: its last round alone, as before 2026-11-29)")
    ap.add_argument("--vm-exec", default="compiled", choices=("compiled", "bytecode"),
                    help="x86 target option: the Relax VM's form of the checkpoints' builds (compiled: the default)")
    ap.add_argument("--quantize", default="none", choices=("none", "dynamic", "static"),
                    help="tune graphopt's int8 form of the model (see above); default none (fp32)")
    ap.add_argument("--top", type=int, default=10, help="workloads in the profile table")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_model()
    log(f"CPU: {cpu}")
    work = Path(tempfile.mkdtemp(prefix="tuning-curve-", dir=args.out))
    texts, results = [], []
    try:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            tag = "" if args.quantize == "none" else f"-{args.quantize}"
            res = curve(name, args, work, args.out / "tuning-db" / f"{name}{tag}-curve")  # a root: the db is a folder in it
            results.append(res)
            texts.append(table(res, cpu))
            print(texts[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (args.out / "tvm_tuning_curve.md").write_text("\n\n".join(texts) + "\n")
    (args.out / "tvm_tuning_curve.json").write_text(json.dumps({"cpu": cpu, "results": results}, indent=1))


if __name__ == "__main__":
    main()
