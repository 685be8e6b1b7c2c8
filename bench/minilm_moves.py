"""MiniLM moves that pay: trim_padding (exact) alone and with attention fusion + dynamic int8, next to
the original and onnxruntime's quantize_dynamic, timed on real sentences, judged on STS-B test.

    .venv/bin/python bench/minilm_moves.py [--rounds 5] [--timing-sentences 64] [--eval-pairs N]
        [--out bench/out]

Rows (each model made in this run; graphopt's with its own passes through
`graphopt.driver.materialize` and a fixed genotype):

  original                          models/minilm.onnx (fp32, inputs padded to 128 tokens)
  ORT quantize_dynamic              quant_pre_process + quantize_dynamic(QInt8): ORT's recipe
  graphopt fused + int8 dynamic     attention=fused on the 6 layers + int8:*=dynamic (the best
                                    graphopt row before trim_padding)
  graphopt trim                     trim_padding=trim (exact)
  graphopt trim + fused + int8      trim_padding + attention fused + int8:*=dynamic
  ORT quantize_dynamic of trim      ORT's quantize_dynamic applied to the trimmed graph

Calibration for the attention pass's padding-mask check: 32 sentences of graphopt's fit split of
models/loaders.py:minilm_sentences (STS-B train + WordNet). Nothing here is fit on STS-B test.

Latency (onnxruntime CPU, the `ort` target's session options: ORT_ENABLE_ALL, 2 intra-op threads):
  real     --timing-sentences sentences spread evenly over STS-B *dev* (not test), padded to 128
           as the loaders pad; each timed repeat runs every sentence once; ms = mean per sentence,
           median of 5 repeats after a warm-up pass; rows timed round-robin for --rounds rounds (each
           round starts at another row); the table gives the median over rounds and the ratio
           to the original's median measured in the same run.
  full 128 the worst case for trim_padding: one feed of 128 real tokens (dev sentences joined),
           mask all ones, timed the same way (10 runs per repeat).
Task metric: STS-B test Spearman x100 on all 1379 pairs (cosine of the two sentences' embeddings
vs the gold score), computed here for every row the same way; cosine = mean embedding cosine
with the original's over the same sentences.

Output: stdout, <out>/minilm_moves.md and <out>/minilm_moves.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))

from compare import build_recipes, session, write_results  # noqa: E402
from graphopt.targets.host import cpu_summary as cpu_model  # noqa: E402 (name, SIMD flags)

MODEL = ROOT / "models" / "minilm.onnx"
LOADERS = "models/loaders.py"


def log(msg: str) -> None:
    print(f"[minilm_moves {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def calibration(n: int = 32) -> dict[str, np.ndarray]:
    from graphopt.evaluation.data import open_data, split_data
    from graphopt.modelio.ir import load_model

    base = load_model(MODEL)
    data = open_data(f"{ROOT / LOADERS}:minilm_sentences", base.inputs)
    splits = split_data(data, None, needs_fit=True, calib_max=n)
    return splits.calibration


def graphopt_models(out: Path) -> list[dict]:
    from graphopt.driver import move_context
    from graphopt.genotype import SearchSpace
    from graphopt.evaluation.evaluate import CalibrationData
    from graphopt.modelio.ir import load_model
    from graphopt.registry import PASSES

    base = load_model(MODEL)
    passes = {n: PASSES.get(n)() for n in ("attention", "int8", "trim_padding")}
    graph = base.graph()
    space = SearchSpace([s for p in passes.values() for s in p.sites(graph)])
    attn = {s.key: "fused" for s in space.sites if s.pass_name == "attention"}
    trim = {s.key: "trim" for s in space.sites if s.pass_name == "trim_padding"}
    if not trim:
        raise SystemExit(f"trim_padding found no site: {passes['trim_padding'].rejections(graph)}")
    ctx = move_context(base, CalibrationData(calibration(), "minilm_sentences fit split"), {})
    recipes = [
        ("graphopt fused + int8 dynamic", {**attn, "int8:*": "dynamic"}, "QAttention; padded to 128"),
        ("graphopt trim", trim, "exact"),
        ("graphopt trim + fused + int8", {**trim, **attn, "int8:*": "dynamic"}, "trim_padding, QAttention"),
    ]
    return build_recipes(base, space, passes, ctx, recipes, out, log)


def ort_dynamic(src: Path, out: Path, name: str, note: str, pre_process: bool = True) -> dict:
    """ORT's quantize_dynamic; pre_process=False for the trimmed graph: quant_pre_process's symbolic
    shape inference cannot follow its value-dependent Slice (it raised, leaving temp files in the cwd)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    stem = src.stem
    pre, path = out / f"{stem}_pre.onnx", out / f"{stem}_quant_dynamic.onnx"
    if pre_process:
        quant_pre_process(str(src), str(pre))
    else:
        pre = src
    quantize_dynamic(str(pre), str(path), weight_type=QuantType.QInt8)
    return {"name": name, "path": path, "produce_s": time.perf_counter() - t0, "note": note}


def sentences_feeds(sentences: list[str]) -> list[dict]:
    import loaders

    ds = loaders.Sentences(sentences, [None] * len(sentences), list(range(len(sentences))))
    return [ds[i] for i in range(len(ds))]


def full_length_feed() -> dict:
    import loaders

    text = " ".join(a + " " + b for a, b, _ in loaders.read_sts("dev")[:40])
    feed = sentences_feeds([text])[0]
    assert int(feed["attention_mask"].sum()) == feed["attention_mask"].shape[1], "not a full-length feed"
    return feed


