"""Compare graphopt with onnxruntime quantization and onnxslim on EfficientNet-Lite0 or MiniLM.

One process, one target (onnxruntime CPU, 2 threads, ORT_ENABLE_ALL, the options of
targets/ort.py). Every row is timed the same way, interleaved in rounds; fidelity is measured on
the held-out eval images against the original. See bench/README.md.

    .venv/bin/python bench/compare.py [--model efficientnet|minilm] [--budget 12] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphopt import optimize
from graphopt.targets.ort import OrtTarget

ROOT = Path(__file__).resolve().parents[1]

MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
CALIB = ROOT / "models" / "efficientnet_lite0_calib.npz"
EVAL = ROOT / "models" / "efficientnet_lite0_eval.npz"
THREADS = 2
PASSES = "conv_bn,depthwise,kernel,int8"
STRATEGIES = ("random", "grid", "evolutionary")
MIN_FIDELITY = 0.99
WARMUP, REPEAT, NUMBER = 5, 15, 10
# --model: (label, model, calib, eval, graphopt passes, eval description). MiniLM's output is the
# L2-normalised mean-pooled sentence embedding, so "cosine" is the embedding cosine.
MODELS = {
    "efficientnet": ("EfficientNet-Lite0", MODEL, CALIB, EVAL, PASSES, "images"),
    "minilm": ("all-MiniLM-L6-v2 (seq 128)", ROOT / "models" / "minilm.onnx", ROOT / "models" / "minilm_calib.npz",
               ROOT / "models" / "minilm_eval.npz", "attention,int8", "sentences"),
}


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def session(path: Path) -> ort.InferenceSession:
    """Same SessionOptions as the graphopt `ort` target (ORT_ENABLE_ALL, 2 intra-op threads)."""
    opts = OrtTarget(threads=THREADS)._options()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_once(sess: ort.InferenceSession, feed: dict) -> float:
    """Median over REPEAT repeats of NUMBER runs each (ms per run), after WARMUP runs."""
    for _ in range(WARMUP):
        sess.run(None, feed)
    samples = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        for _ in range(NUMBER):
            sess.run(None, feed)
        samples.append((time.perf_counter() - t0) * 1000.0 / NUMBER)
    return statistics.median(samples)


def interleaved_rounds(rows: list[dict], sessions: dict, feed: dict, rounds: int, key: str = "rounds_ms",
                       say=None) -> None:
    """Time each row's session once per round, round-robin with the start rotated each round (load
    drift hits every row alike); round k's time goes to r[key][k]. The benches' shared timing loop."""
    say = say or log
    for r in rows:
        r.setdefault(key, [])
    for k in range(rounds):
        for r in rows[k % len(rows):] + rows[:k % len(rows)]:
            r[key].append(time_once(sessions[r["name"]], feed))
        say(f"timing round {k + 1}/{rounds}: " + ", ".join(f"{r['name']} {r[key][-1]:.2f}" for r in rows))


def write_results(out: Path, stem: str, md: str, rows: list[dict], say=None, **extra) -> None:
    """<out>/<stem>.md and <out>/<stem>.json ({**extra, "rows": rows}, paths as strings), each written
    atomically (a temporary file renamed into place). The benches' shared output step."""
    say = say or log
    raw = dict(extra, rows=[{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()} for r in rows])
    for path, text in ((out / f"{stem}.md", md), (out / f"{stem}.json", json.dumps(raw, indent=2))):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    say(f"wrote {out / stem}.md and {out / stem}.json")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, in float64."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def load_npz(path: Path) -> list[dict]:
    """One feed dict per sample ({input name: array}; EfficientNet: {"input": [1, 3, 224, 224] float32})."""
    with np.load(path) as z:
        arrs = {k: (z[k].astype(np.float32) if z[k].dtype.kind == "f" else z[k]) for k in z.files}
    return [{k: v[i] for k, v in arrs.items()} for i in range(len(next(iter(arrs.values()))))]


