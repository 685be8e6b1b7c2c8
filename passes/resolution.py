"""Input resolution: the model keeps its input shape; a node right after the image input reduces it.

A site is an image input [N, C, H, W] (float, static H, W >= 16) whose spatial size only reaches
size-agnostic ops up to a global pool: convolutions, pooling windows, padding, BatchNorm,
activations, element-wise ops whose other operand does not fix H, W, channel Concat, and at the
end GlobalAveragePool / GlobalMaxPool / ReduceMean|Max|Sum over H and W. Everything after the
pool sees [N, C, 1, 1] whatever the image size, so the classifier still works. A Reshape /
Flatten / Gemm / Shape / Resize that reads a spatial tensor before the pool, a constant operand
with spatial extent (a positional bias of fixed H x W), or a spatial graph output (segmentation,
detection maps) is a near miss: `rejections()` (shown by `graphopt inspect`) says which node and
why.

Choices: `cropS` (centre crop to S x S: a Slice; objects keep their apparent size, FixRes,
Touvron et al. 2019) and `resizeS` (bilinear down-sampling to S x S: a Resize, antialiased at
opset >= 18; opset >= 13 only). The sizes are H - 16, H - 32, H - 48, H - 64 (multiples of 16
below the input size, at least H / 2): 208 / 192 / 176 / 160 for 224. Resize is offered at the
two middle sizes only (crop measured better on EfficientNet-Lite0, docs/effnet_moves.md). An
image whose shorter side is below 31 has no such size (16 - 16 = 0, 28 - 16 = 12 < 14): it is a
rejection ("too small to reduce"), not a site offering only 'keep'.

The move is approximate: the network sees less of the image (crop) or a coarser one (resize);
the driver's fidelity judges it, and recovery (`--recover-top K --recover-train all`) distils
the reduced-resolution model against the full-resolution original (its feature maps differ in
size, so only the outputs are matched: graphopt.recovery.recover).

TensorFlow-style "same" padding exported as an explicit Pad before a Conv (EfficientNet,
MobileNet from TF/timm) is folded into constants for the input size at load time; where such a
Pad's pads equal "same" padding at the original size, apply() recomputes them for the new size
(176 = 11 x 16 makes odd feature maps where 224 made even ones). Other pads are kept as they are.

Stage 80: after every float rewrite (the pads are recomputed for the final kernels), before int8.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from graphopt.genotype import Choice, Site
from graphopt.plugin import MoveContext, Pass

from ._graph import _const, _fresh_name, _input

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

# ops that compute per position (or over a local window) and keep working at any H, W
_UNARY = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "PRelu", "Elu", "Selu",
          "Erf", "Exp", "Sqrt", "Neg", "Abs", "Identity", "Dropout", "Cast", "BatchNormalization",
          "InstanceNormalization", "Softplus", "Mish", "Gelu", "Reciprocal", "Log", "Floor", "Ceil", "Round"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where"}
_WINDOW = {"Conv", "MaxPool", "AveragePool", "LpPool"}
_GLOBAL = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin", "ReduceL2"}
_STEPS = (16, 32, 48, 64)  # sizes offered: H - step
_RESIZE_STEPS = (32, 48)


def _choice_size(choice: Choice) -> tuple[str, int]:
    s = str(choice)
    for kind in ("crop", "resize"):
        if s.startswith(kind) and s[len(kind):].isdigit():
            return kind, int(s[len(kind):])
    raise ValueError(f"resolution: choice {choice!r} is not cropS or resizeS")


def _opset(graph) -> int:
    return int(graph.opset or 0)


def _image_input(t) -> str | None:
    """Why graph input t is not an image input [N, C, H, W], or None."""
    shape = tuple(t.shape or ())
    if len(shape) != 4:
        return f"rank {len(shape)}, not an image [N, C, H, W]"
    if t.dtype is None or not np.issubdtype(np.dtype(t.dtype), np.floating):
        return f"dtype {t.dtype} is not float"
    h, w = shape[2:]
    if not all(isinstance(d, (int, np.integer)) for d in (h, w)):
        return "height and width are not static (pass --shape)"
    if min(h, w) < 16:
        return f"spatial size {h}x{w} is below 16"
    return None


def _reduce_axes(node) -> list[int] | None:
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        c = _const(node.inputs[1])
        axes = None if c is None else c.reshape(-1).tolist()
    return None if axes is None else [int(a) for a in axes]


def _region(graph, inp) -> tuple[list, str | None]:
    """Nodes that see the input's spatial size (graph order) up to the global pool(s), or why the
    input's size reaches an op that depends on it (node name: reason)."""
    outs = {t.name for t in graph.outputs}
    spatial = {inp.name}
    nodes = []
    pooled = 0
    for n in graph.nodes:  # graph order is topological (loaded models are toposorted)
        ins = [t for t in n.inputs if t is not None and t.name in spatial]
        if not ins:
            continue
        where = f"{n.op} {n.name}"
        if n.op in _GLOBAL:
            nodes.append(n)
            pooled += 1
            continue
        if n.op in _REDUCE:
            axes = _reduce_axes(n)
            if axes is not None and {a % 4 for a in axes} >= {2, 3}:
                nodes.append(n)
                pooled += 1
                continue
            return nodes, f"{where}: reduces axes {axes} of a spatial tensor, not both H and W (the rest keeps H, W)"
        if n.op in _WINDOW or n.op in _UNARY or n.op == "Pad":
            if n.inputs[0].name not in spatial:
                return nodes, f"{where}: the spatial tensor is not its data input"
            if n.op == "Pad" and _const(_input(n, 1)) is None:
                return nodes, f"{where}: its pads are computed, not constant"
        elif n.op in _BINARY:
            for t in n.inputs:
                if t is None or t.name in spatial:
                    continue
                c = _const(t)
                shape = tuple(c.shape) if c is not None else tuple(t.shape or ())
                if len(shape) >= 2 and any(int(d) > 1 for d in shape[-2:] if isinstance(d, (int, np.integer))):
                    return nodes, (f"{where}: its other operand {t.name} has a fixed spatial extent {list(shape)} "
                                   "(it depends on H, W)")
        elif n.op == "Concat":
            if int(n.attrs.get("axis", 0)) % 4 not in (0, 1):
                return nodes, f"{where}: concatenates along a spatial axis"
        else:
            return nodes, (f"{where}: reads a tensor of the image's spatial size before the global pool; "
                           f"its result depends on H, W (not size-agnostic)")
        for t in n.outputs:
            if t.name in outs:
                return nodes, f"{where}: graph output {t.name} is a spatial map (not pooled)"
            spatial.add(t.name)
        nodes.append(n)
    if not pooled:
        return nodes, "no global pool (GlobalAveragePool / ReduceMean over H, W) ends the spatial part"
    return nodes, None


