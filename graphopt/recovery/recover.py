"""Recovery: distil the most promising candidates toward the original (`--recover-top K`).

The cheap search phase (moves + least-squares repair, judged on the select split) ranks many
candidates; this phase spends real time on a few of them. Each chosen candidate is trained in
torch (graphopt.recovery.finetune's ONNX -> torch interpreter) on the FIT split so that its intermediate
features at block boundaries and its final outputs match the original's (label-free feature
mimicking, MiR CVPR'22 style; loss: per tensor, mean squared error divided by the mean square of
the original's tensor, features averaged, plus the outputs). The weights with the best score on
the SELECT split are kept (never worse than the candidate it started from, on that split).

Which tensors are matched (`choose_features`): tensors present in both graphs by name with the
same shape, downstream of a trained weight, at a block boundary: the output of a residual Add,
or the first tensor where a changed region (a tensor the original lacks or holds with another
shape) is absorbed again. At most `max_features`, evenly spread in graph order.

What trains (`train`): "changed" (default) the weights the moves created or changed (pruned convs,
their refit consumers, a new depthwise pair), "all" every float weight (graphopt.recovery.finetune's
trainable_names). BatchNormalization statistics never train.

Image-like inputs ([N, 1|3, H, W] floats, H, W >= 16) get cheap augmentation: a random
horizontal flip and a shift of up to H/16 pixels (edge padded), the same for the original
(teacher) and the candidate. Time is the unit: `seconds` bounds the whole call (set-up, training,
select-split evaluations); Ctrl-C (KeyboardInterrupt) stops training and returns the best
weights seen so far.

In a run, a recovered candidate is a new record: its genotype is the parent's plus the gene
`recover` = "from-<parent id>", and its trained weights are stored in the run directory as
`recovered/from-<parent id>.npz` (initializer name -> array). `materialize` rebuilds the parent's
moves and then loads that file (before int8 finalisation), so `graphopt export` and best.onnx
rebuild exactly the recovered model.

torch and onnxruntime are imported inside the functions: `import graphopt.recovery.recover` is cheap.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import UsageError

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("graphopt")

# a recovered record's gene and weights files (graphopt.recovery.recover_files), re-exported
from .recover_files import (RECOVER_DIR, RECOVER_KEY, apply_recovered, save_weights,  # noqa: E402,F401
                            split_genotype, weights_path, with_weights)
# the options' checks and the phase's time and candidates live in graphopt.recovery.recover_run, re-exported
from .recover_run import (DEFAULT_SECONDS_PER_CANDIDATE, DEFAULT_SHARE, TRAIN_MODES, check_config,  # noqa: E402,F401
                          parse_seconds, phase_seconds, pick_candidates)


class DataSource(Protocol):
    """What recovery reads: graphopt.evaluation.evaluate.CalibrationData has exactly this."""

    @property
    def num_samples(self) -> int: ...

    def sample(self, i: int) -> dict[str, np.ndarray]: ...


@dataclass
class RecoverOptions:
    train: str = "changed"  # "changed" | "all"
    lr: float = 1e-3  # Adam's learning rate relative to each tensor's RMS; warm-up then cosine over the time
    batch_size: int = 8
    max_features: int = 16
    feature_weight: float = 1.0  # weight of the mean feature loss next to the output loss
    augment: str = "auto"  # "auto" (image-like inputs) | "off"
    train_size: int | None = None  # image-like inputs: train on random crops resized to this side (cheaper steps)
    eval_every_s: float | None = None  # select-split evaluation period (None: a tenth of the time, >= 2 s)
    seed: int = 0
    threads: int | None = None  # torch + teacher threads; None: 1 or torch's default, the faster here (probed)
    output_loss: str = "mse"  # or "kl" at `temperature` (classifiers): graphopt.recovery.recover_tail.output_loss
    temperature: float = 1.0
    tail_fraction: float = 1 / 3  # train="tail": the last third of the weight tensors (graphopt.recovery.recover_tail)
    cache_share: float = 0.4  # train="tail": at most this share of the time caches activations

    def __post_init__(self) -> None:
        if self.train not in TRAIN_MODES:
            raise UsageError(f"--recover-train {self.train!r}: choose one of {', '.join(TRAIN_MODES)}")
        if self.output_loss not in ("mse", "kl"):
            raise UsageError(f"recover output loss {self.output_loss!r}: choose mse or kl")
        if self.augment not in ("auto", "off"):
            raise UsageError(f"recover augment {self.augment!r}: choose auto or off")


@dataclass
class RecoveryResult:
    model: onnx.ModelProto  # the candidate with the best weights seen (scored on select)
    weights: dict[str, np.ndarray]  # trained initializer name -> its best value
    trained: list[str]
    features: list[str]
    select_before: float
    select_after: float
    steps: int
    seconds: float
    evals: int
    stopped: str  # "time" | "steps" | "interrupted" | "nothing to train"
    augment: bool = False
    loss_first: float = math.nan
    loss_last: float = math.nan
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per select evaluation
    threads: int = 0  # torch and teacher CPU threads used (0: nothing trained)

    def to_dict(self) -> dict[str, Any]:
        return {"trained_tensors": len(self.trained), "features": self.features, "select_before": self.select_before,
                "select_after": self.select_after, "steps": self.steps, "seconds": round(self.seconds, 3),
                "evals": self.evals, "stopped": self.stopped, "augment": self.augment,
                "loss_first": self.loss_first, "loss_last": self.loss_last, "threads": self.threads}


# what it trains on (graphopt.recovery.recover_inputs), re-exported
from .recover_inputs import _match_channels, augment, choose_features, image_like, resized_crops  # noqa: E402,F401


# ------------------------------------------------------------------------------------ recover
def _stack(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Samples (each [batch, ...] as the model declares) concatenated along axis 0."""
    return {k: np.ascontiguousarray(np.concatenate([np.asarray(s[k]) for s in samples], axis=0))
            for k in samples[0]}


