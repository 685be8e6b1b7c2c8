"""Pad convolution channel counts up to the CPU's vector width: an exact rewrite before the TVM
CPU targets import an NHWC model (docs/compiler.md, the 2026-11-28 11:00 section).

In NHWC the x86 schedules vectorize a conv over its output channels, 16 float32 lanes with
AVX-512. A conv to 24 or 40 channels leaves a tail of 8 lanes after each 16: tuned 48 trials,
EfficientNet-Lite0's 96 -> 24 1x1 conv at 56x56 took 118 us, the same conv to 32 channels 67 us.
onnxruntime does the same padding (its NCHWc blocks are 16 channels wide).

The rewrite pads each such conv's weights (and bias) with zero output channels, so the padded
channels of its output are exactly 0, and carries the padded tensor on to its consumers instead
of slicing it (a slice would be a kernel of its own): through 0-preserving elementwise ops
(Relu, Clip with min <= 0 <= max, Add of two tensors padded alike) to 1x1 or kxk convs whose
weights get zero input channels to match. A group of connected tensors is padded only when all
of it can be: every producer a float conv with constant weights or one of those ops, every
consumer one of those ops or a conv with constant weights, none a graph output. Anything else
(a depthwise conv, a Concat, a Reshape, a model output, QDQ weights) leaves the group as it is.
Exact: zero weights add exact zeros, so the model's outputs are those of the original up to the
float reassociation any schedule change brings (tests/test_channel_pad.py, against onnxruntime).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

# pad only where the padded conv does at most this much more arithmetic (24 -> 32: x1.33, 40 -> 48: x1.2;
# 8 -> 16 at x2 is left alone)
MAX_GROWTH = 1.5
_ZERO_KEEPING = ("Relu", "Clip", "Add")


def _attr(node, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def pad_channels(model: "onnx.ModelProto", multiple: int) -> tuple["onnx.ModelProto", dict[str, Any]]:
    """(model with its conv channel groups padded to a multiple of `multiple`, {"channels_padded":
    [(from, to), ...] per group, "convs_padded": n}). The given model is not modified; a model with
    nothing to pad (or multiple <= 1) is returned as is."""
    import networkx as nx
    import numpy as np
    import onnx
    from onnx import numpy_helper

    info: dict[str, Any] = {"channels_padded": [], "convs_padded": 0}
    if multiple <= 1:
        return model, info
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    init_uses: dict[str, int] = {}
    producer: dict[str, Any] = {}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
                init_uses[i] = init_uses.get(i, 0) + 1
        for o in n.output:
            producer[o] = n
    outputs = {o.name for o in g.output}

    def weight(conv):  # the float 4-D constant weight of a group-1 conv, or None
        if len(conv.input) < 2 or conv.input[1] not in inits or _attr(conv, "group", 1) != 1:
            return None
        w = inits[conv.input[1]]
        return w if len(w.dims) == 4 and w.data_type == onnx.TensorProto.FLOAT else None

    def clip_keeps_zero(n) -> bool:  # Relu and Add map zeros to zero; Clip when min <= 0 <= max
        if n.op_type != "Clip":
            return True
        lo, hi = _attr(n, "min", -np.inf), _attr(n, "max", np.inf)  # opset < 11: attributes
        for k in (1, 2):  # opset >= 11: optional constant inputs
            if len(n.input) > k and n.input[k]:
                if n.input[k] not in inits:
                    return False
                v = float(numpy_helper.to_array(inits[n.input[k]]).ravel()[0])
                lo, hi = (v, hi) if k == 1 else (lo, v)
        return lo <= 0 <= hi

    # the tensors that could carry padded channels: outputs of seeds (group-1 convs whose channel count
    # is not a multiple) and of zero-keeping ops; joined with their zero-keeping inputs into groups
    seeds = {}
    for n in g.node:
        w = weight(n) if n.op_type == "Conv" else None
        if w is not None and w.dims[0] % multiple and w.dims[0] > multiple:
            to = -(-w.dims[0] // multiple) * multiple
            if to / w.dims[0] <= MAX_GROWTH:
                seeds[n.output[0]] = (w.dims[0], to)
    if not seeds:
        return model, info
    graph = nx.Graph()
    graph.add_nodes_from(seeds)
    for n in g.node:  # one pass: an ONNX graph's nodes are in topological order (the checker enforces it)
        if n.op_type in _ZERO_KEEPING:
            graph.add_edges_from((i, n.output[0]) for i in n.input[:2] if i in graph)

    def tensor_ok(t: str) -> bool:
        if t in outputs:
            return False
        p = producer.get(t)
        if t not in seeds:  # a zero-keeping op: its activation inputs must all be in the group
            if p is None or p.op_type not in _ZERO_KEEPING or not clip_keeps_zero(p):
                return False
            acts = p.input[:2] if p.op_type == "Add" else p.input[:1]
            if not all(a in graph for a in acts):
                return False
        for c in consumers.get(t, []):
            if c.op_type in _ZERO_KEEPING:
                continue
            if c.op_type != "Conv" or c.input[0] != t or weight(c) is None or t in c.input[1:]:
                return False
        return True

    plan = []
    for group in nx.connected_components(graph):
        sizes = {seeds[t] for t in group if t in seeds}
        if len(sizes) == 1 and all(tensor_ok(t) for t in group):
            plan.append((group, sizes.pop()))
    if not plan:
        return model, info

    out = onnx.ModelProto()
    out.CopyFrom(model)
    og = out.graph
    pads: dict[int, dict[int, int]] = {}  # node index -> {weight axis: padded size}
    padded_tensors: set[str] = set()
    for group, (c_from, c_to) in plan:
        padded_tensors |= group
        info["channels_padded"].append((c_from, c_to))
        for k, n in enumerate(og.node):  # a conv can be both: a consumer of one group, a seed of another
            if n.op_type == "Conv" and n.output[0] in group:  # a seed: zero output channels (and bias)
                pads.setdefault(k, {})[0] = c_to
            if n.op_type == "Conv" and n.input[0] in group:  # a consumer: zero input channels
                pads.setdefault(k, {})[1] = c_to
    new_inits: dict[str, "onnx.TensorProto"] = {}

    def padded(name: str, to: dict[int, int], owner: str) -> str:
        arr = numpy_helper.to_array(inits[name])
        widths = [(0, to.get(ax, arr.shape[ax]) - arr.shape[ax]) for ax in range(arr.ndim)]
        new = name if init_uses.get(name, 0) == 1 else f"{name}__pad_{owner}"
        new_inits[new] = numpy_helper.from_array(np.pad(arr, widths), new)
        return new

    for k, to in pads.items():
        n = og.node[k]
        n.input[1] = padded(n.input[1], to, n.output[0])
        if 0 in to and len(n.input) > 2 and n.input[2]:
            n.input[2] = padded(n.input[2], {0: to[0]}, n.output[0])
    info["convs_padded"] = len(pads)
    keep = [i for i in og.initializer if i.name not in new_inits]
    del og.initializer[:]
    og.initializer.extend(keep + list(new_inits.values()))
    for v in [v for v in og.value_info if v.name in padded_tensors]:
        og.value_info.remove(v)
    onnx.checker.check_model(out)
    return out, info