def time_feeds(sess, feeds: list[dict], repeat: int = 5, min_runs: int = 10) -> float:
    """ms per run: median over `repeat` repeats; each repeat cycles every feed (whole cycles, >= min_runs)."""
    runs = -(-max(min_runs, len(feeds)) // len(feeds)) * len(feeds)
    for f in feeds:
        sess.run(None, f)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(runs):
            sess.run(None, feeds[i % len(feeds)])
        samples.append((time.perf_counter() - t0) * 1000.0 / runs)
    return statistics.median(samples)


def interleaved(rows: list[dict], sessions: dict, feeds: list[dict], rounds: int, key: str) -> None:
    for r in rows:
        r[key] = []
    for k in range(rounds):
        for r in rows[k % len(rows):] + rows[:k % len(rows)]:
            r[key].append(time_feeds(sessions[r["name"]], feeds))
        log(f"{key} round {k + 1}/{rounds}: " + ", ".join(f"{r['name']} {r[key][-1]:.2f}" for r in rows))


def evaluate(rows: list[dict], eval_pairs: int | None) -> dict:
    import loaders

    from graphopt.evaluation.evaluate import stack_outputs
    from graphopt.evaluation.metrics import resolve_metric

    ds = loaders.minilm_sts_test()
    n = len(ds) if not eval_pairs else min(len(ds), 2 * eval_pairs)
    feeds = [ds[i] for i in range(n)]
    labels = ds.labels[:n]
    metric = resolve_metric("sts_spearman")
    ref = None
    for r in rows:
        t0 = time.perf_counter()
        sess = session(Path(r["path"]))
        outs = stack_outputs([sess.run(None, f) for f in feeds], ["sentence_embedding"])
        if ref is None:
            ref = outs
        r["spearman"] = metric(ref, outs, labels, {})[0]
        a, b = ref["sentence_embedding"].reshape(n, -1), outs["sentence_embedding"].reshape(n, -1)
        r["cosine"] = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
        r["max_abs_diff"] = float(np.abs(a - b).max())
        log(f"{r['name']}: Spearman {r['spearman']:.3f}, cosine {r['cosine']:.6f} ({time.perf_counter() - t0:.0f} s)")
    return {"pairs": n // 2, "tokens_mean": float(np.mean([f["attention_mask"].sum() for f in feeds]))}


def table(rows: list[dict], info: dict) -> str:
    base = rows[0]
    lines = ["| variant | real sentences: latency vs original | full 128 tokens: vs original | "
             "STS-B test Spearman (drop) | cosine vs original | size MB | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | **{r['speedup']:.2f}x** ({r['ms']:.2f} ms) | {r['speedup_full']:.2f}x "
                     f"({r['ms_full']:.2f} ms) | {r['spearman']:.2f} ({r['spearman'] - base['spearman']:+.2f}) | "
                     f"{r['cosine']:.6f} | {Path(r['path']).stat().st_size / 1e6:.1f} | {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timing-sentences", type=int, default=64)
    ap.add_argument("--eval-pairs", type=int, default=None, help="cap STS-B test pairs (default: all 1379)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import loaders
    import onnxruntime

    cpu = cpu_model()
    log(f"CPU: {cpu}")
    rows = [{"name": "original", "path": MODEL, "note": "fp32, padded to 128"},
            ort_dynamic(MODEL, out, "ORT quantize_dynamic", "quant_pre_process, QInt8 per-tensor weights")]
    rows += graphopt_models(out)
    trim = next(r for r in rows if r["name"] == "graphopt trim")
    rows.append(ort_dynamic(Path(trim["path"]), out, "ORT quantize_dynamic of trim",
                            "QInt8 per-tensor weights; no quant_pre_process (its shape inference fails on trim)",
                            pre_process=False))
    dev = [s for a, b, _ in loaders.read_sts("dev") for s in (a, b)]
    pick = np.linspace(0, len(dev) - 1, args.timing_sentences).round().astype(int)
    feeds = sentences_feeds([dev[i] for i in pick])
    tokens = [int(f["attention_mask"].sum()) for f in feeds]
    log(f"timing on {len(feeds)} STS-B dev sentences, {np.mean(tokens):.1f} tokens on average "
        f"({min(tokens)}-{max(tokens)}) of 128")
    info = evaluate(rows, args.eval_pairs)
    sessions = {r["name"]: session(Path(r["path"])) for r in rows}
    interleaved(rows, sessions, feeds, args.rounds, "rounds_ms")
    interleaved(rows, sessions, [full_length_feed()], args.rounds, "rounds_full_ms")
    for r in rows:
        r["ms"], r["ms_full"] = statistics.median(r["rounds_ms"]), statistics.median(r["rounds_full_ms"])
    for r in rows:
        r["speedup"], r["speedup_full"] = rows[0]["ms"] / r["ms"], rows[0]["ms_full"] / r["ms_full"]
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu} (onnxruntime "
              f"{onnxruntime.__version__}, CPU, ORT_ENABLE_ALL, 2 intra-op threads), one process, "
              f"{args.rounds} interleaved rounds. Latency on {len(feeds)} STS-B dev sentences "
              f"({np.mean(tokens):.1f} tokens on average, {min(tokens)}-{max(tokens)}, padded to 128) and on one "
              f"128-token feed; Spearman on {info['pairs']} STS-B test pairs.")
    md = "\n".join([header, "", table(rows, info), "", f"Bench time {time.perf_counter() - t0:.0f} s."]) + "\n"
    print(md)
    write_results(out, "minilm_moves", md, rows, say=log, header=header, info=dict(info, cpu=cpu, tokens=tokens))


if __name__ == "__main__":
    main()
