"""int8 on tuned TVM x86, judged on the task: held-out task metric and latency of graphopt's int8
form of a bundled model as the x86 target builds it, next to the same model on onnxruntime and the
fp32 original on both runtimes, in one run.

    .venv/bin/python bench/int8_tvm_quality.py --db DB_ROOT [--model minilm] [--quantize dynamic]
        [--fp32-db DB_ROOT] [--calibration fit|bundled] [--eval-samples N] [--rounds 5]

The int8 model: --quantize dynamic (every MatMul with a constant weight, per-channel int8 weights,
passes/int8.quantize_dynamic_nodes) or static (QDQ on every op the quantizer supports, per-channel
weights, uint8 activations, MinMax calibrated on the *fit* split of the model's unlabelled data,
models/loaders.py; or, --calibration bundled, on the model's bundled calibration images, as
bench/tvm_tuning_curve.py does; the held-out set never feeds it). TVM: graphopt's `x86` target with the tuning
database --db (e.g. the one `bench/tvm_tuning_curve.py --quantize ...` left) and trials=1 (a workload
the database lacks gets one trial: a static model's scales are compiled into its kernels, so one
calibrated on other samples than the curve's brings some workloads of its own); its int8
kernels are the target's `int8_kernels=auto` (vpdpbusd with AVX-512 VNNI). --fp32-db adds the fp32
original on TVM from that database. Rows: task metric over the held-out set (bench/task_quality's
loaders and metric: ImageNet top-1 on the 1000 labelled photos, STS-B test Spearman x100), computed
from each runtime's own outputs; latency in interleaved rounds (bench/compare's loop); ratio to
onnxruntime fp32. Prints the CPU model and its int8-relevant flags.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import interleaved_rounds, session, write_results  # noqa: E402
from task_quality import MODELS, ROOT, cpu_model, task_data  # noqa: E402
from tvm_vs_ort import MODELS as CURVE_MODELS  # noqa: E402

from graphopt.evaluation.evaluate import stack_outputs  # noqa: E402
from graphopt.evaluation.metrics import resolve_metric  # noqa: E402

BUNDLED_CALIB = {name: calib for name, (_, calib) in CURVE_MODELS.items()}  # what the curve calibrates on


def log(msg: str) -> None:
    print(f"[int8_tvm_quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class TvmSession:
    """onnxruntime's `run(None, feed)` over an x86 artifact, for the shared timing loop: one VM made
    once (the target's run_once makes one per call, ~1 ms here), inputs copied in per call as
    onnxruntime does."""

    def __init__(self, tgt, art):
        import tvm

        from graphopt.targets import tvm_common as tc

        tc.set_num_threads(tgt.threads)
        self.tgt, self.art, self.tc, self.dev = tgt, art, tc, tvm.cpu()
        self.vm = tc.make_vm(art.handle, self.dev)

    def run(self, _names, feed):
        return self.tc.run_vm(self.vm, self.dev, self.tgt._ordered_inputs(self.art, feed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", choices=sorted(MODELS))
    ap.add_argument("--quantize", default="dynamic", choices=("dynamic", "static"))
    ap.add_argument("--db", type=Path, required=True, help="tuning database root of the int8 model")
    ap.add_argument("--fp32-db", type=Path, default=None, help="tuning database root of the fp32 original (optional)")
    ap.add_argument("--calibration", default="fit", choices=("fit", "bundled"), help="static: calibrate on the fit "
                    "split (default) or on the model's bundled calibration samples, as bench/tvm_tuning_curve.py "
                    "does (so its database covers every workload); neither holds held-out data")
    ap.add_argument("--eval-samples", type=int, default=None, help="cap the held-out set (default: all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    from graphopt.passes import int8
    from graphopt.targets.x86 import X86Target

    spec = MODELS[args.model]
    t0 = time.perf_counter()
    base, splits, feeds, labels = task_data(spec, args.eval_samples)
    names = base.output_names
    log(f"{args.model}: {len(feeds)} held-out samples ({time.perf_counter() - t0:.0f} s)")
    if args.quantize == "dynamic":
        q = int8.quantize_dynamic_nodes(base.proto, int8._dynamic_candidates(base.proto))
        note = "dynamic, per-channel int8 weights"
    else:
        if args.calibration == "fit":
            calib, where = splits.calibration, "fit"
        else:
            with np.load(BUNDLED_CALIB[args.model]) as z:
                calib, where = {k: z[k] for k in z.files}, "bundled calibration"
        q = int8.quantize(base.proto, calib, None)
        note = f"static QDQ, per-channel, MinMax on {next(iter(calib.values())).shape[0]} {where} samples"
    work = Path(tempfile.mkdtemp(prefix="int8-tvm-quality-"))
    qpath = work / "int8.onnx"
    qpath.write_bytes(q.SerializeToString())
    rows = [{"name": "onnxruntime fp32", "sess": session(Path(spec["model"]))},
            {"name": f"onnxruntime int8 ({note})", "sess": session(qpath)}]
    builds = [("TVM x86 int8", q, args.db)] + ([("TVM x86 fp32", base.proto, args.fp32_db)] if args.fp32_db else [])
    for label, model, db in builds:
        tgt = X86Target(threads=2, trials=1, tuning_db=str(db))  # known workloads: reused, not tuned
        art = tgt.compile(model, work / label.replace(" ", "_"))
        st = art.info["tuning"]
        log(f"{label}: int8_kernels {tgt.int8_kernels}; workloads {st.get('workloads_seen')}, reused "
            f"{st.get('workloads_reused')}, untuned {len(st.get('untuned_tasks') or [])}; in_model "
            f"{json.dumps(st.get('in_model'))}")
        rows.append({"name": f"{label} ({tgt.int8_kernels})" if "int8" in label else label,
                     "sess": TvmSession(tgt, art)})
    metric = resolve_metric(spec["metric"])
    ref = None
    for r in rows:
        t = time.perf_counter()
        outs = stack_outputs([r["sess"].run(None, f) for f in feeds], names)
        ref = outs if ref is None else ref
        r["task"] = float(metric(ref, outs, labels, {})[0])
        r["max_diff_vs_ort_int8"] = None
        r["outs"] = outs
        log(f"{r['name']}: {metric.name} {r['task']:.2f} ({time.perf_counter() - t:.0f} s)")
    ort_q = rows[1]["outs"]
    for r in rows[2:]:
        if "int8" in r["name"]:
            r["max_diff_vs_ort_int8"] = max(float(np.abs(np.asarray(r["outs"][k]) - np.asarray(ort_q[k])).max())
                                            for k in names)
    interleaved_rounds(rows, {r["name"]: r["sess"] for r in rows}, feeds[0], args.rounds, say=log)
    base_ms = statistics.median(rows[0]["rounds_ms"])
    cpu = cpu_model()
    lines = [f"### {args.model}: int8 on TVM x86 vs onnxruntime ({cpu}, 2 threads, {len(feeds)} held-out samples)",
             "", f"| runtime, model | {spec['task']} | latency ms (rounds) | speed vs onnxruntime fp32 |", "|---|---|---|---|"]
    for r in rows:
        ms = statistics.median(r["rounds_ms"])
        diff = "" if r["max_diff_vs_ort_int8"] is None else f"; max diff vs onnxruntime int8 {r['max_diff_vs_ort_int8']:.2g}"
        lines.append(f"| {r['name']} | {r['task']:.2f} | {ms:.2f} ({' '.join(f'{v:.2f}' for v in r['rounds_ms'])}) | "
                     f"x{base_ms / ms:.2f}{diff} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    keep = [{k: v for k, v in r.items() if k not in ("sess", "outs")} for r in rows]
    write_results(args.out, f"int8_tvm_quality_{args.model}", text + "\n", keep, say=log, cpu=cpu,
                  quantize=args.quantize, note=note)


if __name__ == "__main__":
    main()
