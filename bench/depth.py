"""Depth moves (passes/depth.py) on the bundled models: what removing blocks / layers costs and buys.

    .venv/bin/python bench/depth.py [--images 200] [--rounds 5] [--threads 2] [--out bench/out]

MiniLM: each of the 6 encoder layers removed alone, then 2 and 3 layers (the ones whose single
removal kept the highest cosine). EfficientNet-Lite0: each of the 9 residual MBConv blocks removed
alone, then the 2, 3 and 5 with the highest single-removal cosine. No distillation; without
--repair the move alone, with it also the least-squares repair of the layers that read the
removed block (passes/depth.py), fit on models/<name>_calib.npz (disjoint from the eval data).

Per row: FLOPs (estimated by formula, graphopt.reporting.analysis), onnxruntime latency ratio vs the
original (measured: ORT_ENABLE_ALL, --threads intra-op threads, each round times the original
and the variant back to back, 20 runs each after 3 warm-up; the median of --rounds round ratios),
and fidelity: MiniLM embedding cosine vs the original over the 188 sentences of
models/minilm_eval.npz; EfficientNet logit cosine over models/efficientnet_lite0_eval.npz (8 images)
and top-1 on the first --images photos of models/data/imagenet-sample (held-out evaluation; used
for no choice here). Writes <out>/depth.md and <out>/depth.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphopt.targets.host import cpu_summary as cpu_model  # noqa: E402 (name, SIMD flags)
from graphopt.reporting.analysis import analyze
from graphopt.driver import materialize
from graphopt.genotype import Genotype, SearchSpace
from graphopt.modelio.ir import load_model
from graphopt.passes.depth import DepthRemoval
from graphopt.plugin import MoveContext

ROOT = Path(__file__).resolve().parents[1]


def session(model, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_all(sess, data: dict[str, np.ndarray]) -> np.ndarray:
    n = next(iter(data.values())).shape[0]
    return np.stack([sess.run(None, {k: v[i] for k, v in data.items()})[0] for i in range(n)])


def latency_ratio(base_sess, sess, feed, rounds: int, runs: int = 20) -> tuple[float, float, float]:
    """(median ratio original/variant, original ms, variant ms) over rounds timed back to back."""
    def timed(s):
        for _ in range(3):
            s.run(None, feed)
        t = []
        for _ in range(runs):
            t0 = time.perf_counter()
            s.run(None, feed)
            t.append(time.perf_counter() - t0)
        return statistics.median(t) * 1e3

    ratios, b_ms, v_ms = [], [], []
    for _ in range(rounds):
        b, v = timed(base_sess), timed(sess)
        ratios.append(b / v)
        b_ms.append(b)
        v_ms.append(v)
    return statistics.median(ratios), statistics.median(b_ms), statistics.median(v_ms)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def imagenet(n: int) -> tuple[np.ndarray, np.ndarray]:
    import sys

    sys.path.insert(0, str(ROOT / "models"))
    from efficientnet_lite0 import center_sample
    from PIL import Image

    folder = ROOT / "models" / "data" / "imagenet-sample"
    rows = [ln.split("\t") for ln in (folder / "labels.tsv").read_text().splitlines()[1:]][:n]
    xs = np.stack([center_sample(np.asarray(Image.open(folder / r[0]).convert("RGB"))) for r in rows])
    return xs, np.array([int(r[1]) for r in rows])


def study(name: str, greedy: list[int], args, extra=None) -> dict:
    path = ROOT / "models" / f"{name}.onnx"
    base = load_model(path)
    p = DepthRemoval()
    sites = p.sites(base.graph())
    space = SearchSpace(sites)
    ev = {k: v[: args.samples] for k, v in np.load(ROOT / "models" / f"{name}_eval.npz").items()}
    base_sess = session(base.proto, args.threads)
    ref = run_all(base_sess, ev)
    feed = {k: v[0] for k, v in ev.items()}
    base_flops = analyze(base.proto).total_flops
    labels_x = extra() if extra else None
    base_top1 = None
    if labels_x is not None:
        xs, ys = labels_x
        base_top1 = float(np.mean(run_all(base_sess, {"input": xs}).reshape(len(ys), -1).argmax(1) == ys))

    calib = {k: v for k, v in np.load(ROOT / "models" / f"{name}_calib.npz").items()} if args.repair else {}

    def row(keys: list[str]) -> dict:
        g = Genotype({k: "remove" for k in keys})
        model, applied = materialize(base, space, g, {"depth": p}, MoveContext(base.proto))
        assert set(applied.values()) == {"applied"}, applied
        sess = session(model, args.threads)
        out = run_all(sess, ev)
        r = {"removed": [space.site(k).note.split(" (")[0] for k in keys], "keys": keys,
             "flops_ratio": analyze(model).total_flops / base_flops, "cosine": cosine(out, ref)}
        r["speedup"], r["original_ms"], r["ms"] = latency_ratio(base_sess, sess, feed, args.rounds)
        if labels_x is not None:
            xs, ys = labels_x
            r["top1"] = float(np.mean(run_all(sess, {"input": xs}).reshape(len(ys), -1).argmax(1) == ys))
        if calib:  # least-squares repair of the readers, fit on the calibration file (disjoint from eval)
            fixed, _ = materialize(base, space, g, {"depth": p},
                                   MoveContext(base.proto, calib, {"repair": True, "depth_repair": True}))
            fs = session(fixed, args.threads)
            r["cosine_repaired"] = cosine(run_all(fs, ev), ref)
            if labels_x is not None:
                r["top1_repaired"] = float(np.mean(run_all(fs, {"input": xs}).reshape(len(ys), -1).argmax(1) == ys))
        print(name, r["removed"], {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}, flush=True)
        return r

    singles = [row([s.key]) for s in sites]
    order = sorted(range(len(sites)), key=lambda i: -singles[i]["cosine"])
    combos = [row([sites[i].key for i in order[:k]]) for k in greedy]
    return {"model": name, "sites": len(sites), "original_flops": base_flops, "original_top1": base_top1,
            "singles": singles, "combined": combos}


def table(res: dict) -> list[str]:
    top = res["original_top1"] is not None
    rep = "cosine_repaired" in res["singles"][0]
    head = ("| removed | FLOPs | ORT speedup | ms (orig -> new) | cosine |" + (" top-1 |" if top else "")
            + (" cosine, repaired |" if rep else "") + (" top-1, repaired |" if rep and top else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    if top:
        lines.append(f"| (original) | 1.000 | 1.00x | | 1.0000 | {100 * res['original_top1']:.1f}% |"
                     + (f" 1.0000 | {100 * res['original_top1']:.1f}% |" if rep else ""))
    for r in res["singles"] + res["combined"]:
        cells = [", ".join(r["removed"]), f"{r['flops_ratio']:.3f}", f"{r['speedup']:.2f}x",
                 f"{r['original_ms']:.2f} -> {r['ms']:.2f}", f"{r['cosine']:.4f}"]
        if top:
            cells.append(f"{100 * r['top1']:.1f}%")
        if rep:
            cells.append(f"{r['cosine_repaired']:.4f}")
            if top:
                cells.append(f"{100 * r['top1_repaired']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--samples", type=int, default=188, help="eval samples used for the cosine (default: all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--only", choices=["minilm", "efficientnet_lite0"])
    ap.add_argument("--repair", action="store_true",
                    help="also the least-squares repair of the readers, fit on models/<name>_calib.npz")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if args.only in (None, "minilm"):
        results.append(study("minilm", [2, 3], args))
    if args.only in (None, "efficientnet_lite0"):
        results.append(study("efficientnet_lite0", [2, 3, 5], args, extra=lambda: imagenet(args.images)))
    head = (f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} on {cpu_model()}, onnxruntime {ort.__version__}, "
            f"{args.threads} threads, {args.rounds} rounds; cosine over the first {args.samples} eval samples; "
            f"top-1 on the first {args.images} imagenet-sample photos.")
    md = [head, ""]
    for r in results:
        md += [f"### {r['model']} ({r['sites']} sites)", ""] + table(r) + [""]
    (out / "depth.md").write_text("\n".join(md))
    (out / "depth.json").write_text(json.dumps({"header": head, "results": results}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
