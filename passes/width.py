"""Prune channels: drop output channels of convs / Gemm / MatMul units and the matching inputs of every consumer.

An architecture move. Channels are coupled: a residual Add makes its two producers' channels
one set, a depthwise conv, BN, activation, Pad or pooling carries its input's channels to its
output, an SE block's Mul joins the excite conv's channels to the block's, a Concat lays its
inputs side by side. `_Analysis` walks the graph once and gives every tensor a channel layout:
its channel axis and the list of channel spaces along it (a space is the output channels of
one producer; a Concat output holds several). Spaces that must be pruned together are joined
in a networkx graph; each connected component with a prunable producer everywhere is one site.

Choices per site: ("keep", 0.75, 0.5): keep ceil(ratio * C) channels of the group (ratios that
keep every channel, or none, are left out). Which channels stay is decided once per run on the
base model (ctx.options["width_importance"]), so a site always drops the same channels:
- "ls" (the default when there is calibration data and repair is on): the channel selection of
  He et al. 2017 / ThiNet. Greedy backward elimination of the channels whose removal least
  increases the least-squares error of reconstructing every consumer's original output from its
  remaining inputs, on the original activations. Needs every consumer to be a 1x1 conv / Gemm /
  MatMul; otherwise the group falls back to "l1".
- "l1" (default otherwise) / "l2": the norm of each producer's output filter (times
  |gamma|/sigma of a BN that follows it), normalised per producer, summed over the group.

A move removes the group's channels everywhere at once: producers' output filters and biases,
BN / depthwise / elementwise-constant parameters, Reshape targets, the input channels of every
consumer (Conv group=1, Gemm, MatMul) at the right offset inside a Concat. Never emitted: a
group touching a graph input or output, a tensor whose channel axis a Reshape/Flatten mixes
with other axes, an op the analysis does not know, grouped convs; rejections() says why.

Repair (ctx.options["repair"], on by default, needs ctx.calibration): each consumer of the
pruned channels is refit by least squares so that, fed the original activations of the kept
channels, it reproduces the original model's output (He et al. 2017 / ThiNet reconstruction;
graphopt.repair.refit_conv / refit_linear), bias included (it absorbs the mean of what the
pruned channels contributed), ridge toward the pruned weights, stronger where there are few rows
per weight (late layers, the classifier). Stage 40: after kernel/depthwise, whose own repairs
read the original channel counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.errors import UsageError
from graphopt.genotype import Choice, Site
from graphopt.plugin import MoveContext, Option, Pass

from ._graph import _const, _fresh_name, _input, _present, _static_size

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

RATIOS = (0.75, 0.5)
MAX_ROWS = 8192  # rows (pixels x samples) of each least-squares refit
RIDGE = 1e-4  # pull toward the pruned weights, relative to the mean feature energy (at least)
RIDGE_PER_DOF = 1.0  # ... raised to this times (weights per output) / (rows): small data, strong prior
ELIMINATION_CHUNK = 0.05  # data-driven selection drops this share of the live channels per round
SELECT_ROWS = 4096  # rows of the least-squares problems that rank channels
PREFETCH_BYTES = 1 << 30  # original activations fetched in one pass per run, at most

UNARY = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf",
         "Gelu", "Mish", "Cast", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu", "Sin", "Cos"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


# ------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class _Layout:
    """Where a tensor's channels live: its channel axis and the spaces laid along it."""

    axis: int
    segs: tuple[tuple[int, int], ...]  # (space id, length) in order along the axis

    @property
    def length(self) -> int:
        return sum(n for _, n in self.segs)

    def lengths(self) -> tuple[int, ...]:
        return tuple(n for _, n in self.segs)

    def spaces(self) -> set[int]:
        return {s for s, _ in self.segs}

    def keep_positions(self, spaces: set[int], keep: np.ndarray) -> np.ndarray | None:
        """Positions along the axis that stay when `spaces` keep only `keep`; None if untouched."""
        out, off, touched = [], 0, False
        for sid, n in self.segs:
            if sid in spaces:
                out.append(off + keep)
                touched = True
            else:
                out.append(off + np.arange(n))
            off += n
        return np.concatenate(out).astype(np.int64) if touched else None


@dataclass
class _Action:
    """One edit a pruning implies: slice a constant input, set a depthwise group, or rewrite a
    Reshape target (kind 'slice' | 'group' | 'shape'), positions taken from `layout`."""

    kind: str
    node: gs.Node
    layout: _Layout
    index: int = 0  # input slot
    axis: int = 0  # axis of the constant (slice) or entry of the shape vector (shape)


@dataclass
class _Consumer:
    """A layer that reads channels and makes new ones (Conv group=1, Gemm, MatMul): repair refits it."""

    node: gs.Node
    kind: str  # "conv" | "gemm" | "matmul"
    inp: _Layout
    out: _Layout


@dataclass
class _Group:
    spaces: set[int]
    length: int
    producers: list[gs.Node]  # in topological order
    why_not: str | None  # None: a site
    cost: float = 0.0


def _shape(t) -> tuple[int, ...] | None:
    if t is None or t.shape is None:
        return None
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in t.shape):
        return None
    return tuple(int(d) for d in t.shape)


