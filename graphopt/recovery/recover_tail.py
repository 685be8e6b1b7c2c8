"""Tail recovery (`--recover-train tail`): distil only the last part of a candidate, on cached activations.

graphopt.recovery.recover's default loop runs the whole student and the teacher every step; a move that
changes the whole network's input (the `resolution` pass) leaves nothing frozen, and on a
loaded 2-core machine a step of 8 images at 192 px took ~3 s (docs/effnet_moves.md): ~150 steps
in 7 minutes, too few to move the select score. Here only the float weights of the last
`tail_fraction` of the weight tensors (graph order; for EfficientNet-Lite0, 1/3 = MBConv blocks
11-15, the head conv, its BN and the classifier) train. Everything before them is frozen, so its
output (the frontier tensors of graphopt.recovery.finetune's TorchGraph) and the teacher's outputs are
computed ONCE per fit sample and its mirror image (image-like inputs; no other augmentation,
since a cached activation cannot be shifted), at most until `cache_share` of the time limit is
spent; then each step runs only the tail, forward and backward, on a batch of cached
activations (batch_size x 4). The loss is opts.output_loss on the outputs (KL for classifiers);
the weights scoring best on the select split (the run's scorer, on the whole model in
onnxruntime) are kept, never worse than the candidate it started from.

torch and onnxruntime are imported inside the functions.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

log = logging.getLogger("graphopt")


def tail_names(candidate, fraction: float) -> list[str]:
    """The last `fraction` of the float weight tensors (graphopt.recovery.finetune.WEIGHT_SLOTS), in graph order."""
    from .finetune import trainable_names

    names = trainable_names(candidate, None, "all")
    k = max(1, int(round(len(names) * float(fraction)))) if names else 0
    return names[len(names) - k:]


def output_loss(o, r, opts):
    """The loss of one output: KL(teacher || student) of the softmax over the last axis at
    opts.temperature (x T^2) for opts.output_loss == "kl" and class scores; else the mean squared
    error divided by the mean square of the teacher's output."""
    import torch

    if opts.output_loss == "kl" and o.dim() >= 2 and o.shape[-1] > 1:
        t = float(opts.temperature)
        lp = torch.log_softmax(r / t, dim=-1)
        return (lp.exp() * (lp - torch.log_softmax(o.float() / t, dim=-1))).sum(-1).mean() * t * t
    return ((o.float() - r) ** 2).mean() / ((r ** 2).mean() + 1e-12)


