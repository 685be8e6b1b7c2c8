"""Recovery (graphopt.recovery.recover) on EfficientNet-Lite0: top-1 before and after distillation.

One candidate: the `width` pass at one ratio on all its sites (or the N most costly, --sites N),
least-squares repair fit on --repair-images photos, then distillation on the fit split of
`models/data/photos-unlabelled` (unlabelled; the first --fit photos), the best weights kept on
the select split (the next --select photos), for at most --seconds. Held-out: top-1 on
`models/data/imagenet-sample` (labels.tsv; never used for a choice) of the original, the
repaired and the recovered candidate, and onnxruntime latency (2 threads, ORT_ENABLE_ALL, rounds
interleaved in this process) of the candidate against the original.

    .venv/bin/python bench/recover.py [--ratio 0.75] [--sites all] [--seconds 420] [--out bench/out]

Preprocessing as models/efficientnet_lite0.py: short side 256 bicubic, centre crop 224,
(x - 127) / 128. Writes <out>/recover.md and <out>/recover.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from compare import interleaved_rounds, session  # noqa: E402

from graphopt.reporting.analysis import analyze  # noqa: E402
from graphopt.driver import materialize  # noqa: E402
from graphopt.evaluation.evaluate import CalibrationData  # noqa: E402
from graphopt.evaluation.fidelity import FidelityChecker  # noqa: E402
from graphopt.genotype import Genotype, SearchSpace  # noqa: E402
from graphopt.modelio.ir import load_model  # noqa: E402
from graphopt.runstore.outputs import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from graphopt.passes.width import WidthPrune  # noqa: E402
from graphopt.plugin import MoveContext  # noqa: E402
from graphopt.recovery.recover import RecoverOptions, recover  # noqa: E402

MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
PHOTOS = ROOT / "models" / "data" / "photos-unlabelled"
HELD_OUT = ROOT / "models" / "data" / "imagenet-sample"


def log(msg: str) -> None:
    print(f"[recover {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def preprocess(path: Path) -> np.ndarray:
    """uint8 224x224x3: short side 256 bicubic, centre crop 224 (models/efficientnet_lite0.py)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    nw, nh = max(256, round(w * s)), max(256, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - 224) // 2, (nh - 224) // 2
    return np.asarray(img.crop((left, top, left + 224, top + 224)), dtype=np.uint8)


