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

torch (and onnxruntime) are imported inside the functions: `import graphopt.finetune` is cheap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelError, UsageError

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


class FinetuneError(ModelError):
    """The candidate cannot be fine-tuned (an op the torch interpreter lacks, a mismatch)."""


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


# ------------------------------------------------------------------------- the interpreter
def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _same_pads(in_spatial, kernel, strides, dilations, mode: str) -> list[int]:
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins + ends


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] over the last len/2 axes -> torch's last-axis-first pairs."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[i + n])]
    return out


class TorchGraph:
    """Runs an ONNX graph with torch ops; `params` are the tensors that train (requires_grad).

    `batch` = the number of samples stacked along axis 0 is handled by Reshape: a static target
    shape whose first entry is the model's declared batch gets the actual leading size instead.
    """

    def __init__(self, model: onnx.ModelProto, trainable: set[str] = frozenset()):
        import torch
        from onnx import numpy_helper

        self.torch = torch
        g = model.graph
        self.nodes = list(g.node)
        missing = sorted({n.op_type for n in self.nodes if n.domain not in ("", "ai.onnx")
                          or n.op_type not in SUPPORTED_OPS})
        if missing:
            raise FinetuneError(f"finetune: op(s) {', '.join(missing)} not supported by graphopt's torch interpreter "
                                f"(supported: {', '.join(sorted(SUPPORTED_OPS))}); run without --finetune")
        self.output_names = [o.name for o in g.output]
        self.input_names = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
        dims = g.input[0].type.tensor_type.shape.dim if g.input else []
        self.model_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        self.consts: dict[str, Any] = {}
        self.params: dict[str, Any] = {}
        for t in g.initializer:
            arr = numpy_helper.to_array(t)
            ten = torch.from_numpy(np.array(arr, copy=True))
            if t.name in trainable:
                ten = ten.float().requires_grad_(True)
                self.params[t.name] = ten
            self.consts[t.name] = ten
        for n in self.nodes:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = torch.from_numpy(np.array(numpy_helper.to_array(
                    next(a for a in n.attribute if a.name == "value").t), copy=True))
        # live = depends on a trained tensor (recomputed every step); the rest is cached once
        live = set(self.params)
        self.live_nodes, self.frozen_nodes = [], []
        for n in self.nodes:
            if any(i in live for i in n.input if i):
                live.update(o for o in n.output if o)
                self.live_nodes.append(n)
            else:
                self.frozen_nodes.append(n)
        self.live = live
        self.node_attrs = {id(n): _attrs(n) for n in self.nodes}  # parsed once, not per node per step
        # frozen tensors the live part reads (or that are outputs themselves)
        self.frontier = sorted(({i for n in self.live_nodes for i in n.input if i and i not in live}
                                | {o for o in self.output_names if o not in live}) - set(self.consts))

    def run_frozen(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """The frontier tensors for these inputs (no autograd)."""
        with self.torch.no_grad():
            env = self._run(self.frozen_nodes, dict(self.consts, **feeds))
        return {k: env[k] for k in self.frontier}

    def run_live(self, frozen: Mapping[str, Any], extra: Sequence[str] = ()) -> list[Any]:
        """The outputs, then the `extra` tensors (intermediate tensors, e.g. for feature matching)."""
        env = self._run(self.live_nodes, dict(self.consts, **frozen))
        return [env[o] for o in self.output_names] + [env[e] for e in extra]

    def __call__(self, feeds: Mapping[str, Any]) -> list[Any]:
        return self.run_live(self.run_frozen(feeds))

    # ------------------------------------------------------------------------------ ops
    def _run(self, nodes, env: dict[str, Any]) -> dict[str, Any]:
        for n in nodes:
            if n.op_type == "Constant":
                continue
            args = [env[i] if i else None for i in n.input]
            try:
                res = SUPPORTED_OPS[n.op_type](self, args, self.node_attrs[id(n)])
            except FinetuneError:
                raise
            except Exception as e:  # noqa: BLE001 - any torch failure names its node
                raise FinetuneError(f"finetune: node {n.name or n.op_type} ({n.op_type}) failed in torch: "
                                    f"{type(e).__name__}: {e}") from None
            outs = res if isinstance(res, (list, tuple)) else [res]
            for name, v in zip(n.output, outs):
                if name:
                    env[name] = v
        return env


def _ints(t) -> list[int]:
    return [int(v) for v in t.detach().reshape(-1).tolist()]


def _conv(tg: TorchGraph, a, at):
    F = tg.torch.nn.functional
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    nd = w.dim() - 2
    strides = at.get("strides", [1] * nd)
    dil = at.get("dilations", [1] * nd)
    mode = at.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(list(x.shape[2:]), list(w.shape[2:]), strides, dil, mode)
    elif mode == "VALID":
        pads = [0] * (2 * nd)
    else:
        pads = list(at.get("pads", [0] * (2 * nd)))
    if pads[:nd] != pads[nd:]:
        x, padding = F.pad(x, _torch_pad(pads)), 0
    else:
        padding = pads[:nd]
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w.to(x.dtype), None if b is None else b.to(x.dtype), stride=strides, padding=padding,
              dilation=dil, groups=int(at.get("group", 1)))


