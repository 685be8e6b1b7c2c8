"""Per-pass table on EfficientNet-Lite0: what each move costs in fidelity and buys in FLOPs and latency.

For each approximate pass (depthwise, kernel, width when passes/width.py imports) at each of its
non-keep choices, applied (a) to every site offering that choice and (b) to the single most costly
such site (by FLOPs): FLOPs and parameters before/after (estimated by formula, graphopt.reporting.analysis),
onnxruntime latency speedup vs the original (measured, interleaved rounds in this process), and
fidelity on the held-out eval images (logit cosine, top-1 agreement with the original) without
repair, with least-squares repair, and with least-squares repair + `--finetune` distillation.
Repair and finetune fit on all 16 calibration images; the eval images are disjoint from them.

    .venv/bin/python bench/passes.py [--quick] [--steps 200] [--batch 4] [--rounds 5] [--out bench/out]

See bench/README.md. Writes <out>/passes.md (the table) and <out>/passes.json (raw numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from graphopt.targets.ort import OrtTarget

from graphopt.reporting.analysis import analyze
from graphopt.driver import materialize
from graphopt.evaluation.evaluate import compare
from graphopt.recovery.finetune import finetune
from graphopt.genotype import Genotype, SearchSpace
from graphopt.modelio.ir import load_model, model_hash
from graphopt.plugin import MoveContext

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
CALIB = ROOT / "models" / "efficientnet_lite0_calib.npz"
EVAL = ROOT / "models" / "efficientnet_lite0_eval.npz"
THREADS = 2
PASSES = {"depthwise": "graphopt.passes.depthwise:DepthwiseSeparable",
          "kernel": "graphopt.passes.kernel:KernelResize",
          "width": "graphopt.passes.width:WidthPrune"}
EXACT = 1 - 1e-6  # cosine above this without repair: the move is exact, nothing to repair


def log(msg: str) -> None:
    print(f"[passes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_pass(name: str):
    import importlib

    mod, _, attr = PASSES[name].partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)()
    except Exception as e:  # noqa: BLE001 - a pass another helper is still writing: leave it out
        log(f"pass {name} left out: {type(e).__name__}: {e}")
        return None


def choice_groups(p, sites) -> dict[str, list]:
    """label -> [(site, choice)]: kernel by (K -> K'), the others by choice value."""
    groups: dict[str, list] = {}
    for s in sites:
        for c in s.choices[1:]:
            if p.name == "kernel":
                k = (int(s.choices[1]) + int(s.choices[2])) // 2
                label = f"{k}x{k}->{c}x{c}"
            elif p.name == "depthwise":
                label = f"rank {c}"
            else:
                label = f"{p.name} {c}"
            groups.setdefault(label, []).append((s, c))
    return groups


def session(model) -> ort.InferenceSession:
    opts = OrtTarget(threads=THREADS)._options()
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def time_once(sess, feed, warmup: int, repeat: int, number: int) -> float:
    for _ in range(warmup):
        sess.run(None, feed)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            sess.run(None, feed)
        samples.append((time.perf_counter() - t0) * 1000.0 / number)
    return statistics.median(samples)


def fidelity(ref, model, xs) -> tuple[float, float]:
    s = session(model)
    outs = [s.run(None, {"input": x}) for x in xs]
    return (compare(ref, outs, ["logits"], "cosine").value, compare(ref, outs, ["logits"], "top1").value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: first choice of each pass only, 5 finetune steps, 1 latency round")
    ap.add_argument("--steps", type=int, default=200, help="finetune Adam steps per row (default 200)")
    ap.add_argument("--batch", type=int, default=4, help="finetune images per step (default 4)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (default 5)")
    ap.add_argument("--passes", default="depthwise,kernel,width")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args(argv)
    steps, rounds = (min(args.steps, 5), 1) if args.quick else (args.steps, args.rounds)
    warmup, repeat, number = (2, 3, 5) if args.quick else (5, 15, 10)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ort.set_default_logger_severity(3)
    t_start = time.monotonic()

    base = load_model(MODEL)
    with np.load(CALIB) as z:
        calib = {"input": z["input"].astype(np.float32)}
    with np.load(EVAL) as z:
        held = z["input"].astype(np.float32)
    s0 = session(base.proto)
    ref = [s0.run(None, {"input": x}) for x in held]
    st0 = analyze(base.proto)
    feed = {"input": held[0]}
    rows: list[dict] = []
    models = {"original": base.proto}
    for name in [n.strip() for n in args.passes.split(",") if n.strip()]:
        p = load_pass(name)
        if p is None:
            continue
        space = SearchSpace(p.sites(base.graph()))
        groups = choice_groups(p, space.sites)
        log(f"{name}: {len(space.sites)} sites, choices {list(groups)}")
        for label, pairs in list(groups.items())[:1 if args.quick else None]:
            top = max(pairs, key=lambda sc: sc[0].cost)
            scopes = [("all", pairs)] + ([("top", [top])] if len(pairs) > 1 else [])
            for scope, chosen in scopes:
                g = Genotype({s.key: c for s, c in chosen})
                row = {"pass": name, "choice": label, "scope": scope, "sites": len(chosen),
                       "site": top[0].key if scope == "top" or len(chosen) == 1 else None}
                t = time.monotonic()
                ctx = {r: MoveContext(base.proto, calib, {"repair": r}) for r in (False, True)}
                try:
                    plain, applied = materialize(base, space, g, {name: p}, ctx[False])
                    ls, _ = materialize(base, space, g, {name: p}, ctx[True])
                except Exception as e:  # noqa: BLE001 - a failed move is a row that says why
                    row["error"] = f"{type(e).__name__}: {e}"
                    rows.append(row)
                    log(f"{name} {label} {scope}: {row['error']}")
                    continue
                row["applied"] = sum(v == "applied" for v in applied.values())
                st = analyze(ls)
                row.update(flops=[st0.total_flops, st.total_flops], params=[st0.total_params, st.total_params])
                row["plain"] = fidelity(ref, plain, held)
                row["repair_differs"] = model_hash(plain) != model_hash(ls)
                row["ls"] = fidelity(ref, ls, held) if row["repair_differs"] else row["plain"]
                row["repair_s"] = time.monotonic() - t
                if row["plain"][0] >= EXACT and row["ls"][0] >= EXACT:
                    row["ft"], row["ft_s"] = row["ls"], 0.0
                else:
                    res = finetune(ls, base.proto, calib, steps, batch_size=args.batch, seed=0)
                    row["ft"], row["ft_s"] = fidelity(ref, res.model, held), res.seconds
                    row["ft_loss"] = [res.loss_before, res.loss_after]
                key = f"{name}|{label}|{scope}"
                models[key] = ls
                rows.append(row)
                log(f"{key}: cos {row['plain'][0]:.4f} / {row['ls'][0]:.4f} / {row['ft'][0]:.4f} "
                    f"(finetune {row['ft_s']:.0f}s)")
    # latency: every model (the repaired one stands for its variants: same graph) round-robin
    log(f"latency: {len(models)} models x {rounds} rounds")
    sessions = {k: session(m) for k, m in models.items()}
    keys = list(sessions)
    lat: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            lat[k].append(time_once(sessions[k], feed, warmup, repeat, number))
    for row in rows:
        key = f"{row['pass']}|{row['choice']}|{row['scope']}"
        if key in lat:
            ratios = [o / c for o, c in zip(lat["original"], lat[key])]
            row["speedup"] = statistics.median(ratios)
            row["speedup_range"] = [min(ratios), max(ratios)]
            row["latency_ms"] = statistics.median(lat[key])
    table = render(rows, statistics.median(lat["original"]), steps, args, rounds)
    print(table)
    (out_dir / "passes.md").write_text(table + "\n")
    (out_dir / "passes.json").write_text(json.dumps({"rows": rows, "original_ms": lat["original"],
                                                     "finetune_steps": steps, "batch": args.batch,
                                                     "rounds": rounds, "quick": args.quick,
                                                     "wall_s": time.monotonic() - t_start}, indent=1))
    log(f"done in {time.monotonic() - t_start:.0f}s: {out_dir / 'passes.md'}")
    return 0


def render(rows, original_ms, steps, args, rounds) -> str:
    def m(x):
        return f"{x / 1e6:.1f}"

    def fid(v):
        return f"{v[0]:.4f} / {v[1]:.2f}"

    head = (f"EfficientNet-Lite0, 6 held-out images; original {original_ms:.2f} ms (onnxruntime CPU, {THREADS} "
            f"threads, median of {rounds} interleaved rounds). Fidelity = logit cosine / top-1 agreement. "
            f"Finetune: {steps} Adam steps, {args.batch} images per step, touched weights only.")
    lines = [head, "",
             ("| pass | choice | sites | MFLOPs | params (M) | speedup | no repair | LS repair | LS + finetune "
              "| finetune s |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scope = "all" if r["scope"] == "all" else "top-1 site"
        if "error" in r:
            lines.append(f"| {r['pass']} | {r['choice']} | {scope} ({r['sites']}) | | | | failed: {r['error'][:80]} "
                         "| | | |")
            continue
        sp = (f"x{r['speedup']:.2f} ({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f})"
              if "speedup" in r else "-")
        ls = fid(r["ls"]) if r["repair_differs"] else "(no repair)"
        lines.append(f"| {r['pass']} | {r['choice']} | {scope} ({r['sites']}) | {m(r['flops'][0])} -> "
                     f"{m(r['flops'][1])} | {r['params'][0] / 1e6:.3f} -> {r['params'][1] / 1e6:.3f} | {sp} | "
                     f"{fid(r['plain'])} | {ls} | {fid(r['ft'])} | {r['ft_s']:.0f} |")
    lossy = [r for r in rows if "error" not in r and r["plain"][0] < EXACT]
    if lossy:
        def gap(key):
            return statistics.median(1 - r[key][0] for r in lossy)
        lines += ["", (f"Median cosine gap (1 - cosine) over the {len(lossy)} lossy rows: no repair "
                       f"{gap('plain'):.4f}, LS repair {gap('ls'):.4f}, LS + finetune {gap('ft'):.4f}.")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
