"""Task quality of the bundled models' optimized forms: what the gate lets through, judged on the
task (held-out ImageNet top-1 / STS-B test Spearman), next to onnxruntime quantization and onnxslim.

    .venv/bin/python bench/task_quality.py [--models efficientnet,minilm] [--budget 6]
        [--drops 0.5,1.0] [--rounds 5] [--eval-samples N] [--out bench/out]

Per model, in one process, on onnxruntime CPU (ORT_ENABLE_ALL, 2 threads; the `ort` target's options):
  original; ORT quant_pre_process + quantize_dynamic; quant_pre_process + quantize_static (QDQ,
  per-channel, MinMax calibrated on graphopt's fit split of the unlabelled data only); onnxslim;
  graphopt's best with --metric <task metric> --max-drop D for each D (data: models/loaders.py,
  fit/select from the unlabelled photos / STS-B train + WordNet, held-out = --eval-data).
Columns: latency ratio vs the original (interleaved rounds, median), the task metric on the whole
held-out set (computed here, the same way for every row), the default gate metric `channel`
against the original on the held-out set, and the model size. The held-out files never feed
calibration, repair or selection.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import interleaved_rounds, session, write_results  # noqa: E402

from graphopt.targets.host import cpu_summary as cpu_model  # noqa: E402 (name, SIMD flags)
from graphopt.evaluation.data import open_data, split_data  # noqa: E402
from graphopt.evaluation.evaluate import similarity, stack_outputs  # noqa: E402
from graphopt.modelio.ir import load_model  # noqa: E402
from graphopt.evaluation.metrics import resolve_metric  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOADERS = "models/loaders.py"
MODELS = {
    "efficientnet": {"label": "EfficientNet-Lite0", "model": ROOT / "models" / "efficientnet_lite0.onnx",
                     "data": f"{LOADERS}:effnet_photos", "eval": f"{LOADERS}:effnet_imagenet",
                     "metric": "imagenet_top1", "passes": "conv_bn,int8",
                     "task": "top-1 % on imagenet-sample (1000 labelled photos)"},
    "minilm": {"label": "MiniLM (all-MiniLM-L6-v2)", "model": ROOT / "models" / "minilm.onnx",
               "data": f"{LOADERS}:minilm_sentences", "eval": f"{LOADERS}:minilm_sts_test",
               "metric": "sts_spearman", "passes": "attention,int8",
               "task": "Spearman x100 on STS-B test (1379 pairs)"},
}


def log(msg: str) -> None:
    print(f"[task_quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_ort_variants(model: Path, calib: list[dict], out: Path) -> list[dict]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    pre = out / "preprocessed.onnx"
    quant_pre_process(str(model), str(pre))
    rows = []
    path = out / "quant_dynamic.onnx"
    quantize_dynamic(str(pre), str(path), weight_type=QuantType.QInt8)
    rows.append({"name": "ORT quantize_dynamic", "path": path, "note": "quant_pre_process, QInt8 weights"})
    path = out / "quant_static.onnx"
    try:
        quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        rows.append({"name": "ORT quantize_static", "path": path,
                     "note": f"QDQ per-channel, MinMax on {len(calib)} fit samples"})
    except Exception as e:  # noqa: BLE001
        rows.append({"name": "ORT quantize_static", "path": None, "note": f"failed: {type(e).__name__}: {e}"})
    try:
        import onnxslim

        path = out / "onnxslim.onnx"
        onnx.save(onnxslim.slim(onnx.load(str(model))), str(path))
        rows.append({"name": "onnxslim", "path": path, "note": f"onnxslim {onnxslim.__version__}"})
    except ImportError:
        rows.append({"name": "onnxslim", "path": None, "note": "not installed (pip install onnxslim)"})
    return rows


def run_graphopt(spec: dict, drop: float, budget: int, out: Path) -> dict:
    run_dir = out / f"graphopt_drop{drop:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "graphopt", "run", str(spec["model"]), "--target", "ort", "--threads", "2",
           "--passes", spec["passes"], "--budget", str(budget), "--data", spec["data"], "--eval-data", spec["eval"],
           "--metric", spec["metric"], "--max-drop", str(drop), "--eval-samples", "100", "--out", str(run_dir),
           "--json", "-q"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    secs = time.perf_counter() - t0
    name = f"graphopt --max-drop {drop:g}"
    if res.returncode not in (0, 3):
        return {"name": name, "path": None, "note": f"exit {res.returncode}: {res.stderr.strip()[-300:]}"}
    rep = json.loads(res.stdout)
    best = rep.get("best") or {}
    moves = sorted({m["pass"] + ":" + str(m["choice"]) for m in best.get("moves") or []})
    return {"name": name, "path": run_dir / "best.onnx" if best else None,
            "note": (("original" if best.get("is_original") else f"{len(best.get('moves') or [])} moves")
                     + f" ({', '.join(moves[:4])}{'...' if len(moves) > 4 else ''}); gate on select "
                     f"{(rep['fidelity']['best'] or float('nan')):.2f} >= {rep['fidelity']['min_required']:.2f}; "
                     f"{rep['search']['candidates']['new']} candidates, {secs:.0f} s"),
            "gate_select": rep["fidelity"].get("best"), "search_s": secs,
            "data_sizes": rep.get("data", {}).get("sizes")}


def outputs_of(path: Path, feeds: list[dict], names: list[str]) -> dict:
    sess = session(path)
    return stack_outputs([sess.run(None, f) for f in feeds], names)


def task_data(spec: dict, eval_samples: int | None):
    """(loaded model, splits, held-out feeds, held-out labels) of a MODELS entry: fit/select from its
    --data loader, held-out from its --eval-data loader (capped at eval_samples)."""
    base = load_model(spec["model"])
    data = open_data(str(ROOT / spec["data"].split(":")[0]) + ":" + spec["data"].split(":")[1], base.inputs)
    held = open_data(str(ROOT / spec["eval"].split(":")[0]) + ":" + spec["eval"].split(":")[1], base.inputs,
                     "--eval-data")
    splits = split_data(data, held, needs_fit=True, held_out_max=eval_samples or 10**9)
    hds = splits.held_out
    return (base, splits, [hds.sample(i) for i in range(hds.num_samples)],
            [hds.label(i) for i in range(hds.num_samples)])


def bench_model(key: str, args, out: Path) -> tuple[list[dict], dict]:
    spec = MODELS[key]
    mdir = out / key
    mdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, splits, feeds, labels = task_data(spec, args.eval_samples)
    names = base.output_names
    calib = [{k: v[i] for k, v in splits.calibration.items()} for i in range(next(iter(splits.calibration.values())).shape[0])]
    log(f"{key}: {len(feeds)} held-out samples, {len(calib)} calibration samples from fit "
        f"({splits.fit.num_samples} fit) in {time.perf_counter() - t0:.0f} s")
    metric = resolve_metric(spec["metric"])
    rows = [{"name": "original", "path": spec["model"], "note": ""}]
    rows += make_ort_variants(spec["model"], calib, mdir)
    for drop in args.drops:
        log(f"{key}: graphopt --max-drop {drop}")
        rows.append(run_graphopt(spec, drop, args.budget, mdir))
    ref = None
    for r in rows:
        if r.get("path") is None:
            continue
        t = time.perf_counter()
        outs = outputs_of(Path(r["path"]), feeds, names)
        if ref is None:
            ref = outs
        r["task"] = metric(ref, outs, labels, {})[0]
        r["channel"] = similarity(ref, outs, "channel")[0]
        r["cosine"] = similarity(ref, outs, "cosine")[0]
        r["size_mb"] = Path(r["path"]).stat().st_size / 1e6
        log(f"{key}: {r['name']}: {metric.name} {r['task']:.2f}, channel {r['channel']:.4f} "
            f"({time.perf_counter() - t:.0f} s)")
    timed = [r for r in rows if r.get("path") is not None]
    sessions = {r["name"]: session(Path(r["path"])) for r in timed}
    interleaved_rounds(timed, sessions, feeds[0], args.rounds, say=log)
    base_ms = statistics.median(rows[0]["rounds_ms"])
    for r in timed:
        r["ms"] = statistics.median(r["rounds_ms"])
        r["ratio"] = r["ms"] / base_ms
    return rows, {"held_out": len(feeds), "calibration": len(calib), "fit": splits.fit.num_samples,
                  "select": splits.select.num_samples, "metric": metric.to_dict(), "task": spec["task"]}


def table(label: str, info: dict, rows: list[dict]) -> str:
    lines = [f"### {label}: {info['task']}", "",
             f"Held-out {info['held_out']} samples; calibration for quantize_static: {info['calibration']} samples "
             f"of graphopt's fit split ({info['fit']} fit, {info['select']} select).", "",
             "| variant | latency vs original | task metric | gate fidelity (`channel`, held-out) | cosine | size MB | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("task") is None:
            lines.append(f"| {r['name']} | - | - | - | - | - | {r.get('note', '')} |")
            continue
        lines.append(f"| {r['name']} | {r.get('ratio', float('nan')):.2f}x ({r.get('ms', float('nan')):.2f} ms) | "
                     f"{r['task']:.2f} | {r['channel']:.4f} | {r['cosine']:.4f} | {r['size_mb']:.1f} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet,minilm")
    ap.add_argument("--budget", type=int, default=6, help="graphopt candidates per run (default 6)")
    ap.add_argument("--drops", default="0.5,1.0", help="graphopt --max-drop values (default 0.5,1.0)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    ap.add_argument("--eval-samples", type=int, default=None, help="cap the held-out set (default: all)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    args.drops = [float(x) for x in args.drops.split(",") if x]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu_model()} (onnxruntime "
              f"{__import__('onnxruntime').__version__}, CPU, ORT_ENABLE_ALL, 2 threads); graphopt budget "
              f"{args.budget} candidates per run.")
    parts, raw = [header, ""], {}
    for key in [m for m in args.models.split(",") if m]:
        rows, info = bench_model(key, args, out)
        parts += [table(MODELS[key]["label"], info, rows), ""]
        raw[key] = {"info": info, "rows": rows}
        write_results(out, f"task_quality_{key}", "\n".join([header, "", parts[-2], ""]), rows, say=log,
                      header=header, info=info)  # each model's table as soon as it is done
    parts.append(f"Total bench time {time.perf_counter() - t0:.0f} s.")
    md = "\n".join(parts) + "\n"
    print(md)
    write_results(out, "task_quality", md, [dict(r, model=k) for k, v in raw.items() for r in v["rows"]], say=log,
                  header=header, info={k: v["info"] for k, v in raw.items()})


if __name__ == "__main__":
    main()