class _Teacher:
    """The original model in onnxruntime with the feature tensors added as outputs."""

    def __init__(self, original: onnx.ModelProto, features: list[str], threads: int | None,
                 free_hw: bool = False):
        import onnx
        import onnxruntime as ort

        m = onnx.ModelProto()
        m.CopyFrom(original)
        if free_hw:  # image inputs of any height and width (training on smaller crops)
            del m.graph.value_info[:]
            for vi in m.graph.input:
                dims = vi.type.tensor_type.shape.dim
                if len(dims) == 4:
                    dims[2].dim_param, dims[3].dim_param = "height", "width"
            for vi in m.graph.output:
                vi.type.tensor_type.ClearField("shape")
        have = {o.name for o in m.graph.output}
        self.outputs = [o.name for o in original.graph.output]
        for f in features:
            if f not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=f))
        self.names = self.outputs + list(features)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # all fusions (conv+BN, conv+activation, NCHWc layouts): x3.5 faster than ENABLE_BASIC on
        # EfficientNet-Lite0 (docs/recovery.md); the feature tensors stay as requested outputs
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        dims = original.graph.input[0].type.tensor_type.shape.dim if original.graph.input else []
        self.per = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None  # static batch

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        n = next(iter(feeds.values())).shape[0]
        if not self.per or self.per == n:
            return self.sess.run(self.names, dict(feeds))
        parts = [self.sess.run(self.names, {k: v[s:s + self.per] for k, v in feeds.items()})
                 for s in range(0, n, self.per)]
        return [np.concatenate([p[j] for p in parts], axis=0) for j in range(len(self.names))]


class _Adam:
    """Adam (Kingma & Ba) with a learning rate per tensor. torch.optim imports torch._dynamo on first
    use: 5-20 s on a loaded 2-core machine, a large share of a short recovery."""

    def __init__(self, tensors, betas=(0.9, 0.999), eps=1e-8):
        import torch

        self.tensors, self.betas, self.eps, self.t = tensors, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in tensors]
        self.v = [torch.zeros_like(p) for p in tensors]

    def zero_grad(self) -> None:
        for p in self.tensors:
            p.grad = None

    def step(self, lrs) -> None:
        import torch

        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        with torch.no_grad():
            for p, m, v, lr in zip(self.tensors, self.m, self.v, lrs):
                if p.grad is None:
                    continue
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)