def _attr_str(node, name: str, default: str) -> str:
    v = node.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _topo(graph: gs.Graph) -> list:
    """Nodes in a topological order (the graph's own order where it is one; moves may append)."""
    import networkx as nx

    index = {id(n): i for i, n in enumerate(graph.nodes)}
    g = nx.DiGraph()
    g.add_nodes_from(range(len(graph.nodes)))
    for i, n in enumerate(graph.nodes):
        for t in n.outputs:
            for c in t.outputs:
                if id(c) in index:
                    g.add_edge(i, index[id(c)])
    return [graph.nodes[i] for i in nx.lexicographical_topological_sort(g)]


# ----------------------------------------------------------------------------------- analysis
class _Analysis:
    """Channel layouts of every tensor, the coupling of channel spaces, and what pruning edits."""

    def __init__(self, graph: gs.Graph):
        import networkx as nx

        self.links = nx.Graph()  # nodes: space ids; an edge: channel i of one = channel i of the other
        self.length: dict[int, int] = {}
        self.producer: dict[int, gs.Node] = {}  # prunable spaces only
        self.poison: dict[int, str] = {}
        self.layouts: dict[str, _Layout | None] = {}
        self.tensors: dict[str, Any] = {}
        self.actions: list[_Action] = []
        self.consumers: list[_Consumer] = []
        self.flops: dict[str, float] = {}
        self._run(graph)

    # ------------------------------------------------------------------ bookkeeping
    def _space(self, length: int, producer=None, poison: str | None = None) -> int:
        sid = len(self.length)
        self.length[sid] = length
        self.links.add_node(sid)
        if producer is not None:
            self.producer[sid] = producer
        if poison is not None:
            self.poison[sid] = poison
        return sid

    def _fresh_layout(self, t, axis: int | None = None, producer=None, poison: str | None = None) -> _Layout | None:
        shape = _shape(t)
        if shape is None or len(shape) == 0:
            return None
        axis = (1 if len(shape) >= 2 else 0) if axis is None else axis
        return _Layout(axis, ((self._space(shape[axis], producer, poison), shape[axis]),))

    def _set(self, t, layout: _Layout | None) -> None:
        self.layouts[t.name] = layout
        self.tensors[t.name] = t

    def _lay(self, t) -> _Layout | None:
        return self.layouts.get(t.name)

    def _poison_layout(self, layout: _Layout | None, why: str) -> None:
        if layout is not None:
            for sid in layout.spaces():
                self.poison.setdefault(sid, why)

    def _union(self, a: _Layout, b: _Layout) -> None:
        for (sa, _), (sb, _) in zip(a.segs, b.segs):
            self.links.add_edge(sa, sb)

    # --------------------------------------------------------------------- the walk
    def _run(self, graph: gs.Graph) -> None:
        for t in graph.inputs:
            self._set(t, self._fresh_layout(t, poison=f"graph input '{t.name}'"))
        nodes = _topo(graph)
        control = [n for n in nodes if any(_is_graph(v) for v in n.attrs.values())]
        for n in nodes:
            if control:  # subgraphs read outer tensors without listing them: prune nothing
                self._unsupported(n, f"graph has control flow ({control[0].op} '{control[0].name}')")
                continue
            if n.op == "Constant" or not n.outputs:  # no outputs: dead, left by an earlier move until cleanup
                continue
            why = self._visit(n)
            if why is not None:
                self._unsupported(n, why)
        for t in graph.outputs:
            self._poison_layout(self.layouts.get(t.name), f"graph output '{t.name}'")

    def _unsupported(self, node, why: str) -> None:
        reason = f"{node.op} '{node.name}': {why}"
        for t in node.inputs:
            if _present(t):
                self._poison_layout(self.layouts.get(t.name), reason)
        for t in node.outputs:
            self._set(t, self._fresh_layout(t, poison=reason))

    def _visit(self, n) -> str | None:
        op = n.op
        if op in UNARY:
            return self._unary(n)
        if op in BINARY:
            return self._binary(n)
        if op in POOLS:
            return self._pool(n)
        if op in NORMS:
            return self._norm(n)
        if op in RESHAPES:
            return self._reshape(n)
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            return "op not understood by the width analysis"
        return handler(n)

    def _main_input(self, n) -> tuple[Any, _Layout] | str:
        x = n.inputs[0] if n.inputs else None
        if x is None or not _present(x):
            return "no input"
        lay = self._lay(x)
        if lay is None:
            return "input channel layout unknown (no static shape)"
        return x, lay

    # --------------------------------------------------------------------- handlers
    def _unary(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        for t in n.inputs[1:]:
            if _present(t) and (_const(t) is None or _const(t).size > 1):
                return f"input '{t.name}' is not a scalar constant"
        for t in n.outputs:
            self._set(t, m[1])
        return None

    def _pool(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        if m[1].axis != 1:
            return f"channel axis {m[1].axis} is not 1"
        for t in n.outputs:
            self._set(t, m[1])
        return None

    def _norm(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        lay = m[1]
        if lay.axis != 1:
            return f"channel axis {lay.axis} is not 1"
        for i in NORMS[n.op]:
            v = _const(_input(n, i))
            if v is None or v.shape != (lay.length,):
                return f"parameter {i} is not a constant of shape [{lay.length}]"
        if any(_present(t) for t in n.outputs[1:]):
            return "BatchNormalization in training mode"
        self.actions += [_Action("slice", n, lay, i, 0) for i in NORMS[n.op]]
        self._set(n.outputs[0], lay)
        return None

    def _binary(self, n) -> str | None:
        oshape = _shape(n.outputs[0])
        if oshape is None:
            return "output shape unknown"
        rank = len(oshape)
        ins = [(i, t) for i, t in enumerate(n.inputs) if _present(t)]
        primary = None
        for i, t in ins:
            lay, shape = self._lay(t), _shape(t)
            if _const(t) is None and lay is not None and shape is not None:
                a = lay.axis + rank - len(shape)
                if shape[lay.axis] == oshape[a]:
                    primary = (i, lay, a)
                    break
        if primary is None:
            return "no input carries the output's channels"
        pi, play, a = primary
        big = play.length
        unions, slices = [], []
        for i, t in ins:
            if i == pi:
                continue
            c = _const(t)
            shape = c.shape if c is not None else _shape(t)
            if shape is None:
                return f"input '{t.name}' has no static shape"
            ca = a - (rank - len(shape))
            if c is not None:
                if ca >= 0 and shape[ca] != 1:
                    if shape[ca] != big:
                        return f"constant '{t.name}' has {shape[ca]} channels, expected {big} or 1"
                    slices.append(_Action("slice", n, play, i, ca))
                continue
            lay = self._lay(t)
            if lay is None:
                return f"input '{t.name}' has no channel layout"
            own = lay.axis + rank - len(shape)
            if ca >= 0 and shape[ca] != 1:
                if own != a or lay.lengths() != play.lengths():
                    return f"inputs '{n.inputs[pi].name}' and '{t.name}' lay their channels out differently"
                unions.append(lay)
            elif lay.length > 1 and own != a:
                return f"input '{t.name}' has its channels on another axis"
        for lay in unions:
            self._union(play, lay)
        self.actions += slices
        self._set(n.outputs[0], play if a == play.axis else _Layout(a, play.segs))
        return None

    def _reshape(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        x, lay = m
        ishape, oshape = _shape(x), _shape(n.outputs[0])
        if ishape is None or oshape is None:
            return "static shapes unknown"
        a, big = lay.axis, lay.length
        pre = int(np.prod(ishape[:a], dtype=np.int64))
        b = next((j for j in range(len(oshape)) if oshape[j] == big and int(np.prod(oshape[:j], dtype=np.int64)) == pre),
                 None)
        if b is None:
            return f"mixes the channel axis {a} of {list(ishape)} with other axes in {list(oshape)}"
        if n.op == "Reshape":
            target = _const(_input(n, 1))
            if target is None:
                return "target shape is not a constant"
            target = [int(v) for v in target]
            allow_zero = int(n.attrs.get("allowzero", 0))
            if not allow_zero and a < len(target) and target[a] == 0 and a != b:
                return "target copies the channel dimension (0) to another axis"
            v = target[b]
            if v == big:
                self.actions.append(_Action("shape", n, lay, 1, b))
            elif not (v == -1 or (v == 0 and not allow_zero and a == b)):
                return f"target entry {v} at the channel axis"
        self._set(n.outputs[0], _Layout(b, lay.segs))
        return None

    def _op_Transpose(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        lay = m[1]
        rank = len(_shape(n.inputs[0]) or ())
        perm = [int(p) for p in n.attrs.get("perm", list(range(rank))[::-1])]
        self._set(n.outputs[0], _Layout(perm.index(lay.axis), lay.segs))
        return None

    def _softmax(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        rank = len(_shape(n.inputs[0]) or ())
        axis = int(n.attrs.get("axis", -1))
        if axis % max(rank, 1) == m[1].axis:
            return "normalises over the channel axis"
        self._set(n.outputs[0], m[1])
        return None

    _op_Softmax = _op_LogSoftmax = _softmax

    def _op_Pad(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        lay = m[1]
        pads = _const(_input(n, 1))
        if pads is None:
            return "pads are not a constant"
        if _input(n, 3) is not None:
            return "pads with an axes input"
        r = len(pads) // 2
        if pads[lay.axis] != 0 or pads[lay.axis + r] != 0:
            return "pads the channel axis"
        self._set(n.outputs[0], lay)
        return None

    def _op_Resize(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        lay = m[1]
        scales, sizes = _const(_input(n, 2)), _const(_input(n, 3))
        if sizes is not None and sizes.size:
            if _input(n, 3) is not None and n.attrs.get("axes") is not None:
                return "sizes with an axes attribute"
            self.actions.append(_Action("shape", n, lay, 3, lay.axis))
        elif scales is not None and scales.size:
            if n.attrs.get("axes") is not None or float(scales[lay.axis]) != 1.0:
                return "scales the channel axis"
        else:
            return "neither constant scales nor sizes"
        self._set(n.outputs[0], lay)
        return None

    def _op_Concat(self, n) -> str | None:
        oshape = _shape(n.outputs[0])
        if oshape is None:
            return "output shape unknown"
        axis = int(n.attrs.get("axis", 1)) % len(oshape)
        lays = []
        for t in n.inputs:
            if _const(t) is not None:
                return f"constant input '{t.name}'"
            if self._lay(t) is None:
                return f"input '{t.name}' has no channel layout"
            lays.append(self._lay(t))
        if all(lay.axis == axis for lay in lays):
            self._set(n.outputs[0], _Layout(axis, tuple(s for lay in lays for s in lay.segs)))
            return None
        if any(lay.axis == axis for lay in lays) or any(lay.lengths() != lays[0].lengths() for lay in lays):
            return "inputs lay their channels out differently"
        for lay in lays[1:]:
            self._union(lays[0], lay)
        self._set(n.outputs[0], lays[0])
        return None

    def _op_Conv(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        _, lay = m
        w = _const(_input(n, 1))
        if w is None:
            return "weight is not a constant"
        bias = _input(n, 2)
        if bias is not None and _const(bias) is None:
            return "bias is not a constant"
        group = int(n.attrs.get("group", 1))
        if lay.axis != 1 and group == 1:  # its input channels are not prunable, its output channels are
            self._poison_layout(lay, f"Conv '{n.name}': input channel axis {lay.axis} is not 1")
            lay = None
        elif lay.axis != 1:
            return f"channel axis {lay.axis} is not 1"
        cout, y = int(w.shape[0]), n.outputs[0]
        self.flops[n.name] = 2.0 * (_static_size(_shape(y)) or 0) * int(np.prod(w.shape[1:]))
        if group == 1:
            out = self._fresh_layout(y, axis=1, producer=n)
            if out is None:
                return "output shape unknown"
            self.actions.append(_Action("slice", n, out, 1, 0))
            if bias is not None:
                self.actions.append(_Action("slice", n, out, 2, 0))
            if lay is not None:
                self.actions.append(_Action("slice", n, lay, 1, 1))
                self.consumers.append(_Consumer(n, "conv", lay, out))
            self._set(y, out)
            return None
        if group == lay.length == cout and w.shape[1] == 1:  # depthwise: channel c in, channel c out
            self.actions += [_Action("slice", n, lay, 1, 0), _Action("group", n, lay)]
            if bias is not None:
                self.actions.append(_Action("slice", n, lay, 2, 0))
            self._set(y, lay)
            return None
        return f"grouped conv (group={group}, {lay.length}->{cout} channels)"

    def _op_Gemm(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        _, lay = m
        w = _const(_input(n, 1))
        if w is None or w.ndim != 2:
            return "B is not a constant matrix"
        if int(n.attrs.get("transA", 0)) or lay.axis != 1:  # A's channels are not prunable, the output's are
            self._poison_layout(lay, f"Gemm '{n.name}': A is transposed or its channels are not on axis 1")
            lay = None
        tb = int(n.attrs.get("transB", 0))
        c = _input(n, 2)
        if c is not None and _const(c) is None:
            return "C is not a constant"
        y = n.outputs[0]
        out = self._fresh_layout(y, axis=1, producer=n)
        if out is None:
            return "output shape unknown"
        self.flops[n.name] = 2.0 * (_static_size(_shape(y)) or 0) * w.shape[1 if tb else 0]
        if lay is not None:
            self.actions.append(_Action("slice", n, lay, 1, 1 if tb else 0))
            self.consumers.append(_Consumer(n, "gemm", lay, out))
        self.actions.append(_Action("slice", n, out, 1, 0 if tb else 1))
        cv = _const(c)
        if cv is not None and cv.ndim >= 1 and cv.shape[-1] == out.length and out.length > 1:
            self.actions.append(_Action("slice", n, out, 2, cv.ndim - 1))
        self._set(y, out)
        return None

    def _op_MatMul(self, n) -> str | None:
        m = self._main_input(n)
        if isinstance(m, str):
            return m
        x, lay = m
        w = _const(_input(n, 1))
        xs = _shape(x)
        if w is None or w.ndim != 2:
            return "B is not a constant matrix"
        if xs is None or len(xs) < 2:
            return "A has no static shape of rank 2 or more"
        if lay.axis != len(xs) - 1:  # A's channels are not prunable, the output's are
            self._poison_layout(lay, f"MatMul '{n.name}': A's channels are not on its last axis")
            lay = None
        y = n.outputs[0]
        ys = _shape(y)
        out = self._fresh_layout(y, axis=len(ys) - 1 if ys else None, producer=n)
        if out is None:
            return "output shape unknown"
        self.flops[n.name] = 2.0 * (_static_size(ys) or 0) * w.shape[0]
        self.actions.append(_Action("slice", n, out, 1, 1))
        if lay is not None:
            self.actions.append(_Action("slice", n, lay, 1, 0))
            self.consumers.append(_Consumer(n, "matmul", lay, out))
        self._set(y, out)
        return None

    # ------------------------------------------------------------------- the groups
    def groups(self) -> list[_Group]:
        import networkx as nx

        order = {}
        for sid in sorted(self.producer):
            order.setdefault(sid, len(order))
        out = []
        for comp in nx.connected_components(self.links):
            spaces = set(comp)
            length = self.length[min(spaces)]
            prods = [self.producer[s] for s in sorted(spaces) if s in self.producer]
            why = next((self.poison[s] for s in sorted(spaces) if s in self.poison), None)
            if why is None and len(prods) < len(spaces):
                why = "a channel space without a prunable producer"
            if why is None and length < 2:
                why = "a single channel"
            touched = {a.node.name for a in self.actions if a.layout.spaces() & spaces}
            touched |= {p.name for p in prods}
            cost = sum(self.flops.get(name, 0.0) for name in touched)
            out.append(_Group(spaces, length, prods, why, cost))
        out = [g for g in out if g.producers]
        out.sort(key=lambda g: min(order[s] for s in g.spaces if s in order))
        return out


def _is_graph(v) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(v, gs.Graph) or (isinstance(v, (list, tuple)) and any(isinstance(x, gs.Graph) for x in v))


def _ratios(length: int) -> tuple[float, ...]:
    return tuple(r for r in RATIOS if 1 <= _kept(length, r) < length)


def _kept(length: int, ratio: float) -> int:
    return max(1, math.ceil(ratio * length - 1e-9))


# --------------------------------------------------------------------------------- importance
def _importance(an: _Analysis, g: _Group, norm: str = "l1") -> np.ndarray:
    """Per-channel score of a group: each producer's filter norms (times |gamma|/sigma of a BN
    reading its output alone), divided by their mean, summed over producers."""
    score = np.zeros(g.length)
    for p in g.producers:
        w = _const(_input(p, 1)).astype(np.float64)
        if p.op == "Conv":
            filt = w.reshape(w.shape[0], -1)
        elif p.op == "Gemm":
            filt = w if int(p.attrs.get("transB", 0)) else w.T
        else:  # MatMul
            filt = w.T
        s = np.abs(filt).sum(axis=1) if norm == "l1" else np.sqrt((filt ** 2).sum(axis=1))
        y = p.outputs[0]
        if len(y.outputs) == 1 and y.outputs[0].op == "BatchNormalization":
            bn = y.outputs[0]
            gamma, var = _const(_input(bn, 1)), _const(_input(bn, 4))
            if gamma is not None and var is not None:
                eps = float(bn.attrs.get("epsilon", 1e-5))
                s = s * np.abs(gamma) / np.sqrt(var.astype(np.float64) + eps)
        score += s / (s.mean() + 1e-30)
    return score


def _ls_importance(ctx: MoveContext, an: _Analysis, g: _Group, prefetch: list[str]) -> np.ndarray | None:
    """Data-driven channel ranking (the channel selection of He et al. 2017 / ThiNet): greedy
    backward elimination of the channel whose removal least increases the least-squares error of
    reconstructing every consumer's original output from its remaining inputs (each consumer's
    error relative to its output energy; a bias column always stays). The removal order is the
    ranking (removed first = least important), so every keep ratio keeps a greedy set.
    None (callers fall back to filter norms) without calibration data or when a consumer is not
    a 1x1 conv / Gemm / MatMul reading the group once."""
    from graphopt.repair import activations

    act = activations(ctx)
    cons = [c for c in an.consumers if c.inp.spaces() & g.spaces]
    if act is None or not cons:
        return None
    for c in cons:
        if sum(sid in g.spaces for sid, _ in c.inp.segs) != 1:
            return None
        if c.kind == "conv":
            w = _const(_input(c.node, 1))
            a = c.node.attrs
            if (w.shape[2:] != (1, 1) or int(a.get("group", 1)) != 1 or any(int(v) != 1 for v in a.get("strides", [1]))
                    or any(int(v) for v in a.get("pads", [0])) or _attr_str(c.node, "auto_pad", "NOTSET") != "NOTSET"):
                return None
    _prefetch(act, prefetch)
    rng = np.random.default_rng(0)
    hs, bs, cols = [], [], []
    for c in cons:
        x, y = c.node.inputs[0].name, c.node.outputs[0].name
        a = act.get([x, y])
        f = np.moveaxis(a[x], c.inp.axis, -1).reshape(-1, c.inp.length)
        t = np.moveaxis(a[y], c.out.axis, -1).reshape(-1, c.out.length)
        if f.shape[0] > SELECT_ROWS:
            idx = np.sort(rng.choice(f.shape[0], SELECT_ROWS, replace=False))
            f, t = f[idx], t[idx]
        f = np.concatenate([f.astype(np.float32), np.ones((f.shape[0], 1), np.float32)], axis=1)
        t = t.astype(np.float64)
        t = ((t - t.mean(axis=0)) / (np.linalg.norm(t - t.mean(axis=0)) + 1e-30)).astype(np.float32)
        gram = (f.T @ f).astype(np.float64)  # float32 products: a ranking, not the refit itself
        d = c.inp.length
        lam = max(RIDGE, RIDGE_PER_DOF * d / f.shape[0]) * np.trace(gram[:d, :d]) / d + 1e-12
        h = np.linalg.inv(gram + lam * np.eye(d + 1))
        hs.append(h)
        bs.append(h @ (f.T @ t).astype(np.float64))
        off = 0
        for sid, n in c.inp.segs:
            if sid in g.spaces:
                cols.append(off + np.arange(n))
            off += n
    states = [_Elimination(h, b, col, h.shape[0]) for h, b, col in zip(hs, bs, cols)]
    n = g.length
    alive, score = np.ones(n, bool), np.zeros(n)
    goal, removed = n - _kept(n, min(RATIOS)), 0
    while True:
        delta = sum(st.delta(alive) for st in states)
        if removed >= goal:
            break
        live = np.flatnonzero(alive)
        r = min(goal - removed, max(1, math.ceil(ELIMINATION_CHUNK * len(live))))
        pick = live[np.argsort(delta[live], kind="stable")[:r]]
        score[pick] = removed - n + np.arange(r)  # removed earlier: lower
        removed += r
        alive[pick] = False
        for st in states:
            st.remove(pick)
    score[alive] = delta[alive]  # survivors ranked by what removing them would cost (all >= 0)
    return score


class _Elimination:
    """One consumer's ridge least-squares problem while input columns are removed: H the inverse
    (regularised) Gram matrix and B the solution, over the live columns only."""

    def __init__(self, h: np.ndarray, b: np.ndarray, cols: np.ndarray, width: int):
        self.h, self.b, self.cols = h, b, cols  # cols: column of each group channel
        self.live = np.ones(width, bool)

    def _compact(self, cols: np.ndarray) -> np.ndarray:
        return (np.cumsum(self.live) - 1)[cols]

    def delta(self, alive: np.ndarray) -> np.ndarray:
        """Increase of the squared error if each live group channel alone were removed."""
        out = np.zeros(len(self.cols))
        k = self._compact(self.cols[alive])
        out[alive] = (self.b[k] ** 2).sum(axis=1) / np.maximum(self.h[k, k], 1e-30)
        return out

    def remove(self, channels: np.ndarray) -> None:
        r = self._compact(self.cols[channels])
        keep = np.setdiff1d(np.arange(self.h.shape[0]), r)
        h_rr = np.linalg.inv(self.h[np.ix_(r, r)])
        h_ar = self.h[np.ix_(keep, r)]
        self.b = self.b[keep] - h_ar @ (h_rr @ self.b[r])
        self.h = self.h[np.ix_(keep, keep)] - h_ar @ h_rr @ h_ar.T
        self.live[self.cols[channels]] = False


def _keep(score: np.ndarray, ratio: float) -> np.ndarray:
    k = _kept(len(score), ratio)
    return np.sort(np.argsort(-score, kind="stable")[:k]).astype(np.int64)


# -------------------------------------------------------------------------------------- edits
def _prune(graph: gs.Graph, an: _Analysis, g: _Group, keep: np.ndarray) -> None:
    import onnx_graphsurgeon as gs

    taken = set(graph.tensors(check_duplicates=False).keys())
    for act in an.actions:
        pos = act.layout.keep_positions(g.spaces, keep)
        if pos is None:
            continue
        n = act.node
        if act.kind == "group":
            n.attrs["group"] = len(pos)
            continue
        t = n.inputs[act.index]
        v = _const(t)
        if act.kind == "slice":
            new = np.take(v, pos, axis=act.axis)
        else:  # shape: the channel count inside a Reshape target / Resize sizes
            new = v.copy()
            new[act.axis] = len(pos)
        base = (n.name.strip("/").replace("/", "_") or n.op) + f"_in{act.index}_w{len(pos)}"
        n.inputs[act.index] = gs.Constant(_fresh_name(taken, base), np.ascontiguousarray(new.astype(v.dtype)))
    for name, lay in an.layouts.items():
        pos = lay.keep_positions(g.spaces, keep) if lay is not None else None
        t = an.tensors[name]
        if pos is not None and t.shape is not None:
            shape = list(t.shape)
            shape[lay.axis] = len(pos)
            t.shape = shape


def _origins(groups: list[_Group], base: _Base) -> dict[int, tuple[int, np.ndarray]]:
    """space id -> (its base channel count, the base channel index of each current channel).

    Earlier width moves of this candidate kept the top-n channels of a group by base importance,
    so n alone says which; spaces of groups unknown to the base model are left out."""
    out = {}
    for g in groups:
        key = f"width:{g.producers[0].name}"
        n = base.length(key)
        if n is not None and g.length <= n:
            idx = np.arange(n) if g.length == n else np.sort(np.argsort(-base.score(key), kind="stable")[:g.length])
            out.update({s: (n, idx) for s in g.spaces})
        elif g.why_not is not None:  # never pruned: channels are the base's
            out.update({s: (g.length, np.arange(g.length)) for s in g.spaces})
    return out


def _base_index(layout: _Layout, origins: dict[int, tuple[int, np.ndarray]]) -> np.ndarray | None:
    """Base-model channel index of each current channel along the layout's axis (None: unknown)."""
    parts, off = [], 0
    for sid, n in layout.segs:
        if sid not in origins or len(origins[sid][1]) != n:
            return None
        parts.append(off + origins[sid][1])
        off += origins[sid][0]
    return np.concatenate(parts).astype(np.int64)


def _repair(graph: gs.Graph, ctx: MoveContext, an: _Analysis, g: _Group, keep: np.ndarray, base: _Base) -> int:
    """Refit every consumer of the pruned channels to the original model's outputs; returns how many.

    Features are the original activations of the consumer's remaining input channels, the target
    the original outputs of its remaining output channels (other groups may be pruned already)."""
    from graphopt.repair import activations

    act = activations(ctx)
    if act is None:
        return 0
    names = ctx.cache.get("base_tensor_names")
    if names is None:
        gp = ctx.base_model.graph
        names = ctx.cache["base_tensor_names"] = {o for n in gp.node for o in n.output} | {i.name for i in gp.input}
    done = 0
    origins = _origins(an.groups(), base)
    taken = set(graph.tensors(check_duplicates=False).keys())
    for c in an.consumers:
        pin = c.inp.keep_positions(g.spaces, keep)
        if pin is None:
            continue
        x, y = c.node.inputs[0].name, c.node.outputs[0].name
        if x not in names or y not in names:
            continue  # an earlier move made these tensors: no original activations to match
        bin_, bout = _base_index(c.inp, origins), _base_index(c.out, origins)
        if bin_ is None or bout is None:
            continue
        pout = c.out.keep_positions(g.spaces, keep)
        pout = np.arange(c.out.length) if pout is None else pout
        _prefetch(act, base.prefetch)
        a = act.get([x, y])
        feats = np.take(a[x], bin_[pin], axis=c.inp.axis)
        target = np.take(a[y], bout[pout], axis=c.out.axis).astype(np.float64)
        _refit(c, feats, target, taken)
        done += 1
    return done


def _refit(c: _Consumer, feats: np.ndarray, target: np.ndarray, taken: set[str]) -> None:
    """Least-squares refit of one consumer's weights (and bias, which absorbs the mean of what the
    pruned channels contributed) so it maps feats to target; new constants hold the results."""
    import onnx_graphsurgeon as gs

    from graphopt.repair import refit_conv, refit_linear

    n = c.node
    w0 = np.asarray(n.inputs[1].values)
    rows = min(MAX_ROWS, target.size // target.shape[1 if c.kind == "conv" else -1])
    ridge = max(RIDGE, RIDGE_PER_DOF * w0[0].size / rows)  # fewer rows per weight: trust the old weights more
    b0 = _const(_input(n, 2))
    dtype = w0.dtype
    if c.kind == "conv":
        w, b = refit_conv(feats, target, w0, n.attrs, b0=b0, intercept=True, max_rows=MAX_ROWS, ridge=ridge)
    elif c.kind == "gemm":
        alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
        tb = int(n.attrs.get("transB", 0))
        if b0 is not None and b0.size != target.shape[-1]:  # a C that is not one bias per unit
            t = (target - beta * np.broadcast_to(b0, target.shape)) / alpha
            w, b = refit_linear(feats, t, w0 if tb else w0.T, max_rows=MAX_ROWS, ridge=ridge), None
        else:
            prior = None if b0 is None else beta * b0.reshape(-1) / alpha
            w, b = refit_linear(feats, target / alpha, w0 if tb else w0.T, max_rows=MAX_ROWS,
                                b0=prior, intercept=True, ridge=ridge)
            b = b * alpha / beta if beta != 0 else None
        w = w if tb else w.T
    else:  # MatMul: no bias slot
        f, t = feats.reshape(-1, feats.shape[-1]), target.reshape(-1, target.shape[-1])
        w, b = refit_linear(f, t, w0.T, max_rows=MAX_ROWS, ridge=ridge).T, None
    base = n.name.strip("/").replace("/", "_") or n.op
    n.inputs[1] = gs.Constant(_fresh_name(taken, f"{base}_weight_refit"), np.ascontiguousarray(w.astype(dtype)))
    if b is not None:
        name = _fresh_name(taken, f"{base}_bias_refit")
        bias = gs.Constant(name, np.ascontiguousarray(b.reshape(b0.shape if b0 is not None else -1).astype(dtype)))
        if b0 is not None:
            n.inputs[2] = bias
        else:
            n.inputs.append(bias)


def _prefetch(act, names: list[str]) -> None:
    """Fetch the original activations every width repair may read in one pass over the calibration
    data (one model run per sample instead of one per move), within a memory budget; once per run."""
    if names:
        act.get(names)
        names.clear()


# ------------------------------------------------------------------------------------- the pass
class WidthPrune(Pass):
    """Remove a coupled group of channels (keep ratio 0.75 or 0.5; least-squares or filter-norm selection).

    With calibration data and repair on (the default), the layers reading the pruned channels
    are then refit by least squares to the original model's outputs (graphopt.repair)."""

    name = "width"
    description = "prune coupled channel groups of convs / Gemm / MatMul (keep 75% or 50%), LS-repaired"
    fidelity = "approximate: pruned channels, least-squares repaired on calibration data"
    OPTIONS = (
        Option("width_importance", str, "auto", "how channels are ranked", choices=("auto", "l1", "l2", "ls")),
        Option("repair", bool, True, "least-squares repair of new weights on calibration data (--no-repair: 0)"),
    )
    stage = 40  # after kernel/depthwise (stage 30): their repairs read original channel counts
    uses_calibration = True

    def data_moves(self, sites, options) -> str | None:
        norm = str(options.get("width_importance", "auto"))
        repair = bool(options.get("repair", True))
        words = (["least-squares repair"] if repair else []) + (
            ["data-driven channel choice"] if norm == "ls" or (norm == "auto" and repair) else [])
        return " and ".join(words) or None

    def check_options(self, options) -> None:
        norm = str(options.get("width_importance", "auto"))
        if norm not in IMPORTANCE:
            raise UsageError(f"pass option width_importance={norm!r}: use one of {', '.join(IMPORTANCE)}")

    def sites(self, graph: gs.Graph) -> list[Site]:
        out = []
        for g in _Analysis(graph).groups():
            if g.why_not is not None or not _ratios(g.length):
                continue
            names = tuple(p.name for p in g.producers)
            extra = f" (+{len(names) - 1} coupled)" if len(names) > 1 else ""
            out.append(Site(key=f"width:{names[0]}", pass_name=self.name, nodes=names,
                            choices=("keep", *_ratios(g.length)), cost=g.cost,
                            note=f"{g.length} channels of {g.producers[0].op} '{names[0]}'{extra}"))
        return out

    def apply(self, graph: gs.Graph, site: Site, choice: Choice, ctx: MoveContext) -> bool:
        if isinstance(choice, bool) or not isinstance(choice, (int, float)) or not 0 < choice < 1:
            raise ValueError(f"width: choice {choice!r} for site {site.key} is not a keep ratio in (0, 1)")
        base = _base_info(ctx)
        length = base.length(site.key)
        if length is None:
            return False
        an = _Analysis(graph)
        groups = an.groups()
        g = next((g for g in groups if g.producers[0].name == site.nodes[0]), None)
        if (g is None or g.why_not is not None or g.length != length
                or tuple(p.name for p in g.producers) != tuple(site.nodes)):
            return False  # an earlier move changed this group's channels or structure
        keep = _keep(base.score(site.key), float(choice))
        _prune(graph, an, g, keep)
        if ctx.options.get("repair", True):
            _repair(graph, ctx, an, g, keep, base)
        return True

    def rejections(self, graph: gs.Graph) -> list[tuple[str, str]]:
        out = []
        for g in _Analysis(graph).groups():
            why = g.why_not
            if why is None and not _ratios(g.length):
                why = f"{g.length} channels: no keep ratio in {RATIOS} removes any"
            if why is not None:
                out.append((g.producers[0].name, why))
        return out


class _Base:
    """The base model's width groups and their channel importance (computed on first use, then
    reused by every candidate of the run: the same site always drops the same channels)."""

    def __init__(self, ctx: MoveContext, norm: str):
        from graphopt.ir import import_graph

        self.ctx, self.norm = ctx, norm
        self.an = _Analysis(import_graph(ctx.base_model))
        self.groups = {f"width:{g.producers[0].name}": g for g in self.an.groups() if g.why_not is None}
        self.scores: dict[str, np.ndarray] = {}
        self.prefetch = self._prefetch_names() if ctx.calibration else []

    def length(self, key: str) -> int | None:
        g = self.groups.get(key)
        return None if g is None else g.length

    def score(self, key: str) -> np.ndarray:
        if key not in self.scores:
            g = self.groups[key]
            s = _ls_importance(self.ctx, self.an, g, self.prefetch) if self.norm == "ls" else None
            self.scores[key] = s if s is not None else _importance(self.an, g, "l2" if self.norm == "l2" else "l1")
        return self.scores[key]

    def _prefetch_names(self) -> list[str]:
        spaces = set().union(*(g.spaces for g in self.groups.values())) if self.groups else set()
        samples = next(iter(self.ctx.calibration.values())).shape[0]
        names, budget = [], PREFETCH_BYTES
        for c in self.an.consumers:
            if c.inp.spaces() & spaces:
                for t in (c.node.inputs[0], c.node.outputs[0]):
                    size = 4 * samples * (_static_size(_shape(t)) or 0)
                    if t.name not in names and 0 < size <= budget:
                        names.append(t.name)
                        budget -= size
        return names


IMPORTANCE = ("auto", "l1", "l2", "ls")  # ctx.options["width_importance"], checked at run start (check_options)


def _base_info(ctx: MoveContext) -> _Base:
    """The run's _Base for the importance measure ctx.options["width_importance"]: "l1", "l2", or
    "ls" (data-driven selection; the default when there is calibration data and repair is on)."""
    norm = str(ctx.options.get("width_importance", "auto"))
    if norm == "auto":
        norm = "ls" if ctx.calibration and ctx.options.get("repair", True) else "l1"
    if norm not in ("l1", "l2", "ls"):
        raise ValueError(f"width_importance {norm!r}: use 'l1', 'l2' or 'ls'")
    key = f"width:base:{norm}"
    if key not in ctx.cache:
        ctx.cache[key] = _Base(ctx, norm)
    return ctx.cache[key]