def _batchnorm(tg, a, at):
    x, s, b, m, v = a[:5]
    return tg.torch.nn.functional.batch_norm(x, m, v, s, b, training=False, eps=float(at.get("epsilon", 1e-5)))


def _clip(tg, a, at):
    lo = a[1] if len(a) > 1 and a[1] is not None else at.get("min")
    hi = a[2] if len(a) > 2 and a[2] is not None else at.get("max")
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if lo is not None and hi is not None:  # one fused kernel each way (ReLU6 and friends)
        return tg.torch.nn.functional.hardtanh(a[0], lo, hi)
    return tg.torch.clamp(a[0], lo, hi)


def _gemm(tg, a, at):
    x, w = a[0], a[1]
    if at.get("transA", 0):
        x = x.transpose(0, 1)
    if at.get("transB", 0):
        w = w.transpose(0, 1)
    y = float(at.get("alpha", 1.0)) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + float(at.get("beta", 1.0)) * a[2]
    return y


def _reshape(tg, a, at):
    x, shape = a[0], _ints(a[1])
    if not at.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    if shape and tg.model_batch is not None and shape[0] == tg.model_batch and x.shape[0] != tg.model_batch:
        shape[0] = x.shape[0]  # samples stacked along axis 0
    return x.reshape(shape)