def _sites(graph) -> tuple[list[tuple["gs.Variable", list, tuple[Choice, ...]]], list[tuple[str, str]]]:
    """(input, region, choices) of each site, and (input, why) of each image-like input that is not one."""
    sites, rejected = [], []
    for t in graph.inputs:
        why = _image_input(t)
        if why is None:
            nodes, why = _region(graph, t)
            if why is None:
                h, w = (int(d) for d in t.shape[2:])
                choices = _choices(h, w, _opset(graph))
                if len(choices) > 1:
                    sites.append((t, nodes, choices))
                    continue
                why = _too_small(h, w)
        rejected.append((t.name, f"input {t.name}: {why}"))
    return sites, rejected


def _sizes_offered(side: int) -> list[int]:
    return [side - s for s in _STEPS if side - s >= max(8, side // 2)]


def _too_small(h: int, w: int) -> str:
    least = next(side for side in range(16, 1024) if _sizes_offered(side))
    return (f"spatial size {h}x{w} is too small to reduce: every size offered (the shorter side less "
            f"{', '.join(map(str, _STEPS))}) must be at least half of it, which needs a shorter side of "
            f"{least} or more")


def _choices(h: int, w: int, opset: int) -> tuple[Choice, ...]:
    """'keep' plus the crops / resizes offered at H x W: only 'keep' where the image is too small."""
    side = min(h, w)
    sizes = _sizes_offered(side)
    out: list[Choice] = ["keep"] + [f"crop{s}" for s in sizes]
    if opset >= 13:
        out += [f"resize{side - s}" for s in _RESIZE_STEPS if side - s >= max(8, side // 2)]
    return tuple(out)


def _cost(nodes) -> float:
    total = 0.0
    for n in nodes:
        if n.op == "Conv" and len(n.inputs) > 1 and _const(n.inputs[1]) is not None and n.outputs:
            shape = n.outputs[0].shape
            if shape and all(isinstance(d, (int, np.integer)) for d in shape):
                total += 2.0 * float(np.prod(shape)) * float(np.prod(_const(n.inputs[1]).shape[1:]))
    return total


# ------------------------------------------------------------------------- spatial sizes
def _window_out(size: int, k: int, s: int, d: int, pb: int, pe: int, ceil: bool = False) -> int:
    eff = (k - 1) * d + 1
    v = (size + pb + pe - eff) / s
    return int(math.ceil(v) if ceil else math.floor(v)) + 1


def _sizes(nodes, start, hw: tuple[int, int]) -> dict[str, tuple[int, int]] | None:
    """H, W of every spatial tensor of the region when `start` is hw; None where an op's size rule is unknown."""
    size = {start.name: hw}
    for n in nodes:
        ins = [size[t.name] for t in n.inputs if t is not None and t.name in size]
        if not ins or n.op in _GLOBAL or n.op in _REDUCE:
            continue
        h, w = ins[0]
        if n.op == "Pad":
            p = _const(_input(n, 1)).reshape(-1).tolist()
            if len(p) != 8 or _input(n, 3) is not None:
                return None
            h, w = h + int(p[2]) + int(p[6]), w + int(p[3]) + int(p[7])
        elif n.op in _WINDOW:
            k = list(n.attrs.get("kernel_shape") or [])
            if not k and n.op == "Conv":
                k = list(_const(n.inputs[1]).shape[2:]) if _const(n.inputs[1]) is not None else []
            if len(k) != 2:
                return None
            st = list(n.attrs.get("strides") or [1, 1])
            dl = list(n.attrs.get("dilations") or [1, 1])
            pads = list(n.attrs.get("pads") or [0, 0, 0, 0])
            auto = n.attrs.get("auto_pad", "NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else auto
            ceil = bool(n.attrs.get("ceil_mode", 0))
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                h, w = -(-h // st[0]), -(-w // st[1])
            elif auto == "VALID":
                h, w = _window_out(h, k[0], st[0], dl[0], 0, 0, ceil), _window_out(w, k[1], st[1], dl[1], 0, 0, ceil)
            else:
                h = _window_out(h, k[0], st[0], dl[0], pads[0], pads[2], ceil)
                w = _window_out(w, k[1], st[1], dl[1], pads[1], pads[3], ceil)
        if h < 1 or w < 1:
            return None
        for t in n.outputs:
            size[t.name] = (h, w)
    return size


def _same(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (begin, end) for one axis."""
    eff = (k - 1) * d + 1
    total = max((-(-size // s) - 1) * s + eff - size, 0)
    return total // 2, total - total // 2


def _same_pad_convs(nodes):
    """(Pad node, Conv node) pairs: a constant spatial Pad read only by a Conv without pads of its own."""
    out = []
    for n in nodes:
        if n.op != "Pad" or len(n.outputs[0].outputs) != 1:
            continue
        c = n.outputs[0].outputs[0]
        mode = n.attrs.get("mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        p = _const(_input(n, 1))
        if c.op != "Conv" or mode != "constant" or p is None or p.size != 8 or _input(n, 3) is not None:
            continue
        if any(int(v) for v in (c.attrs.get("pads") or [])) or c.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            continue
        if _const(c.inputs[1]) is None or any(int(v) for v in p.reshape(-1)[[0, 1, 4, 5]]):
            continue
        out.append((n, c))
    return out


def _repad(graph, nodes, start, old_hw, new_hw) -> int:
    """Recompute the 'same' pads of Pad -> Conv pairs for the new size; returns how many changed."""
    import onnx_graphsurgeon as gs

    old, new = _sizes(nodes, start, old_hw), None
    if old is None:
        return 0
    changed = 0
    taken = {t.name for t in graph.tensors().values()}
    for pad, conv in _same_pad_convs(nodes):
        if pad.inputs[0].name not in old:
            continue
        k = _const(conv.inputs[1]).shape[2:]
        st = list(conv.attrs.get("strides") or [1, 1])
        dl = list(conv.attrs.get("dilations") or [1, 1])
        p = _const(pad.inputs[1]).reshape(-1).astype(np.int64)
        (h, w) = old[pad.inputs[0].name]
        if (tuple(int(v) for v in p[[2, 6]]) != _same(h, k[0], st[0], dl[0])
                or tuple(int(v) for v in p[[3, 7]]) != _same(w, k[1], st[1], dl[1])):
            continue  # not 'same' padding at the original size: kept as it is
        new = _sizes(nodes, start, new_hw)  # sizes with the pads changed so far
        if new is None or pad.inputs[0].name not in new:
            return changed
        nh, nw = new[pad.inputs[0].name]
        q = p.copy()
        q[2], q[6] = _same(nh, k[0], st[0], dl[0])
        q[3], q[7] = _same(nw, k[1], st[1], dl[1])
        if not np.array_equal(p, q):
            pad.inputs[1] = gs.Constant(_fresh_name(taken, f"{pad.name.strip('/').replace('/', '_')}_pads_resolution"),
                                        q.astype(np.int64))
            changed += 1
    return changed


# ------------------------------------------------------------------------------------ the pass
class InputResolution(Pass):
    """Keeps its own sites / rejections / apply, not match(): a site is a graph input (an image)
    and the region of nodes that see its size, not a node."""

    name = "resolution"
    description = ("run the network on a smaller image (centre crop or resize right after the input; "
                   "approximate) where a global pool makes the head size-agnostic")
    stage = 80  # after every float rewrite (its pad recomputation sees the final kernels), before int8
    OPTIONS = ()  # reads no pass options

    def sites(self, graph: "gs.Graph") -> list[Site]:
        found, _ = _sites(graph)
        out = []
        for t, nodes, choices in found:  # an input too small to reduce is a rejection, not a site
            out.append(Site(key=f"resolution:{t.name}", pass_name=self.name,
                            nodes=tuple(n.name for n in t.outputs), choices=choices, cost=_cost(nodes),
                            note=f"image input {t.name} {list(t.shape)}: {len(nodes)} nodes see its size, "
                                 f"up to a global pool (approximate: crops or down-samples the image)"))
        return out

    def rejections(self, graph: "gs.Graph") -> list[tuple[str, str]]:
        return _sites(graph)[1]

    def apply(self, graph: "gs.Graph", site: Site, choice: Choice, ctx: MoveContext) -> bool:
        import onnx_graphsurgeon as gs

        kind, s = _choice_size(choice)
        name = site.key.split(":", 1)[1]
        inp = next((t for t in graph.inputs if t.name == name), None)
        if inp is None or _image_input(inp) is not None:
            return False
        nodes, why = _region(graph, inp)
        if why is not None:
            return False
        n, c, h, w = inp.shape
        h, w = int(h), int(w)
        if kind == "crop":
            sh, sw = min(s, h), min(s, w)
        else:  # resize keeps the aspect ratio: the shorter side becomes s
            f = s / min(h, w)
            sh, sw = int(round(h * f)), int(round(w * f))
        taken = {t.name for t in graph.tensors().values()}
        out = gs.Variable(_fresh_name(taken, f"{name}_{kind}{s}"), dtype=inp.dtype, shape=[n, c, sh, sw])
        readers = [x for x in nodes if any(t is inp for t in x.inputs)]
        if kind == "crop":
            y0, x0 = (h - sh) // 2, (w - sw) // 2
            consts = [gs.Constant(_fresh_name(taken, f"{name}_crop_{k}"), np.array(v, dtype=np.int64))
                      for k, v in (("starts", [y0, x0]), ("ends", [y0 + sh, x0 + sw]), ("axes", [2, 3]))]
            node = gs.Node("Slice", name=_fresh_name(taken, f"/resolution/{name}/Slice"), inputs=[inp] + consts,
                           outputs=[out])
        else:
            if _opset(graph) < 13:
                return False
            sizes = gs.Constant(_fresh_name(taken, f"{name}_resize_sizes"),
                                np.array([int(v) if isinstance(v, (int, np.integer)) else 1 for v in (n, c)]
                                         + [sh, sw], dtype=np.int64))
            attrs = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
            if _opset(graph) >= 18:
                attrs["antialias"] = 1
            empty = gs.Variable.empty()
            node = gs.Node("Resize", name=_fresh_name(taken, f"/resolution/{name}/Resize"),
                           inputs=[inp, empty, gs.Variable.empty(), sizes], outputs=[out], attrs=attrs)
        for x in readers:
            for i, t in enumerate(x.inputs):
                if t is inp:
                    x.inputs[i] = out
        graph.nodes.insert(0, node)
        _repad(graph, nodes, out, (h, w), (sh, sw))
        # the region's recorded shapes are the original size's: export infers them anew
        for x in nodes:
            if x.op in _GLOBAL or x.op in _REDUCE:
                continue
            for t in x.outputs:
                if isinstance(t, gs.Variable):
                    t.shape = None
        return True
