"""Cheaper attention forms on long inputs: MiniLM at sequence length --seq (default 512), the
`attention` pass's exact fused op against its block-local (window_W) and linear choices.

    .venv/bin/python bench/attention_forms.py [--seq 512] [--docs 24] [--rounds 5] [--tvm]

The bundled MiniLM (models/minilm.onnx) is exported at sequence 128 and its sentences are <= 16
tokens, so there a block-local form is exact and has little to win (bench/minilm.py). This bench
re-exports the same all-MiniLM-L6-v2 weights (models/minilm.py's embedder) at --seq tokens and
feeds it documents: sentences of models/sentences.txt drawn at random (seeded) and joined until
each document has between seq/2 and seq-2 tokens (the rest is padding). 8 documents calibrate
(padding-mask check), --docs others are held out for fidelity (embedding cosine with the
original, mean and minimum).

Rows, each made by graphopt's own pass (`graphopt.driver.materialize`, all 6 layers alike):
  original       the export (classic eager attention, [1, 1, S, S] additive mask)
  fused          attention=fused: com.microsoft.Attention (exact)
  window_W       block-local attention, W = S/2, S/4, S/8 (approximate)
  linear         elu+1 linear attention (approximate)

onnxruntime: targets/ort.py settings, --threads intra-op threads; rows timed round-robin for
--rounds rounds (median of 15x10 runs after 5 warm-up each), the table gives the median of the
round medians and their min-max. With --tvm also graphopt's `x86` target, MetaSchedule with
--tune-trials trials per new workload into --db, median of --rounds measurements.

Output: stdout, <out>/attention_forms.md and .json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))

N_CALIB = 8


def log(msg: str) -> None:
    print(f"[attention_forms {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def documents(tok, seq: int, n: int, seed: int) -> dict[str, np.ndarray]:
    """{input: [n, 1, seq] int64}: random sentences joined to seq/2 .. seq-2 tokens each."""
    import minilm as mb

    sents = mb.read_sentences()
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = rng.randint(seq // 2, seq - 2)
        parts: list[str] = []
        while True:
            s = rng.choice(sents)
            if len(tok(" ".join(parts + [s]))["input_ids"]) > target:
                break
            parts.append(s)
        texts.append(" ".join(parts))
    enc = tok(texts, padding="max_length", max_length=seq, truncation=True, return_tensors="np")
    return {k: np.ascontiguousarray(enc[k].astype(np.int64)[:, None, :]) for k in mb.INPUTS}


def export(seq: int, out: Path, probe: dict[str, np.ndarray]) -> Path:
    import minilm as mb

    path = out / f"minilm_s{seq}.onnx"
    if not path.exists():
        mb.export_onnx(path, {k: v[0] for k, v in probe.items()})
    return path


def make_rows(path: Path, calib: dict[str, np.ndarray], seq: int, out: Path) -> list[dict]:
    from graphopt.driver import materialize, move_context
    from graphopt.evaluation.evaluate import CalibrationData
    from graphopt.genotype import Genotype, SearchSpace
    from graphopt.modelio.ir import load_model
    from graphopt.registry import PASSES

    base = load_model(path)
    passes = {"attention": PASSES.get("attention")()}
    space = SearchSpace(passes["attention"].sites(base.graph()))
    keys = [s.key for s in space.sites]
    ctx = move_context(base, CalibrationData(calib, "documents"), {})
    rows = [{"name": "original", "path": path, "note": "eager attention, fp32"}]
    choices = [("fused", "com.microsoft.Attention, exact")] + [
        (f"window_{seq // f}", f"{f} blocks of {seq // f} tokens") for f in (2, 4, 8)] + [
        ("linear", "elu+1 feature map")]
    for choice, note in choices:
        if not all(choice in s.choices for s in space.sites):
            log(f"{choice}: not offered on every site, skipped")
            continue
        model, applied = materialize(base, space, Genotype({k: choice for k in keys}), passes, ctx)
        bad = sorted(k for k, v in applied.items() if v != "applied")
        if bad:
            log(f"{choice}: {len(bad)} of {len(keys)} moves did not apply ({applied[bad[0]]}), skipped")
            continue
        p = out / f"minilm_s{seq}_{choice}.onnx"
        onnx.save(model, str(p))
        rows.append({"name": choice, "path": p, "note": note})
    return rows


def measure_ort(rows: list[dict], feeds: list[dict], rounds: int) -> None:
    from compare import cosine, interleaved_rounds, session

    sessions = {r["name"]: session(r["path"]) for r in rows}
    ref = [sessions["original"].run(None, f)[0] for f in feeds]
    for r in rows:
        cos = [cosine(sessions[r["name"]].run(None, f)[0], x) for f, x in zip(feeds, ref)]
        r["cosine"], r["cosine_min"], r["ort_rounds_ms"] = float(np.mean(cos)), float(min(cos)), []
    interleaved_rounds(rows, sessions, feeds[0], rounds, key="ort_rounds_ms", say=log)
    base = statistics.median(rows[0]["ort_rounds_ms"])
    for r in rows:
        r["ort_ms"] = statistics.median(r["ort_rounds_ms"])
        r["ort_speedup"] = base / r["ort_ms"]


def measure_tvm(rows: list[dict], feeds: list[dict], args) -> None:
    from graphopt.targets import tvm_common as tc
    from graphopt.targets.x86 import X86Target

    tgt = X86Target(threads=args.threads, trials=args.tune_trials, tuning_db=str(args.db))
    work = Path(tempfile.mkdtemp(prefix="attention-forms-"))
    for r in rows:
        model = onnx.load(str(r["path"]))
        missing = tc.unsupported_ops(model)
        if missing:
            r["tvm_note"] = f"TVM cannot import {', '.join(missing)}"
            continue
        t0 = time.monotonic()
        try:
            art = tgt.compile(model, work)
        except Exception as e:  # noqa: BLE001 - a row that fails says why, the others go on
            r["tvm_note"] = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"tvm {r['name']}: {r['tvm_note']}")
            continue
        st = art.info.get("tuning", {})
        r["tvm_tuning"] = {k: st.get(k) for k in ("workloads_reused", "workloads_tuned", "workloads_untuned",
                                                   "tuning_s")}
        r["tvm_ms"] = statistics.median(tgt.measure(art, feeds[0]).latency.median_ms for _ in range(args.rounds))
        log(f"tvm {r['name']}: {r['tvm_ms']:.2f} ms, compile {time.monotonic() - t0:.0f} s, {r['tvm_tuning']}")
    tgt.close()
    base = rows[0].get("tvm_ms")
    for r in rows:
        if base and r.get("tvm_ms"):
            r["tvm_speedup"] = base / r["tvm_ms"]


def table(rows: list[dict], tvm: bool) -> str:
    head = "| form | ORT ms [min-max] | ORT speedup | cosine mean | cosine min |"
    sep = "|---|---|---|---|---|"
    if tvm:
        head += " x86 tuned ms | x86 speedup |"
        sep += "---|---|"
    lines = [head + " note |", sep + "---|"]
    for r in rows:
        rm = r["ort_rounds_ms"]
        line = (f"| {r['name']} | {r['ort_ms']:.2f} [{min(rm):.2f}-{max(rm):.2f}] | {r['ort_speedup']:.2f} "
                f"| {r['cosine']:.4f} | {r['cosine_min']:.4f} |")
        if tvm:
            t = r.get("tvm_ms")
            line += (f" {t:.2f} | {r['tvm_speedup']:.2f} |" if t else f" - ({r.get('tvm_note', '')}) | - |")
        lines.append(line + f" {r['note']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512, help="sequence length of the export (MiniLM allows <= 512)")
    ap.add_argument("--docs", type=int, default=24, help="held-out documents for the cosine (default 24)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tvm", action="store_true", help="also compile and time each row with the tuned x86 target")
    ap.add_argument("--tune-trials", type=int, default=8, help="MetaSchedule trials per new workload (default 8)")
    ap.add_argument("--db", type=Path, default=ROOT / "bench" / "out" / "tuning-db" / "minilm-long")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args()
    if not 16 <= args.seq <= 512 or args.seq % 8:
        raise SystemExit(f"--seq {args.seq}: use a multiple of 8 between 16 and 512 (MiniLM's position table)")
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    import minilm as mb

    t_start = time.perf_counter()
    models = args.out / "models"
    models.mkdir(parents=True, exist_ok=True)
    tok = mb.tokenizer()
    calib = documents(tok, args.seq, N_CALIB, seed=1)
    held = documents(tok, args.seq, args.docs, seed=2)
    lens = held["attention_mask"].sum(-1).ravel()
    log(f"{args.docs} held-out documents, {int(lens.min())}-{int(lens.max())} tokens (median {int(np.median(lens))})")
    path = export(args.seq, models, calib)
    rows = make_rows(path, calib, args.seq, models)
    feeds = [{k: v[i] for k, v in held.items()} for i in range(args.docs)]
    measure_ort(rows, feeds, args.rounds)
    if args.tvm:
        measure_tvm(rows, feeds, args)
    header = (f"all-MiniLM-L6-v2 at sequence {args.seq} (batch 1), {args.threads} threads; {args.docs} held-out "
              f"documents of {int(lens.min())}-{int(lens.max())} tokens (median {int(np.median(lens))}); cosine = "
              f"embedding cosine with the original under onnxruntime. Total {time.perf_counter() - t_start:.0f} s.")
    md = f"{header}\n\n{table(rows, args.tvm)}\n"
    print(md)
    from compare import write_results

    write_results(args.out, "attention_forms", md, rows, say=log, header=header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