def _pad(tg, a, at):
    F = tg.torch.nn.functional
    x = a[0]
    pads = _ints(a[1]) if len(a) > 1 and a[1] is not None else list(at.get("pads", []))
    value = float(a[2]) if len(a) > 2 and a[2] is not None and a[2].numel() else float(at.get("value", 0.0))
    if len(a) > 3 and a[3] is not None:
        axes = [ax % x.dim() for ax in _ints(a[3])]
        full = [0] * (2 * x.dim())
        for i, ax in enumerate(axes):
            full[ax], full[ax + x.dim()] = pads[i], pads[i + len(axes)]
        pads = full
    mode = at.get("mode", "constant")
    if mode == "constant":
        return F.pad(x, _torch_pad(pads), mode="constant", value=value)
    n = x.dim()
    if any(pads[i] or pads[i + n] for i in range(n - 2)):
        raise FinetuneError(f"finetune: Pad mode {mode!r} on the batch/channel axes is not supported")
    return F.pad(x, _torch_pad(pads[2:n] + pads[n + 2:]), mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _pool(kind: str):
    def f(tg, a, at):
        F = tg.torch.nn.functional
        x = a[0]
        k = list(at["kernel_shape"])
        nd = len(k)
        strides = list(at.get("strides", [1] * nd))
        pads = list(at.get("pads", [0] * (2 * nd)))
        mode = at.get("auto_pad", "NOTSET")
        if mode in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(list(x.shape[2:]), k, strides, [1] * nd, mode)
        ceil = bool(at.get("ceil_mode", 0))
        if kind == "max":
            if pads[:nd] != pads[nd:]:
                x, pads = F.pad(x, _torch_pad(pads), value=float("-inf")), [0] * (2 * nd)
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            return fn(x, k, strides, pads[:nd], list(at.get("dilations", [1] * nd)), ceil_mode=ceil)
        if pads[:nd] != pads[nd:]:
            raise FinetuneError("finetune: AveragePool with asymmetric pads is not supported")
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return fn(x, k, strides, pads[:nd], ceil_mode=ceil, count_include_pad=bool(at.get("count_include_pad", 0)))
    return f


def _axes(a, at, i: int = 1):
    if len(a) > i and a[i] is not None:
        return _ints(a[i])
    return list(at["axes"]) if "axes" in at else None


def _squeeze(tg, a, at):
    axes = _axes(a, at)
    x = a[0]
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _unsqueeze(tg, a, at):
    x = a[0]
    axes = _axes(a, at)
    for ax in sorted(ax % (x.dim() + len(axes)) for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _reduce(name: str):
    def f(tg, a, at):
        x = a[0]
        axes = _axes(a, at)
        keep = bool(at.get("keepdims", 1))
        if axes is None or not axes:
            axes = list(range(x.dim()))
        return getattr(x, name)(dim=axes, keepdim=keep) if name != "amax" else x.amax(dim=axes, keepdim=keep)
    return f


def _flatten(tg, a, at):
    x = a[0]
    ax = int(at.get("axis", 1)) % max(1, x.dim())
    return x.reshape(int(np.prod(x.shape[:ax])) if ax else 1, -1)


def _slice(tg, a, at):
    """Slice with constant starts / ends / axes / steps (a crop)."""
    x = a[0]
    starts, ends = _ints(a[1]), _ints(a[2])
    axes = _ints(a[3]) if len(a) > 3 and a[3] is not None else list(range(len(starts)))
    steps = _ints(a[4]) if len(a) > 4 and a[4] is not None else [1] * len(starts)
    idx = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st != 1:
            raise FinetuneError("finetune: Slice with steps other than 1 is not supported")
        idx[ax % x.dim()] = slice(max(-x.shape[ax], min(s, x.shape[ax])), min(e, x.shape[ax]) if e >= 0 else e)
    return x[tuple(idx)]


def _resize(tg, a, at):
    """Resize of H, W (bilinear, half_pixel; antialias as onnxruntime) from constant sizes or scales."""
    x = a[0]
    mode = at.get("mode", "nearest")
    ctm = at.get("coordinate_transformation_mode", "half_pixel")
    if mode != "linear" or ctm not in ("half_pixel", "pytorch_half_pixel") or x.dim() != 4:
        raise FinetuneError(f"finetune: Resize mode {mode!r} / {ctm!r} is not supported (linear, half_pixel)")
    if len(a) > 3 and a[3] is not None:
        size = [int(v) for v in _ints(a[3])[2:]]
    else:
        sc = [float(v) for v in a[2].reshape(-1).tolist()][2:]
        size = [int(math.floor(d * s)) for d, s in zip(x.shape[2:], sc)]
    return tg.torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                              antialias=bool(at.get("antialias", 0)))


def _hard_sigmoid(tg, a, at):
    return tg.torch.clamp(float(at.get("alpha", 0.2)) * a[0] + float(at.get("beta", 0.5)), 0.0, 1.0)


def _layernorm(tg, a, at):
    x = a[0]
    axis = int(at.get("axis", -1)) % x.dim()
    shape = list(x.shape[axis:])
    return tg.torch.nn.functional.layer_norm(x, shape, a[1], a[2] if len(a) > 2 else None,
                                             eps=float(at.get("epsilon", 1e-5)))


SUPPORTED_OPS: dict[str, Any] = {
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "Relu": lambda tg, a, at: tg.torch.relu(a[0]),
    "LeakyRelu": lambda tg, a, at: tg.torch.nn.functional.leaky_relu(a[0], float(at.get("alpha", 0.01))),
    "Clip": _clip,
    "Sigmoid": lambda tg, a, at: tg.torch.sigmoid(a[0]),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda tg, a, at: tg.torch.nn.functional.hardswish(a[0]),
    "Tanh": lambda tg, a, at: tg.torch.tanh(a[0]),
    "Erf": lambda tg, a, at: tg.torch.erf(a[0]),
    "Exp": lambda tg, a, at: tg.torch.exp(a[0]),
    "Sqrt": lambda tg, a, at: tg.torch.sqrt(a[0]),
    "Neg": lambda tg, a, at: -a[0],
    "Add": lambda tg, a, at: a[0] + a[1],
    "Sub": lambda tg, a, at: a[0] - a[1],
    "Mul": lambda tg, a, at: a[0] * a[1],
    "Div": lambda tg, a, at: a[0] / a[1],
    "Pow": lambda tg, a, at: a[0] ** a[1],
    "MatMul": lambda tg, a, at: a[0] @ a[1],
    "Gemm": _gemm,
    "GlobalAveragePool": lambda tg, a, at: a[0].mean(dim=list(range(2, a[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda tg, a, at: a[0].amax(dim=list(range(2, a[0].dim())), keepdim=True),
    "AveragePool": _pool("avg"),
    "MaxPool": _pool("max"),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda tg, a, at: a[0].permute(*(at.get("perm") or reversed(range(a[0].dim())))),
    "Concat": lambda tg, a, at: tg.torch.cat([t for t in a if t is not None], dim=int(at["axis"])),
    "Pad": _pad,
    "Slice": _slice,
    "Resize": _resize,
    "Identity": lambda tg, a, at: a[0],
    "Dropout": lambda tg, a, at: a[0],
    "Softmax": lambda tg, a, at: tg.torch.softmax(a[0], dim=int(at.get("axis", -1))),
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("amax"),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "LayerNormalization": _layernorm,
    "Constant": lambda tg, a, at: None,  # loaded up front
}


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