# ------------------------------------------------------------------ producing the models
def make_quantized(out: Path, calib: np.ndarray) -> list[dict]:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class NpzReader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    rows = []
    # ORT's documented workflow: pre-process (shape inference + graph optimization, which folds
    # BatchNormalization into Conv) before quantizing. Its time counts toward both rows.
    t0 = time.perf_counter()
    pre = out / "preprocessed.onnx"
    quant_pre_process(str(MODEL), str(pre))
    pre_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    path = out / "quant_dynamic.onnx"
    quantize_dynamic(str(pre), str(path), weight_type=QuantType.QInt8)
    rows.append({"name": "ORT quantize_dynamic (QInt8 weights)", "path": path,
                 "produce_s": pre_s + time.perf_counter() - t0, "note": "after quant_pre_process"})

    t0 = time.perf_counter()
    path = out / "quant_static_qdq.onnx"
    quantize_static(str(pre), str(path), NpzReader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    rows.append({"name": "ORT quantize_static (QDQ, per-channel)", "path": path,
                 "produce_s": pre_s + time.perf_counter() - t0,
                 "note": f"after quant_pre_process; MinMax on {len(calib)} calib samples"})
    return rows


def make_slim(out: Path) -> dict:
    name = "onnxslim"
    try:
        import onnx
        import onnxslim
    except ImportError:
        return {"name": name, "path": None, "produce_s": None, "note": "not installed"}
    t0 = time.perf_counter()
    slimmed = onnxslim.slim(onnx.load(str(MODEL)))
    path = out / "onnxslim.onnx"
    onnx.save(slimmed, str(path))
    return {"name": name, "path": path, "produce_s": time.perf_counter() - t0,
            "note": f"onnxslim {onnxslim.__version__}"}


def make_graphopt(out: Path, strategy: str, budget: int) -> tuple[dict, list]:
    """Run one search; returns the table row and the search curve."""
    run_dir = out / f"graphopt_{strategy}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh store: an old one would resume
    name = f"graphopt {strategy}"
    t0 = time.perf_counter()
    try:
        res = optimize(MODEL, "ort", passes=PASSES, strategy=strategy, budget=budget, data=CALIB,
                       metric="cosine", min_fidelity=MIN_FIDELITY, seed=0, out=run_dir,
                       target_options={"threads": THREADS})
    except Exception as e:
        return {"name": name, "path": None, "produce_s": time.perf_counter() - t0,
                "note": f"error: {type(e).__name__}: {e}"}, []
    wall = time.perf_counter() - t0
    rep = res.report
    best = rep.get("best")
    c = rep["search"]["candidates"]["by_status"]
    counts = f"ok {c['ok']}/infeasible {c['infeasible']}/failed {c['failed']}"
    if not rep["search"]["stopped_because"].startswith("budget"):
        counts += f"; stopped: {rep['search']['stopped_because']}"
    if res.exit_code != 0 or not best:
        return {"name": name, "path": None, "produce_s": wall,
                "note": f"exit {res.exit_code} ({rep.get('status')}); {counts}"}, curve(res.records)
    if best["is_original"]:
        what = "best = ORIGINAL (nothing beat it)"
    else:
        what = f"best = cand {best['candidate_id']}, {len(best.get('moves') or [])} moves"
    conf = rep.get("confirmed")
    if isinstance(conf, dict) and "speedup" in conf:
        what += f"; confirm x{conf['speedup']:.3f}"
    row = {"name": name, "path": run_dir / "best.onnx", "produce_s": wall,
           "note": f"{what}; {counts}", "is_original": best["is_original"],
           "search_best_ms": best.get("median_ms"), "report": str(run_dir / "report.json"),
           "sites_per_pass": rep["search"]["space"]["sites_per_pass"]}
    return row, curve(res.records)


def make_graphopt_fixed(out: Path, name: str, genes: dict, note: str) -> dict:
    """A row made by graphopt's own passes with a fixed genotype (no search), calibrated on the
    calibration set: shows one move's cost and fidelity on held-out data, feasible or not."""
    from graphopt.driver import materialize, move_context
    from graphopt.evaluation.evaluate import CalibrationData
    from graphopt.genotype import Genotype, SearchSpace
    from graphopt.modelio.ir import load_model
    from graphopt.registry import PASSES as REGISTRY

    t0 = time.perf_counter()
    base = load_model(MODEL)
    passes = {n: REGISTRY.get(n)() for n in sorted({k.split(":", 1)[0] for k in genes})}
    graph = base.graph()
    space = SearchSpace([s for p in passes.values() for s in p.sites(graph)])
    every = {k.split(":", 1)[0]: v for k, v in genes.items() if k.endswith(":<every site>")}
    genes = {k: v for k, v in genes.items() if not k.endswith(":<every site>")}
    genes |= {s.key: every[s.pass_name] for s in space.sites if s.pass_name in every and s.key not in genes}
    with np.load(CALIB) as z:
        calib = CalibrationData({k: z[k] for k in z.files}, str(CALIB))
    model, _ = materialize(base, space, Genotype(genes), passes, move_context(base, calib, {}))
    path = out / (name.replace(" ", "_").replace("=", "_").replace(":", "").replace("*", "all").replace("(", "").replace(")", "") + ".onnx")
    onnx.save(model, str(path))
    return {"name": name, "path": path, "produce_s": time.perf_counter() - t0, "note": note}


# int8 as one fixed move per model (the searches may reject it at cosine >= 0.99)
FIXED = {
    "efficientnet": [("graphopt conv_bn + int8:*=all (fixed)", {"conv_bn:<every site>": "fuse", "int8:*": "all"},
                      "BN folded, then static QDQ whole model, per-channel, uint8 activations, reduce_range "
                      "auto; no search")],
    "minilm": [("graphopt attention fused + int8:*=dynamic (fixed)",
                {"attention:" + f"/bert/encoder/layer.{i}/attention/self/Softmax": "fused" for i in range(6)}
                | {"int8:*": "dynamic"}, "bench/minilm.py's best row; no search")],
}


def curve(records) -> list:
    """Best feasible latency so far after each candidate (id order; index 0 = the original)."""
    best, out = None, []
    for r in sorted(records, key=lambda r: r.id):
        if r.status == "ok" and r.latency_ms is not None and (r.fidelity or 0) >= MIN_FIDELITY:
            best = r.latency_ms if best is None else min(best, r.latency_ms)
        out.append(best)
    return out


# ------------------------------------------------------------------ measuring every row
def fidelity(sess: ort.InferenceSession, eval_x: np.ndarray, ref: list[np.ndarray]) -> tuple[float, float]:
    """(mean logit cosine, top-1 agreement) with the original's logits on the held-out images."""
    cos, agree = [], []
    for x, r in zip(eval_x, ref):
        c = sess.run(None, x)[0].astype(np.float64).ravel()
        r = r.astype(np.float64).ravel()
        cos.append(float(np.dot(r, c) / (np.linalg.norm(r) * np.linalg.norm(c))))
        agree.append(float(np.argmax(r) == np.argmax(c)))
    return float(np.mean(cos)), (float(np.mean(agree)) if r.size > 1 and "input_ids" not in x else None)


def measure_all(rows: list[dict], eval_x: np.ndarray, rounds: int) -> None:
    live = [r for r in rows if r["path"] is not None]
    sessions = {}
    for r in live:
        try:
            sessions[r["name"]] = session(r["path"])
        except Exception as e:
            r["note"] += f"; session error: {str(e).splitlines()[0]}"
    live = [r for r in live if r["name"] in sessions]
    ref_sess = sessions[rows[0]["name"]]
    ref = [ref_sess.run(None, x)[0] for x in eval_x]
    orig_bytes = rows[0]["path"].read_bytes()
    for r in live:
        r["size_mb"] = r["path"].stat().st_size / 1e6
        r["same_file_as_original"] = r is not rows[0] and r["path"].read_bytes() == orig_bytes
        if r["same_file_as_original"]:
            r["note"] += "; SAME FILE as original: its speedup is timing noise"
        r["eval_cosine"], r["eval_top1_agree"] = fidelity(sessions[r["name"]], eval_x, ref)
        r["rounds_ms"] = []
    interleaved_rounds(live, sessions, eval_x[0], rounds)
    base = statistics.median(rows[0]["rounds_ms"])
    for r in live:
        r["latency_ms"] = statistics.median(r["rounds_ms"])
        r["speedup"] = base / r["latency_ms"]


# ------------------------------------------------------------------ output
def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    lines = ["| model | latency ms (median [min-max of round medians]) | speedup vs original | eval cosine "
             "| eval top-1 agree | size MB | produce s | note |", "|" + "---|" * 8]
    for r in rows:
        rm = r.get("rounds_ms") or []
        lat = f"{r['latency_ms']:.3f} [{min(rm):.2f}-{max(rm):.2f}]" if rm else "-"
        lines.append(f"| {r['name']} | {lat} | {fmt(r.get('speedup'), '.3f')} | {fmt(r.get('eval_cosine'), '.6f')} "
                     f"| {fmt(r.get('eval_top1_agree'), '.3f')} | {fmt(r.get('size_mb'), '.2f')} "
                     f"| {fmt(r.get('produce_s'), '.1f')} | {r['note']} |")
    return "\n".join(lines)


def curves_table(curves: dict[str, list]) -> str:
    n = max((len(c) for c in curves.values()), default=0)
    lines = ["| candidate | " + " | ".join(curves) + " |", "|" + "---|" * (len(curves) + 1)]
    for i in range(n):
        cells = [fmt(c[i], ".3f") if i < len(c) else "" for c in curves.values()]
        lines.append(f"| {i}{' (original)' if i == 0 else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=12, help="graphopt candidates per strategy (default 12)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    ap.add_argument("--model", choices=sorted(MODELS), default="efficientnet",
                    help="efficientnet (default; make models) or minilm (python models/minilm.py)")
    args = ap.parse_args()
    global MODEL, CALIB, EVAL, PASSES
    label, MODEL, CALIB, EVAL, PASSES, what = MODELS[args.model]
    out = Path(args.out)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    ort.set_default_logger_severity(3)
    t_start = time.perf_counter()
    calib, eval_x = load_npz(CALIB), load_npz(EVAL)

    rows = [{"name": "original", "path": MODEL, "produce_s": 0.0, "note": f"models/{MODEL.name}"}]
    log("quantizing")
    rows += make_quantized(models, calib)
    log("onnxslim")
    rows.append(make_slim(models))
    for fname, genes, note in FIXED.get(args.model, []):
        log(fname)
        try:
            rows.append(make_graphopt_fixed(models, fname, genes, note))
        except Exception as e:  # noqa: BLE001 - the row says why
            rows.append({"name": fname, "path": None, "produce_s": 0.0, "note": f"error: {type(e).__name__}: {e}"})
    curves = {}
    for s in STRATEGIES:
        log(f"graphopt {s}, budget {args.budget}")
        row, curves[s] = make_graphopt(out, s, args.budget)
        rows.append(row)
        log(f"graphopt {s}: {row['produce_s']:.1f} s; {row['note']}")
    log(f"timing {sum(r['path'] is not None for r in rows)} models, {args.rounds} rounds")
    measure_all(rows, eval_x, args.rounds)
    total = time.perf_counter() - t_start

    header = (f"{label} on onnxruntime {ort.__version__} CPU ({THREADS} threads, ORT_ENABLE_ALL); "
              f"latency = median of {REPEAT}x{NUMBER} runs after {WARMUP} warm-up, median over {args.rounds} "
              f"interleaved rounds; fidelity vs original on {len(eval_x)} held-out {what}; graphopt passes "
              f"{PASSES}, budget {args.budget}, cosine >= {MIN_FIDELITY} on {len(calib)} calib {what}. "
              f"Total {total:.0f} s.")
    sites = next((r["sites_per_pass"] for r in rows if r.get("sites_per_pass")), None)
    md = (f"{header}\n\n{table(rows)}\n\ngraphopt search space (sites per pass): {sites}\n\n"
          f"Search curves: best feasible latency (ms) so far, from each search's own measurements (one per "
          f"candidate, not interleaved; index i = graphopt candidate id i+1)\n\n{curves_table(curves)}\n")
    print(md)
    stem = "compare" if args.model == "efficientnet" else f"compare_{args.model}"
    write_results(out, stem, md, rows, header=header, total_s=total, curves=curves)



def build_recipes(base, space, passes, ctx, recipes, out: Path, say) -> list[dict]:
    """Materialize each (name, genes, note) recipe into OUT/go_<name>.onnx: rows for the benches'
    tables (bench/minilm.py, bench/minilm_moves.py)."""
    from graphopt.genotype import Genotype
    from graphopt.materialize import materialize

    rows = []
    for name, genes, note in recipes:
        t0 = time.perf_counter()
        model, applied = materialize(base, space, Genotype(genes), passes, ctx)
        bad = sorted(k for k, v in applied.items() if v != "applied")
        path = out / (name.replace("graphopt ", "go_").replace(" + ", "_").replace(" ", "_") + ".onnx")
        onnx.save(model, str(path))
        rows.append({"name": name, "path": path, "produce_s": time.perf_counter() - t0,
                     "note": note + (f"; did not apply: {', '.join(bad)}" if bad else "")})
        say(f"{name}: made in {rows[-1]['produce_s']:.1f} s")
    return rows


if __name__ == "__main__":
    main()