def _pick_threads(tg, fit: DataSource, bs: int, small: bool, opts: RecoverOptions, tag: str) -> int:
    """torch (and teacher) threads when RecoverOptions.threads is not given: graphopt.recovery.finetune's
    pick_threads on a training-size batch (1 or torch's default, the faster here and now)."""
    import torch

    from .finetune import pick_threads

    batch = _stack([fit.sample(i) for i in range(bs)])
    if small:
        batch = resized_crops(batch, int(opts.train_size), np.random.default_rng(opts.seed))
    feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items() if k in tg.input_names}
    best, took = pick_threads(lambda: tg(feeds))
    if took:
        log.info("%s: %d torch thread(s) (forward pass: %s)", tag, best,
                 ", ".join(f"{n} thread(s) {s * 1e3:.0f} ms" for n, s in took.items()))
    return best


def _score_value(scorer: Any, model: onnx.ModelProto) -> float:
    v = scorer.score(model) if hasattr(scorer, "score") else scorer(model)
    return float(getattr(v, "value", v))


def recover(candidate: onnx.ModelProto, original: onnx.ModelProto, fit: DataSource, select: Any, *,
            seconds: float | None = None, steps: int | None = None, options: RecoverOptions | None = None,
            select_before: float | None = None, label: str = "") -> RecoveryResult:
    """Distil `candidate` toward `original` on `fit`; keep the weights scoring best on `select`.

    fit: a data source (num_samples, sample(i) -> feed dict). select: a scorer with
    `.score(model)` returning a Fidelity (or a float), higher is better (the run's
    FidelityChecker on the select split). seconds / steps: stop at whichever comes first (one
    is required). select_before: the candidate's select score when already known.
    """
    opts = options or RecoverOptions()
    if seconds is None and steps is None:
        raise ValueError("recover() needs seconds or steps")
    import torch

    before = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    try:
        if opts.train == "tail":
            from .recover_tail import recover_tail
            return RecoveryResult(**recover_tail(candidate, original, fit, lambda m: _score_value(select, m), seconds,
                                                 steps, opts, select_before, label, _Adam))
        return _recover(candidate, original, fit, select, seconds, steps, opts, select_before, label)
    finally:
        torch.set_num_threads(before)