def recover_tail(candidate, original, fit, score, seconds, steps, opts, select_before, label, adam) -> dict:
    """graphopt.recovery.recover.recover's body for train="tail": `score(model)` -> the select score (float),
    `adam` its Adam class; returns RecoveryResult's fields (recover() builds it: no import cycle)."""
    import onnxruntime as ort
    import torch

    from .finetune import CHECK_TOLERANCE, FinetuneError, TorchGraph
    from .recover_files import with_weights
    from .recover_inputs import image_like

    def result(model, weights, trained, before, after, steps_done, evals, stopped, augment=False,
               loss_first=math.nan, loss_last=math.nan, history=None, threads=0) -> dict:
        return dict(model=model, weights=weights, trained=trained, features=[], select_before=before,
                    select_after=after, steps=steps_done, seconds=time.monotonic() - t0, evals=evals, stopped=stopped,
                    augment=augment, loss_first=loss_first, loss_last=loss_last, history=history or [],
                    threads=threads)

    t0 = time.monotonic()
    deadline = t0 + seconds if seconds is not None else math.inf
    max_steps = steps if steps is not None else math.inf
    tag = f"recover{(' ' + label) if label else ''}"
    if select_before is None:
        select_before = score(candidate)
    names = tail_names(candidate, opts.tail_fraction)
    if not names or fit.num_samples == 0:
        return result(candidate, {}, [], select_before, select_before, 0, 0, "nothing to train")
    threads = int(opts.threads) if opts.threads else 1
    torch.manual_seed(opts.seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(opts.seed)
    tg = TorchGraph(candidate, set(names))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    teacher = ort.InferenceSession(original.SerializeToString(), so, providers=["CPUExecutionProvider"])
    first = fit.sample(0)
    # the interpreter must compute what onnxruntime computes (on one sample)
    cand_sess = ort.InferenceSession(candidate.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        outs = tg({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in first.items() if k in tg.input_names})
    for name, o, c in zip(tg.output_names, outs, cand_sess.run(None, dict(first))):
        err = float(np.max(np.abs(o.numpy() - c))) / (float(np.max(np.abs(c))) + 1e-12) if c.size else 0.0
        if tuple(o.shape) != c.shape or err > CHECK_TOLERANCE:
            raise FinetuneError(f"recover: the torch interpreter disagrees with onnxruntime on output {name!r} "
                                f"(relative error {err:.2e}); please report this model")
    del cand_sess
    flips = opts.augment == "auto" and image_like(first)
    n_out = len(original.graph.output)

    # cache: frontier tensors (student) and teacher outputs per fit sample (and its mirror image)
    cache_end = t0 + opts.cache_share * (deadline - t0) if math.isfinite(deadline) else math.inf
    frozen: list[dict[str, Any]] = []
    ref: list[list[np.ndarray]] = []
    for i in rng.permutation(fit.num_samples).tolist():
        if time.monotonic() > cache_end and frozen:
            break
        s = fit.sample(i)
        for f in ((False, True) if flips else (False,)):
            x = {k: np.ascontiguousarray(v[..., ::-1]) if f else v for k, v in s.items()}
            with torch.no_grad():
                frozen.append(tg.run_frozen({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in x.items()
                                             if k in tg.input_names}))
            ref.append(teacher.run([o.name for o in original.graph.output], x))
    keys = list(frozen[0])
    cached = {k: torch.cat([d[k] for d in frozen]) for k in keys}
    targets = [torch.from_numpy(np.concatenate([r[j] for r in ref])).float() for j in range(n_out)]
    n = len(frozen)
    del frozen, ref
    log.info("%s: %d tail tensor(s) train; %d cached activation(s) (%d fit samples%s) in %.0f s", tag, len(names), n,
             n // (2 if flips else 1), ", mirrored too" if flips else "", time.monotonic() - t0)

    tensors = [tg.params[nm] for nm in names]
    base_lrs = [opts.lr * (float(t.detach().pow(2).mean().sqrt()) or 1e-3) for t in tensors]
    opt = adam(tensors)
    best_score, best = select_before, [t.detach().clone() for t in tensors]
    bs = max(1, min(n, 4 * int(opts.batch_size)))
    history: list[dict[str, float]] = []
    evals, step, loss_first, loss_last, eval_cost, step_cost = 0, 0, math.nan, math.nan, 0.0, 0.0
    t_train = time.monotonic()
    span = (deadline - t_train) if math.isfinite(deadline) else None
    every = opts.eval_every_s if opts.eval_every_s else max(2.0, (span or 60.0) / 8)
    next_eval, last_eval_step = t_train + every, 0
    stopped = "time" if math.isfinite(deadline) else "steps"

    def evaluate() -> None:
        nonlocal best_score, best, evals, eval_cost, last_eval_step
        te = time.monotonic()
        value = score(with_weights(candidate, {nm: t.detach().numpy().copy() for nm, t in zip(names, tensors)}))
        evals += 1
        last_eval_step = step
        if math.isfinite(value) and value > best_score:
            best_score, best = value, [t.detach().clone() for t in tensors]
        eval_cost = max(eval_cost, time.monotonic() - te)
        history.append({"t": round(time.monotonic() - t0, 3), "step": step, "loss": loss_last, "select": value})
        log.info("%s: %.0f s, step %d, loss %.4g, select %.6f (best %.6f, before %.6f)", tag,
                 time.monotonic() - t0, step, loss_last, value, best_score, select_before)

    try:
        while step < max_steps:
            now = time.monotonic()
            if now + step_cost + eval_cost > deadline:
                break
            if now >= next_eval and step > last_eval_step:
                evaluate()
                next_eval = time.monotonic() + every
                continue
            ts = time.monotonic()
            idx = torch.from_numpy(rng.choice(n, bs, replace=False))
            got = tg.run_live({k: v[idx] for k, v in cached.items()})
            loss = 0.0
            for o, r in zip(got[:n_out], targets):
                loss = loss + output_loss(o, r[idx], opts)
            value = float(loss.detach())
            if not math.isfinite(value):
                stopped = "diverged"
                break
            loss_last = value
            if step == 0:
                loss_first = value
            frac = 0.0 if span is None else min(1.0, (ts - t_train) / span)
            if steps is not None and span is None:
                frac = step / max(1, steps)
            factor = min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * frac))
            opt.zero_grad()
            loss.backward()
            opt.step([lr0 * factor for lr0 in base_lrs])
            step += 1
            step_cost = time.monotonic() - ts
        else:
            stopped = "steps"
        if step > last_eval_step:
            evaluate()
    except KeyboardInterrupt:
        stopped = "interrupted"
        if step > last_eval_step:
            try:
                evaluate()
            except KeyboardInterrupt:
                pass
        log.warning("%s: interrupted at step %d: keeping the best weights seen on the select split", tag, step)
    weights = {nm: b.numpy().copy() for nm, b in zip(names, best)}
    return result(with_weights(candidate, weights), weights, names, select_before, best_score, step, evals, stopped,
                  flips, loss_first, loss_last, history, threads)
