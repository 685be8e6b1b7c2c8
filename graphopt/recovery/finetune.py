"""Distillation fine-tuning (`--finetune STEPS`): fit a candidate's weights to the original's outputs.

After the moves (and their least-squares repair) a candidate is run in torch, its weights are
trained with Adam for STEPS full-batch steps so that its outputs match the ORIGINAL model's
outputs on the calibration inputs (loss: per output, mean squared error divided by the mean
square of the original output), and the trained weights are written back into the ONNX
initializers of the same names. Deterministic for a given seed; torch runs on the CPU.

Which weights train (`params`):
  "touched" (default)  weight tensors the moves created or changed: initializers absent from the
                       original model or holding other values (a depthwise pair, a cropped kernel,
                       a fused conv). Nothing else moves, so the rest of the network is the original's.
  "all"                every float weight: Conv/Gemm/MatMul weights and biases, BatchNormalization
                       scale and shift, constant operands of Add/Sub/Mul/Div.
BatchNormalization running statistics, Clip bounds, Pad values and shapes never train.

The graph runs through a small ONNX -> torch interpreter (`TorchGraph`) over the float ops that
the CNN passes produce (SUPPORTED_OPS), with the calibration samples batched along axis 0. Nodes
that depend on no trained weight are evaluated once, without autograd, and cached. Before
training, the interpreter's outputs are checked against onnxruntime's; a disagreement is an
error, never a silent mis-training. The weights with the lowest training loss seen are kept, so
the result is never worse than the input on the fit data.

torch (and onnxruntime) are imported inside the functions: `import graphopt.recovery.finetune` is cheap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
# the ONNX -> torch interpreter lives in its own module (split for size); re-exported here
from .torch_graph import SUPPORTED_OPS, FinetuneError, TorchGraph

if TYPE_CHECKING:
    import onnx

PARAM_MODES = ("touched", "all")
# inputs of these ops that are weights (trainable when they are float initializers)
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "Div": (0, 1),
    "PRelu": (1,), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
}
CHECK_TOLERANCE = 1e-3  # max |torch - onnxruntime| / max |onnxruntime| before training starts


@dataclass
class FinetuneResult:
    model: onnx.ModelProto
    trained: list[str]  # initializer names that were trained
    loss_before: float
    loss_after: float  # the best training loss (that of the returned weights)
    steps: int
    seconds: float
    history: list[float] = field(default_factory=list)  # training loss per step

    def to_dict(self) -> dict[str, Any]:
        return {"trained": len(self.trained), "loss_before": self.loss_before, "loss_after": self.loss_after,
                "steps": self.steps, "seconds": self.seconds}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def check_available() -> None:
    """UsageError naming the fix when torch is missing."""
    if not torch_available():
        raise UsageError("--finetune needs torch, which is not installed: pip install torch "
                         "(the CPU build is enough), or run without --finetune")


# ------------------------------------------------------------------------------ training
def trainable_names(candidate: onnx.ModelProto, original: onnx.ModelProto | None = None,
                    params: str = "touched") -> list[str]:
    """Float initializers in weight slots (WEIGHT_SLOTS); for "touched", only those the original
    lacks or holds with other values."""
    from onnx import numpy_helper

    if params not in PARAM_MODES:
        raise UsageError(f"finetune params {params!r}: choose one of {', '.join(PARAM_MODES)}")
    inits = {t.name: t for t in candidate.graph.initializer}
    names: list[str] = []
    for n in candidate.graph.node:
        for i in WEIGHT_SLOTS.get(n.op_type, ()):
            if i < len(n.input) and n.input[i] in inits and n.input[i] not in names:
                arr = numpy_helper.to_array(inits[n.input[i]])
                if np.issubdtype(arr.dtype, np.floating):
                    names.append(n.input[i])
    if params == "all":
        return names
    if original is None:
        raise ValueError("trainable_names(params='touched') needs the original model")
    orig = {t.name: t for t in original.graph.initializer}
    out = []
    for name in names:
        o = orig.get(name)
        if o is None:
            out.append(name)
            continue
        a, b = numpy_helper.to_array(inits[name]), numpy_helper.to_array(o)
        if a.shape != b.shape or not np.array_equal(a, b):
            out.append(name)
    return out


def pick_threads(forward) -> tuple[int, dict[int, float]]:
    """torch CPU threads for training: 1 or torch's current default, whichever runs `forward()` (a
    training-size forward pass, called under no_grad) faster here and now; and the seconds each took.
    On a shared, oversubscribed machine every op's parallel region waits for a descheduled thread:
    EfficientNet-Lite0 fwd+bwd at 2 threads ran x15 slower than at 1 on 2 cores at load 11
    (docs/recovery.md, "Step time"); on an idle machine the threads win. Leaves torch at the pick."""
    import torch

    most = torch.get_num_threads()
    if most <= 1:
        return 1, {}
    took = {}
    with torch.no_grad():
        for n in (1, most):
            torch.set_num_threads(n)
            forward()  # warm-up (allocations, the thread pool)
            t = time.monotonic()
            for _ in range(2):
                forward()
            took[n] = (time.monotonic() - t) / 2
    best = min(took, key=took.get)
    torch.set_num_threads(best)
    return best, took


def _stack(calibration: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[samples, *input_shape] -> [samples * batch, ...] (samples stacked along the batch axis)."""
    out = {}
    for k, v in calibration.items():
        v = np.asarray(v)
        out[k] = v.reshape(v.shape[0] * v.shape[1], *v.shape[2:]) if v.ndim >= 2 else v
    return out


