"""Where one recovery step's time goes (graphopt.recovery.recover on EfficientNet-Lite0), against plain torch.

One candidate (the `width` pass at --ratio on the --sites costliest sites, least-squares repair
on 8 photos), then in ONE process, alternately (--rounds rounds, medians reported):
  reference  the same EfficientNet-Lite0 as a plain torch module (efficientnet_lite_pytorch),
             forward + backward at batch --batch x --size px (all weights train: an upper bound)
  recover    graphopt.recovery.recover.recover(steps=--steps) on fit photos (no select evaluation inside):
             seconds per step, and the sections of one step timed separately
Prints ratios to the reference (the machine is shared: milliseconds alone mean little), the load
average and the CPU model.

    .venv/bin/python bench/recover_step.py [--steps 12] [--rounds 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))
from recover import PHOTOS, Photos, width_candidate  # noqa: E402  (bench/recover.py)

from graphopt.driver import materialize  # noqa: E402
from graphopt.plugin import MoveContext  # noqa: E402

MODEL = ROOT / "models" / "efficientnet_lite0.onnx"


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--sites", default="6")
    ap.add_argument("--fit", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="recover's threads (0: its own choice)")
    ap.add_argument("--ref-threads", type=int, default=1, help="the torch reference's threads")
    ap.add_argument("--train", default="changed", choices=["changed", "all"])
    args = ap.parse_args()
    import torch

    from graphopt.recovery.recover import RecoverOptions, recover

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    photos = sorted(PHOTOS.glob("*.jpg"))
    fit = Photos(photos[:args.fit])
    base, p, space, g = width_candidate(args.ratio, args.sites)
    cand, _ = materialize(base, space, g, {p.name: p}, MoveContext(base.proto, Photos(photos[:8]).arrays(),
                                                                    {"repair": True}))

    from efficientnet_lite0 import load_torch_model

    ref = load_torch_model().train(False)
    x = torch.randn(args.batch, 3, args.size, args.size)

    def reference() -> float:
        torch.set_num_threads(args.ref_threads)
        t = time.perf_counter()
        ref.zero_grad(set_to_none=True)
        ref(x).square().mean().backward()
        return time.perf_counter() - t

    class Never:  # the select split is never scored inside the timed call
        def score(self, model):
            return 0.0

    opts = RecoverOptions(train=args.train, batch_size=args.batch, train_size=args.size, threads=args.threads or None,
                          eval_every_s=1e9)

    class Timed:
        """The fit photos, remembering when each sample is read: a step reads its batch first, so the
        time between two batches' first reads is one step (data, teacher, forward, backward, update)."""

        num_samples = fit.num_samples

        def __init__(self):
            self.reads = []

        def sample(self, i):
            self.reads.append(time.perf_counter())
            return fit.sample(i)

    def ours():
        data = Timed()
        t = time.perf_counter()
        res = recover(cand, base.proto, data, Never(), steps=args.steps, select_before=0.0, options=opts)
        total = time.perf_counter() - t
        starts = data.reads[::-1][args.batch - 1::args.batch][::-1][-res.steps:]  # each training batch's first read
        return statistics.median(np.diff(starts)), total / res.steps, res

    reference()  # warm-up
    refs, steps_s, calls = [], [], []
    for r in range(args.rounds):
        refs.append(statistics.median(reference() for _ in range(3)))
        step, call, res = ours()
        steps_s.append(step)
        calls.append(call)
        print(f"round {r}: reference {refs[-1] * 1e3:.0f} ms, recover {step * 1e3:.0f} ms/step (median step; "
              f"{call * 1e3:.0f} ms/step incl. set-up over {res.steps} steps), "
              f"{getattr(res, 'threads', '?')} threads, load {load()}", flush=True)
    rm, sm = statistics.median(refs), statistics.median(steps_s)
    print(f"{cpu}; torch {torch.__version__}; reference {args.ref_threads} thread(s), recover threads "
          f"{args.threads or 'auto'}; load average {load()}")
    print(f"reference fwd+bwd (batch {args.batch}, {args.size} px): {rm * 1e3:.0f} ms; recover: {sm * 1e3:.0f} ms "
          f"per step (median step, median over {args.rounds} rounds of {args.steps} steps) = x{sm / rm:.2f} "
          f"the reference; incl. set-up {statistics.median(calls) * 1e3:.0f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
