"""EfficientNet-Lite0: distil a reduced-resolution (/ block-removed) candidate's TAIL with cached activations.

graphopt.recovery.recover trains by running the whole student (and teacher) every step: on this 2-core
machine under load ~3 s per step of 8 images at 192 px (docs/effnet_moves.md), ~130 steps in
7 minutes. Here only the weights from MBConv block --from-block on (plus conv_head, its BN and
the classifier) train; everything before is frozen, so its output (the frontier tensors of
graphopt.recovery.finetune's TorchGraph) and the teacher's (the original at 224 px) logits are computed
ONCE per fit image and flip (augmentation: horizontal flips only), then each step runs only the
tail forward and backward on a batch of cached activations. Loss: KL(teacher || student) of the
softmax (T = --temperature), plus normalised MSE of the pooled features when their shapes match.
Best weights on the select split (top-1 agreement with the original on --select photos, their
activations cached the same way) are kept. Held-out top-1 on imagenet-sample before / after.

    .venv/bin/python bench/effnet_tail.py --candidates crop192,crop176 --from-block 11 --seconds 300
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from effnet_resolution import build  # noqa: E402
from recover import HELD_OUT, MODEL, PHOTOS, Photos, top1  # noqa: E402

from graphopt.recovery.finetune import TorchGraph, trainable_names  # noqa: E402
from graphopt.modelio.ir import load_model  # noqa: E402
from graphopt.runstore.outputs import atomic_write_bytes, atomic_write_json  # noqa: E402
from graphopt.recovery.recover import _Adam, with_weights  # noqa: E402


def log(msg: str) -> None:
    print(f"[tail {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tail_names(model, start: int) -> list[str]:
    out = []
    for n in trainable_names(model, None, "all"):
        m = re.match(r"_blocks\.(\d+)\.", n)
        if (m and int(m.group(1)) >= start) or n.startswith(("_conv_head", "_bn1.", "_fc.")):
            out.append(n)
    return out


def cache(tg, teacher, photos: Photos, flips: bool):
    """Frontier tensors (student) and teacher logits per image (and its mirror image)."""
    import torch

    fr, te = [], []
    for i in range(photos.num_samples):
        x = photos.sample(i)["input"]
        for f in ((False, True) if flips else (False,)):
            xi = np.ascontiguousarray(x[:, :, :, ::-1]) if f else x
            with torch.no_grad():
                fr.append({k: v for k, v in tg.run_frozen({"input": torch.from_numpy(xi)}).items()})
            te.append(teacher.run(None, {"input": xi})[0])
    keys = list(fr[0])
    return {k: torch.cat([d[k] for d in fr]) for k in keys}, torch.from_numpy(np.concatenate(te)).float()


def main() -> int:
    import onnxruntime as ort
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default="crop192")
    ap.add_argument("--from-block", type=int, default=11)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--fit", type=int, default=800)
    ap.add_argument("--select", type=int, default=200)
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam lr relative to each tensor's RMS")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=100, help="steps between select evaluations")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--tag", default="tail")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    torch.set_num_threads(1)
    t_all = time.monotonic()
    photos = sorted(PHOTOS.glob("*.jpg"))
    fit = Photos(photos[:args.fit])
    select = Photos(photos[args.fit:args.fit + args.select])
    rs = [ln.split("\t") for ln in (HELD_OUT / "labels.tsv").read_text().splitlines()[1:]][:args.held_out]
    held = Photos([HELD_OUT / r[0] for r in rs])
    labels = [int(r[1]) for r in rs]
    base = load_model(MODEL, {})
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    teacher = ort.InferenceSession(base.proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    orig = top1(base.proto.SerializeToString(), held, labels)
    log(f"{cpu}; data {time.monotonic() - t_all:.0f} s; original held-out top-1 {orig:.1f}")
    rows = []
    for spec in [s for s in args.candidates.split(",") if s]:
        t = time.monotonic()
        cand = build(base, spec)
        names = tail_names(cand, args.from_block)
        tg = TorchGraph(cand, set(names))
        fit_fr, fit_te = cache(tg, teacher, fit, flips=True)
        sel_fr, sel_te = cache(tg, teacher, select, flips=False)
        t_cache = time.monotonic() - t
        log(f"{spec}: {len(names)} tensors train; cached {len(fit_te)} fit + {len(sel_te)} select activations "
            f"({', '.join(f'{k} {list(v.shape[1:])}' for k, v in fit_fr.items())}) in {t_cache:.0f} s")
        sel_ref = sel_te.argmax(-1)

        def agreement() -> float:
            with torch.no_grad():
                o = tg.run_live(sel_fr)[0]
            return float((o.argmax(-1) == sel_ref).float().mean() * 100)

        tensors = [tg.params[n] for n in names]
        base_lrs = [args.lr * (float(p.detach().pow(2).mean().sqrt()) or 1e-3) for p in tensors]
        opt = _Adam(tensors)
        before_sel = best = agreement()
        best_w = [p.detach().clone() for p in tensors]
        rng = np.random.default_rng(0)
        n, step, T = len(fit_te), 0, args.temperature
        t0 = time.monotonic()
        hist = []
        while time.monotonic() - t0 < args.seconds:
            idx = torch.from_numpy(rng.choice(n, args.batch, replace=False))
            o = tg.run_live({k: v[idx] for k, v in fit_fr.items()})[0]
            lp = torch.log_softmax(fit_te[idx] / T, -1)
            loss = (lp.exp() * (lp - torch.log_softmax(o / T, -1))).sum(-1).mean() * T * T
            frac = (time.monotonic() - t0) / args.seconds
            f = min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            opt.zero_grad()
            loss.backward()
            opt.step([lr * f for lr in base_lrs])
            step += 1
            if step % args.eval_every == 0:
                a = agreement()
                hist.append({"step": step, "t": round(time.monotonic() - t0, 1), "loss": float(loss.detach()), "select": a})
                if a > best:
                    best, best_w = a, [p.detach().clone() for p in tensors]
                log(f"{spec}: step {step}, {time.monotonic() - t0:.0f} s, KL {float(loss.detach()):.4f}, select agreement "
                    f"{a:.1f} (best {best:.1f}, before {before_sel:.1f})")
        a = agreement()
        if a > best:
            best, best_w = a, [p.detach().clone() for p in tensors]
        model = with_weights(cand, {nm: w.numpy() for nm, w in zip(names, best_w)})
        path = out / f"effnet_{spec.replace('+', '_')}_tail{args.from_block}.onnx"
        atomic_write_bytes(path, model.SerializeToString())
        before, after = top1(cand.SerializeToString(), held, labels), top1(model.SerializeToString(), held, labels)
        row = {"candidate": spec, "from_block": args.from_block, "tensors": len(names), "cache_s": round(t_cache, 1),
               "train_s": args.seconds, "steps": step, "select_before": before_sel, "select_after": best,
               "top1_before": before, "top1_after": after, "history": hist, "path": str(path)}
        rows.append(row)
        log(f"{spec}: held-out top-1 {before:.1f} -> {after:.1f} (original {orig:.1f}); select {before_sel:.1f} -> "
            f"{best:.1f}; {step} steps; {time.monotonic() - t:.0f} s in all")
        atomic_write_json(out / f"effnet_{args.tag}.json", {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                           "cpu": cpu, "args": vars(args), "original_top1": orig,
                                                           "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