def _ort_outputs(model: onnx.ModelProto, calibration: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs per output name, samples concatenated along axis 0."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    n = next(iter(calibration.values())).shape[0]
    per = [sess.run(None, {k: v[i] for k, v in calibration.items()}) for i in range(n)]
    return [np.concatenate([p[j] for p in per], axis=0) for j in range(len(per[0]))]


def finetune(candidate: onnx.ModelProto, original: onnx.ModelProto, calibration: Mapping[str, np.ndarray],
             steps: int, *, params: str = "touched", lr: float = 3e-3, seed: int = 0,
             batch_size: int = 16, threads: int | None = None) -> FinetuneResult:
    """Train the candidate's weights so its outputs match the original's on `calibration`.

    calibration: input name -> [samples, *input_shape] (the fit split; never the data fidelity is
    judged on). steps: Adam steps (0: the candidate unchanged). params: "touched" | "all".
    lr: Adam's learning rate RELATIVE to each tensor's RMS (scale-free across layers), cosine
    decayed to 0. batch_size: samples per step (all of them when there are fewer; with fewer,
    random minibatches). threads: torch CPU threads for the call (None: 1 or torch's default,
    the faster on this machine now: `pick_threads`).
    Returns the model with the best weights seen (lowest training loss), checked by onnx.checker.
    """
    import torch

    if steps < 0:
        raise UsageError(f"--finetune {steps}: must be 0 or a positive number of steps")
    if not calibration:
        raise UsageError("--finetune needs calibration data: pass --data CALIB.npz")
    t0 = time.monotonic()
    names = trainable_names(candidate, original, params)
    if steps == 0 or not names:
        return FinetuneResult(candidate, [], math.nan, math.nan, 0, time.monotonic() - t0)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _train(candidate, original, calibration, steps, names, lr, seed, batch_size, t0, threads)
    finally:
        torch.set_num_threads(before)


def _train(candidate, original, calibration, steps, names, lr, seed, batch_size, t0, threads=None) -> FinetuneResult:
    import onnx
    import torch
    from onnx import numpy_helper

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    reference = _ort_outputs(original, calibration)
    cand_ort = _ort_outputs(candidate, calibration)
    tg = TorchGraph(candidate, set(names))
    feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in _stack(calibration).items()
             if k in tg.input_names}
    total = next(iter(feeds.values())).shape[0]
    bs = min(total, max(1, int(batch_size)))
    frozen = {}
    for s in range(0, total, bs):  # the part no trained weight reaches: once, without autograd
        part = tg.run_frozen({k: v[s:s + bs] for k, v in feeds.items()})
        for k, v in part.items():
            frozen.setdefault(k, []).append(v)
    frozen = {k: torch.cat(v, dim=0) for k, v in frozen.items()}
    if threads is None:
        pick_threads(lambda: tg.run_live({k: v[:bs] for k, v in frozen.items()}))
    ref = [torch.from_numpy(np.ascontiguousarray(r)).float() for r in reference]
    scale = [float((r ** 2).mean()) + 1e-12 for r in ref]

    def loss_on(idx, outs=None) -> Any:  # idx None: every sample
        if outs is None:
            outs = tg.run_live(frozen if idx is None else {k: v[idx] for k, v in frozen.items()})
        loss = 0.0
        for o, r, s in zip(outs, ref, scale):
            if o.is_floating_point():
                loss = loss + ((o.float() - (r if idx is None else r[idx])) ** 2).mean() / s
        return loss, outs

    with torch.no_grad():  # the interpreter must compute what onnxruntime computes
        outs = tg.run_live(frozen)
        for name, o, c in zip(tg.output_names, outs, cand_ort):
            if tuple(o.shape) != c.shape:
                raise FinetuneError(f"finetune: output {name!r} has shape {list(o.shape)} in torch, "
                                    f"{list(c.shape)} in onnxruntime (samples stacked on axis 0)")
            err = float(np.max(np.abs(o.numpy() - c))) / (float(np.max(np.abs(c))) + 1e-12)
            if err > CHECK_TOLERANCE:
                raise FinetuneError(f"finetune: the torch interpreter disagrees with onnxruntime on output "
                                    f"{name!r} (relative error {err:.2e}); please report this model")
        loss0 = float(loss_on(None, outs)[0])
    tensors = [tg.params[n] for n in names]
    groups = [{"params": [t], "lr": lr * (float(t.detach().pow(2).mean().sqrt()) or 1e-3)} for t in tensors]
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    best_loss, best = loss0, [t.detach().clone() for t in tensors]
    history: list[float] = []
    full = bs >= total
    for step in range(steps):
        idx = None if full else torch.from_numpy(rng.choice(total, bs, replace=False))
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_on(idx)
        value = float(loss.detach())
        if not math.isfinite(value):
            break
        history.append(value)
        if full and value < best_loss:  # the weights before this step's update
            best_loss, best = value, [t.detach().clone() for t in tensors]
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = float(loss_on(None)[0])
        if math.isfinite(final) and final < best_loss:  # (minibatch losses never update best: not comparable)
            best_loss, best = final, [t.detach().clone() for t in tensors]
    out = onnx.ModelProto()
    out.CopyFrom(candidate)
    values = dict(zip(names, best))
    for init in out.graph.initializer:
        if init.name in values:
            dtype = numpy_helper.to_array(init).dtype
            init.CopyFrom(numpy_helper.from_array(values[init.name].numpy().astype(dtype), init.name))
    onnx.checker.check_model(out)
    return FinetuneResult(out, names, loss0, best_loss, len(history), time.monotonic() - t0, history)


def finetune_in_context(model: onnx.ModelProto, ctx, steps: int) -> onnx.ModelProto:
    """The driver's hook: fine-tune a materialized candidate on ctx.calibration (the fit split)
    against ctx.base_model; options from ctx.options (finetune_params, finetune_lr)."""
    opts = ctx.options
    return finetune(model, ctx.base_model, ctx.calibration, steps, params=opts.get("finetune_params", "touched"),
                    lr=float(opts.get("finetune_lr", 3e-3)), seed=int(opts.get("seed", 0)),
                    threads=opts.get("finetune_threads")).model


__all__ = [
    "SUPPORTED_OPS",
    "FinetuneError",
    "FinetuneResult",
    "TorchGraph",
    "check_available",
    "finetune",
    "finetune_in_context",
    "pick_threads",
    "trainable_names",
]
