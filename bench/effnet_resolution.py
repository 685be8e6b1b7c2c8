"""EfficientNet-Lite0: input-resolution (+ depth) candidates, distilled against the full-resolution original.

Each candidate is built with graphopt's passes (`resolution`: an in-graph centre crop / resize
right after the 224x224 input; `depth`: residual blocks removed), then distilled with
graphopt.recovery.recover on the FIT split (the first --fit photos of models/data/photos-unlabelled,
unlabelled): the teacher (the original) sees the 224 input, the student sees it through its
in-graph crop; feature maps differ in size, so only the logits are matched (normalised MSE,
graphopt.recovery.recover); random flips and shifts; --train all|changed. The best weights on the SELECT
split (the next --select photos; score: top-1 agreement with the original) are kept. Held-out:
top-1 on models/data/imagenet-sample (labels; never used for a choice) before and after.
Recovered models go to <out>/effnet_<name>.onnx (bench/effnet_frontier.py times them).

    .venv/bin/python bench/effnet_resolution.py --candidates crop192,crop176,crop192+b9 --seconds 420

A candidate is '+'-joined moves: cropS / resizeS (resolution), bN (remove MBConv block N, depth).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from recover import HELD_OUT, MODEL, PHOTOS, Photos, top1  # noqa: E402

from graphopt.driver import materialize  # noqa: E402
from graphopt.evaluation.evaluate import CalibrationData  # noqa: E402
from graphopt.evaluation.fidelity import FidelityChecker  # noqa: E402
from graphopt.genotype import Genotype, SearchSpace  # noqa: E402
from graphopt.modelio.ir import load_model  # noqa: E402
from graphopt.runstore.outputs import atomic_write_bytes, atomic_write_json  # noqa: E402
from graphopt.passes.depth import DepthRemoval  # noqa: E402
from graphopt.passes.resolution import InputResolution  # noqa: E402
from graphopt.plugin import MoveContext  # noqa: E402
from graphopt.recovery.recover import RecoverOptions, recover  # noqa: E402


import logging
logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")


def log(msg: str) -> None:
    print(f"[effnet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(base, spec: str):
    passes = {"resolution": InputResolution(), "depth": DepthRemoval()}
    g0 = base.graph()
    sites = [s for p in passes.values() for s in p.sites(g0)]
    space = SearchSpace(sites)
    genes = {}
    for move in spec.split("+"):
        if move.startswith(("crop", "resize")):
            genes["resolution:input"] = move
        elif move.startswith("b") and move[1:].isdigit():
            genes[f"depth:/_blocks.{int(move[1:])}/Add"] = "remove"
        else:
            raise SystemExit(f"unknown move {move!r} in {spec!r}")
    model, applied = materialize(base, space, Genotype(genes), passes, MoveContext(base.proto))
    bad = [k for k, v in applied.items() if v != "applied"]
    if bad:
        raise SystemExit(f"{spec}: not applied: {bad}")
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="crop192,crop176")
    ap.add_argument("--seconds", type=float, default=420.0, help="distillation time per candidate (0: none)")
    ap.add_argument("--fit", type=int, default=800)
    ap.add_argument("--select", type=int, default=200)
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--train", default="all", choices=["changed", "all"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-every", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--loss", default="kl", choices=["mse", "kl"], help="output loss (graphopt.recovery.recover)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--tag", default="run", help="JSON file name: <out>/effnet_resolution_<tag>.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    log(cpu)
    t_all = time.monotonic()
    photos = sorted(PHOTOS.glob("*.jpg"))
    fit = Photos(photos[:args.fit])
    select = Photos(photos[args.fit:args.fit + args.select])
    rows = [ln.split("\t") for ln in (HELD_OUT / "labels.tsv").read_text().splitlines()[1:]][:args.held_out]
    held = Photos([HELD_OUT / r[0] for r in rows])
    labels = [int(r[1]) for r in rows]
    base = load_model(MODEL, {})
    checker = FidelityChecker(base.proto, CalibrationData(select.arrays(), "select"), "imagenet_top1")
    log(f"data: fit {fit.num_samples}, select {select.num_samples}, held-out {len(labels)}: "
        f"{time.monotonic() - t_all:.0f} s")
    results = []
    orig = top1(base.proto.SerializeToString(), held, labels)
    log(f"original: held-out top-1 {orig:.1f}")
    for spec in [s for s in args.candidates.split(",") if s]:
        t = time.monotonic()
        cand = build(base, spec)
        before = top1(cand.SerializeToString(), held, labels)
        sel = checker.score(cand).value
        log(f"{spec}: held-out top-1 {before:.1f}, select agreement {sel:.1f} ({time.monotonic() - t:.0f} s)")
        row = {"candidate": spec, "top1_before": before, "select_before": sel}
        if args.seconds > 0:
            t = time.monotonic()
            res = recover(cand, base.proto, fit, checker, seconds=args.seconds, select_before=sel,
                          options=RecoverOptions(train=args.train, batch_size=args.batch, lr=args.lr,
                                                 threads=args.threads or None, eval_every_s=args.eval_every,
                                                 output_loss=args.loss, temperature=args.temperature),
                          label=spec)
            took = time.monotonic() - t
            after = top1(res.model.SerializeToString(), held, labels)
            atomic_write_bytes(out / f"effnet_{spec.replace('+', '_')}_{args.loss}.onnx", res.model.SerializeToString())
            row.update(top1_after=after, select_after=res.select_after, seconds=round(took, 1), steps=res.steps,
                       threads=res.threads, history=res.history, features=res.features)
            log(f"{spec}: recovered in {took:.0f} s ({res.steps} steps, {res.threads} thread(s)): select "
                f"{sel:.1f} -> {res.select_after:.1f}, held-out top-1 {before:.1f} -> {after:.1f}")
        else:
            atomic_write_bytes(out / f"effnet_{spec.replace('+', '_')}_norecover.onnx", cand.SerializeToString())
        results.append(row)
        atomic_write_json(out / f"effnet_resolution_{args.tag}.json",
                          {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "args": vars(args),
                           "original_top1": orig, "rows": results})
    print("| candidate | held-out top-1 before | after | select agreement before -> after | time |\n|---|---|---|---|---|")
    print(f"| original | {orig:.1f} | | | |")
    for r in results:
        print(f"| {r['candidate']} | {r['top1_before']:.1f} | {r.get('top1_after', float('nan')):.1f} | "
              f"{r['select_before']:.1f} -> {r.get('select_after', float('nan')):.1f} | {r.get('seconds', 0)} s, "
              f"{r.get('steps', 0)} steps |")
    log(f"done in {time.monotonic() - t_all:.0f} s; {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
