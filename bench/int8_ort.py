"""graphopt's static int8 vs onnxruntime's quantize_static on EfficientNet-Lite0 (docs/int8.md).

Rows: the original; onnxruntime's recipe (quant_pre_process, then quantize_static QDQ, per-channel
QInt8 weights, QUInt8 activations, MinMax); graphopt int8:*=all; graphopt int8 per layer (every
int8 site) without and with conv_bn. All static int8 rows calibrate on the same samples: the
calibration subset of the fit split of the unlabelled photos (models/loaders.py:effnet_photos,
split_data as a graphopt run does). Top-1 on the 1000 labelled held-out photos
(models/loaders.py:effnet_imagenet). Latency: onnxruntime CPU, ORT_ENABLE_ALL, 2 threads
(bench/compare.py's session and timing loop), rows interleaved in rounds; each row's median over
rounds and its ratio to the original's, measured in the same run. Also the op counts of the graph
onnxruntime actually runs (SessionOptions.optimized_model_filepath).

    .venv/bin/python bench/int8_ort.py [--rounds 5] [--out bench/out]
"""

from __future__ import annotations

import argparse
import collections
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
LOADERS = ROOT / "models" / "loaders.py"


def ort_static(src: Path, out: Path, calib: list[dict]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    pre = out / "ort_pre.onnx"
    quant_pre_process(str(src), str(pre))
    dst = out / "ort_quantize_static.onnx"
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst


def optimized_ops(path: Path, work: Path) -> dict[str, int]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.optimized_model_filepath = str(work / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {k: ops[k] for k in ("QLinearConv", "Conv", "QuantizeLinear", "DequantizeLinear", "BatchNormalization",
                                "Pad", "Transpose") if ops[k]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)

    from compare import interleaved_rounds, session
    from task_quality import cpu_model

    import onnxruntime as ort

    from graphopt.evaluation.data import open_data, split_data
    from graphopt.driver import materialize, move_context
    from graphopt.exact import build_space
    from graphopt.genotype import Genotype
    from graphopt.modelio.ir import load_model
    from graphopt.registry import PASSES

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {cpu_model()}; onnxruntime {ort.__version__}, "
          "CPU EP, ORT_ENABLE_ALL, 2 threads", flush=True)
    base = load_model(MODEL)
    data = open_data(f"{LOADERS}:effnet_photos", base.inputs)
    held = open_data(f"{LOADERS}:effnet_imagenet", base.inputs, "--eval-data")
    sp = split_data(data, held, needs_fit=True)
    hds = sp.held_out
    n = hds.num_samples
    feeds = [hds.sample(i) for i in range(n)]
    labels = np.array([np.asarray(hds.label(i)).reshape(-1)[0] for i in range(n)])
    ncal = next(iter(sp.calibration.values())).shape[0]
    calib = [{k: v[i] for k, v in sp.calibration.items()} for i in range(ncal)]
    print(f"calibration: {ncal} photos from the fit split of effnet_photos; held-out: {n} labelled photos", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="int8-ort-") as tmp:
        work = Path(tmp)
        rows = [{"name": "original", "path": MODEL}]
        t = time.monotonic()
        rows.append({"name": "ORT quantize_static", "path": ort_static(MODEL, work, calib), "s": time.monotonic() - t})
        passes = {k: PASSES.create(k) for k in ("conv_bn", "int8")}
        space = build_space({k: p.sites(base.graph()) for k, p in passes.items()})
        ctx = move_context(base, sp, {})
        layers = {s.key: "int8" for s in space.sites if s.key.startswith("int8:") and s.key != "int8:*"}
        for name, geno in (("graphopt int8:*=all", {"int8:*": "all"}),
                           ("graphopt int8 per layer", layers),
                           ("graphopt conv_bn + int8 per layer", {"conv_bn:*exact": "fuse", **layers})):
            t = time.monotonic()
            model, _ = materialize(base, space, Genotype(geno), passes, ctx)
            p = work / (name.replace(" ", "_").replace(":", "").replace("*", "").replace("=", "_") + ".onnx")
            onnx.save(model, str(p))
            rows.append({"name": name, "path": p, "s": time.monotonic() - t})
        for r in rows:
            r["ops"] = optimized_ops(Path(r["path"]), work)
            s = session(Path(r["path"]))
            pred = np.array([int(np.argmax(s.run(None, f)[0])) for f in feeds])
            r["top1"] = 100.0 * float((pred == labels).mean())
            r["pred"] = pred
            print(f"  {r['name']}: top-1 {r['top1']:.1f}; onnxruntime runs {r['ops']}", flush=True)
        sessions = {r["name"]: session(Path(r["path"])) for r in rows}
        interleaved_rounds(rows, sessions, feeds[0], args.rounds, say=lambda m: print("  " + m, flush=True))
    b = statistics.median(rows[0]["rounds_ms"])
    ref = rows[0]["pred"]
    lines = ["| model | median ms | latency vs original | speed-up | held-out top-1 | agreement with original | "
             "ops onnxruntime runs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = statistics.median(r["rounds_ms"])
        lines.append(f"| {r['name']} | {ms:.2f} | {ms / b:.2f} | {b / ms:.2f}x | {r['top1']:.1f} | "
                     f"{100 * (r['pred'] == ref).mean():.1f} | {', '.join(f'{k} {v}' for k, v in r['ops'].items())} |")
    print("\n".join(lines))
    (out / "int8_ort.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
