"""The ONNX -> torch interpreter of `--finetune` (graphopt.recovery.finetune): `TorchGraph` runs an ONNX
graph's float ops (SUPPORTED_OPS) in torch, caching the nodes that depend on no trained weight.

torch is imported inside the functions: `import graphopt.recovery.torch_graph` is cheap."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelError

if TYPE_CHECKING:
    import onnx


class FinetuneError(ModelError):
    """The candidate cannot be fine-tuned (an op the torch interpreter lacks, a mismatch)."""


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