def _recover(candidate, original, fit, select, seconds, steps, opts, select_before, label) -> RecoveryResult:
    import torch

    from .finetune import CHECK_TOLERANCE, FinetuneError, TorchGraph, trainable_names
    from .recover_tail import output_loss

    t0 = time.monotonic()
    deadline = t0 + seconds if seconds is not None else math.inf
    max_steps = steps if steps is not None else math.inf
    tag = f"recover{(' ' + label) if label else ''}"
    names = trainable_names(candidate, original, "touched" if opts.train == "changed" else "all")
    if select_before is None:
        select_before = _score_value(select, candidate)
    if not names or fit.num_samples == 0:
        return RecoveryResult(candidate, {}, [], [], select_before, select_before, 0, time.monotonic() - t0, 0,
                              "nothing to train")
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    tg = TorchGraph(candidate, set(names))
    features = choose_features(original, candidate, tg.live, opts.max_features)
    first = fit.sample(0)
    aug = opts.augment == "auto" and image_like(first)
    small = bool(aug and opts.train_size and opts.train_size < min(next(iter(first.values())).shape[2:]))
    n_out = len(original.graph.output)
    chan: dict[str, Any] = {}  # pruned feature -> the original channels it is matched against
    tensors = [tg.params[n] for n in names]

    # the interpreter must compute what onnxruntime computes (on one sample)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    cand_sess = ort.InferenceSession(candidate.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        feeds0 = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in first.items() if k in tg.input_names}
        outs = tg(feeds0)
    for name, o, c in zip(tg.output_names, outs, cand_sess.run(None, dict(first))):
        err = float(np.max(np.abs(o.numpy() - c))) / (float(np.max(np.abs(c))) + 1e-12) if c.size else 0.0
        if tuple(o.shape) != c.shape or err > CHECK_TOLERANCE:
            raise FinetuneError(f"recover: the torch interpreter disagrees with onnxruntime on output {name!r} "
                                f"(shape {list(o.shape)} vs {list(c.shape)}, relative error {err:.2e}); "
                                "please report this model")
    del cand_sess
    bs = max(1, min(int(opts.batch_size), fit.num_samples))
    threads = int(opts.threads) if opts.threads else _pick_threads(tg, fit, bs, small, opts, tag)
    torch.set_num_threads(threads)
    teacher = _Teacher(original, features, threads, free_hw=small)

    base_lrs = [opts.lr * (float(t.detach().pow(2).mean().sqrt()) or 1e-3) for t in tensors]
    opt = _Adam(tensors)
    best_score, best = select_before, [t.detach().clone() for t in tensors]
    total = fit.num_samples
    order: list[int] = []
    history: list[dict[str, float]] = []
    evals, step, loss_first, loss_last = 0, 0, math.nan, math.nan
    eval_cost = 0.0
    t_train = time.monotonic()
    span = (deadline - t_train) if math.isfinite(deadline) else None
    every = opts.eval_every_s if opts.eval_every_s else max(2.0, (span or 60.0) / 10)
    next_eval = t_train + every
    stopped = "time" if math.isfinite(deadline) else "steps"
    last_eval_step = 0
    step_cost = 0.0

    def evaluate() -> None:
        nonlocal best_score, best, evals, eval_cost, last_eval_step
        te = time.monotonic()
        current = {n: t.detach().numpy().copy() for n, t in zip(names, tensors)}
        score = _score_value(select, with_weights(candidate, current))
        evals += 1
        last_eval_step = step
        if math.isfinite(score) and score > best_score:
            best_score, best = score, [t.detach().clone() for t in tensors]
        eval_cost = max(eval_cost, time.monotonic() - te)
        history.append({"t": round(time.monotonic() - t0, 3), "step": step, "loss": loss_last, "select": score})
        log.info("%s: %.0f s, step %d, distillation loss %.4g, select %.6f (best %.6f, before %.6f)", tag,
                 time.monotonic() - t0, step, loss_last, score, best_score, select_before)

    try:
        while step < max_steps:
            now = time.monotonic()
            # stop when one more step and the final select evaluation would end past the deadline
            if now + step_cost + eval_cost > deadline:
                break
            if now >= next_eval and step > last_eval_step:
                evaluate()
                next_eval = time.monotonic() + every
                continue
            ts = time.monotonic()
            if len(order) < bs:
                order += rng.permutation(total).tolist()
            idx, order = order[:bs], order[bs:]
            batch = _stack([fit.sample(i) for i in idx])
            if aug:
                batch = augment(batch, rng)
            if small:
                batch = resized_crops(batch, int(opts.train_size), rng)
            ref = [torch.from_numpy(np.ascontiguousarray(r)).float() for r in teacher(batch)]
            feeds = {k: torch.from_numpy(v) for k, v in batch.items() if k in tg.input_names}
            got = tg.run_live(tg.run_frozen(feeds), extra=features)
            out_loss, feat_loss = 0.0, 0.0
            for j, (o, r) in enumerate(zip(got, ref)):
                if not o.is_floating_point():
                    continue
                if j >= n_out and o.shape[1] != r.shape[1]:  # a pruned tensor: its kept channels
                    name = features[j - n_out]
                    if name not in chan:
                        chan[name] = _match_channels(o.detach(), r)
                    r = r[:, chan[name]]
                if j < n_out:
                    out_loss = out_loss + output_loss(o, r, opts)
                else:
                    term = ((o.float() - r) ** 2).mean() / ((r ** 2).mean() + 1e-12)
                    feat_loss = feat_loss + term / max(1, len(features))
            loss = out_loss + opts.feature_weight * feat_loss
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
            factor = min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * frac))
            opt.zero_grad()
            loss.backward()
            opt.step([lr0 * factor for lr0 in base_lrs])
            step += 1
            step_cost = time.monotonic() - ts
        else:
            stopped = "steps"
        if step > last_eval_step:
            evaluate()  # the final weights
    except KeyboardInterrupt:
        stopped = "interrupted"
        if step > last_eval_step:  # what was trained since the last evaluation (a second Ctrl-C skips it)
            try:
                evaluate()
            except KeyboardInterrupt:
                pass
        log.warning("%s: interrupted at step %d: keeping the best weights seen on the select split "
                    "(%.6f, before %.6f)", tag, step, best_score, select_before)
    weights = {n: b.numpy().copy() for n, b in zip(names, best)}
    model = with_weights(candidate, weights)
    return RecoveryResult(model, weights, names, features, select_before, best_score, step, time.monotonic() - t0,
                          evals, stopped, aug, loss_first, loss_last, history, threads)


__all__ = ["RECOVER_DIR", "RECOVER_KEY", "DataSource", "RecoverOptions", "RecoveryResult", "apply_recovered", "augment",
           "choose_features", "image_like", "pick_candidates", "recover", "save_weights",
           "split_genotype", "weights_path", "with_weights"]