def to_input(crop: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(((crop.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None])


class Photos:
    """A data source for graphopt.recovery.recover: num_samples, sample(i) -> {"input": [1, 3, 224, 224]}.
    Images decoded once and kept as uint8 (150 kB each)."""

    def __init__(self, files: list[Path], name: str = "input"):
        self.name = name
        self.crops = [preprocess(f) for f in files]

    @property
    def num_samples(self) -> int:
        return len(self.crops)

    def sample(self, i: int) -> dict[str, np.ndarray]:
        return {self.name: to_input(self.crops[i])}

    def arrays(self) -> dict[str, np.ndarray]:
        return {self.name: np.stack([to_input(c) for c in self.crops])}


def top1(model_bytes: bytes, data: Photos, labels: list[int]) -> float:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    hits = sum(int(np.argmax(sess.run(None, data.sample(i))[0]) == y) for i, y in enumerate(labels))
    return 100.0 * hits / len(labels)


def width_candidate(ratio: float, which: str):
    """(base, pass, space, genotype): width `ratio` at all sites, or at the `which` costliest (by FLOPs)."""
    base = load_model(MODEL, {})
    p = WidthPrune()
    sites = [s for s in p.sites(base.graph()) if ratio in s.choices]
    if which != "all":
        flops = {n.name: n.flops for n in analyze(base.proto).nodes}
        sites = sorted(sites, key=lambda s: -sum(flops.get(n, 0) for n in s.nodes))[:int(which)]
    return base, p, SearchSpace(p.sites(base.graph())), Genotype({s.key: ratio for s in sites})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--sites", default="all", help="all, or N: the N sites with the most FLOPs")
    ap.add_argument("--seconds", type=float, default=420.0, help="distillation time limit")
    ap.add_argument("--fit", type=int, default=800)
    ap.add_argument("--select", type=int, default=100)
    ap.add_argument("--repair-images", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--train", default="changed", choices=["changed", "all"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-size", type=int, default=128, help="distil on random crops resized to this side")
    ap.add_argument("--eval-every", type=float, default=60.0, help="seconds between select-split evaluations")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="distillation threads (torch + teacher); 0: graphopt.recovery.recover probes 1 vs torch's default")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    t_all = time.monotonic()

    photos = sorted(PHOTOS.glob("*.jpg"))
    fit = Photos(photos[:args.fit])
    select = Photos(photos[args.fit:args.fit + args.select])
    rows = [ln.split("\t") for ln in (HELD_OUT / "labels.tsv").read_text().splitlines()[1:]][:args.held_out]
    held = Photos([HELD_OUT / r[0] for r in rows])
    labels = [int(r[1]) for r in rows]
    log(f"data: fit {fit.num_samples}, select {select.num_samples} (photos-unlabelled), held-out {len(labels)} "
        f"(imagenet-sample); {time.monotonic() - t_all:.0f} s")

    base, p, space, g = width_candidate(args.ratio, args.sites)
    repair = Photos(photos[:args.repair_images]).arrays()  # the first fit photos
    t = time.monotonic()
    cand, applied = materialize(base, space, g, {p.name: p}, MoveContext(base.proto, repair, {"repair": True}))
    log(f"candidate: width {args.ratio} on {len(g)} sites ({sum(v == 'applied' for v in applied.values())} "
        f"applied), least-squares repair on {args.repair_images} photos: {time.monotonic() - t:.0f} s")
    checker = FidelityChecker(base.proto, CalibrationData(select.arrays(), "select"), "cosine")
    sel_before = checker.score(cand).value
    t = time.monotonic()
    res = recover(cand, base.proto, fit, checker, seconds=args.seconds, select_before=sel_before,
                  options=RecoverOptions(train=args.train, batch_size=args.batch, lr=args.lr, threads=args.threads or None,
                                         train_size=args.train_size, eval_every_s=args.eval_every),
                  label=f"width {args.ratio} x{len(g)}")
    log(f"recovery: {res.steps} steps in {time.monotonic() - t:.0f} s ({res.stopped}, {res.threads} thread(s)); select cosine "
        f"{res.select_before:.4f} -> {res.select_after:.4f}; features {res.features}")
    atomic_write_bytes(out / "recover_candidate.onnx", res.model.SerializeToString())
    atomic_write_bytes(out / "recover_repaired.onnx", cand.SerializeToString())

    t = time.monotonic()
    acc = {"original": top1(base.proto.SerializeToString(), held, labels),
           "repaired": top1(cand.SerializeToString(), held, labels),
           "recovered": top1(res.model.SerializeToString(), held, labels)}
    heldc = FidelityChecker(base.proto, CalibrationData(held.arrays() if len(labels) <= 200 else
                                                        Photos([HELD_OUT / r[0] for r in rows[:200]]).arrays(),
                                                        "held"), "cosine")
    cos = {"repaired": heldc.score(cand).value, "recovered": heldc.score(res.model).value}
    log(f"held-out top-1 {acc}, cosine (200 images) {cos}: {time.monotonic() - t:.0f} s")

    sessions = {"original": session(MODEL), "candidate": session(out / "recover_candidate.onnx")}
    timing = [{"name": "original"}, {"name": "candidate"}]
    interleaved_rounds(timing, sessions, held.sample(0), args.rounds, say=log)
    ms = {r["name"]: statistics.median(r["rounds_ms"]) for r in timing}
    ratio = ms["original"] / ms["candidate"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "args": vars(args),
              "sites": len(g), "select_before": res.select_before, "select_after": res.select_after,
              "recovery": res.to_dict(), "history": res.history, "top1": acc, "held_cosine": cos,
              "latency_ms": ms, "speedup": ratio, "wall_s": round(time.monotonic() - t_all, 1)}
    md = (f"| candidate | select cosine | held-out cosine | top-1 (imagenet-sample, {len(labels)}) | ORT ms (x orig) |\n"
          f"|---|---|---|---|---|\n"
          f"| original | 1 | 1 | {acc['original']:.1f}% | {ms['original']:.2f} |\n"
          f"| width {args.ratio} x{len(g)}, LS repair | {res.select_before:.4f} | {cos['repaired']:.4f} | "
          f"{acc['repaired']:.1f}% | {ms['candidate']:.2f} (x{ratio:.2f}) |\n"
          f"| + recovery {res.seconds:.0f} s, {res.steps} steps | {res.select_after:.4f} | {cos['recovered']:.4f} | "
          f"{acc['recovered']:.1f}% | (same graph) |\n")
    stem = f"recover_w{args.ratio}_{args.sites}"
    atomic_write_text(out / f"{stem}.md", md)
    atomic_write_json(out / f"{stem}.json", result)
    print(md)
    log(f"done in {time.monotonic() - t_all:.0f} s; {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
