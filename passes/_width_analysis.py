"""Width pruning, part 2: `_Analysis`, the walk that gives every tensor a channel layout and joins
coupled channel spaces (networkx) into prunable groups. See passes/width.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._graph import _const, _input, _present, _static_size
from ._width_layout import (BINARY, NORMS, POOLS, RESHAPES, UNARY, _Action, _Consumer, _Group, _is_graph, _Layout,
                            _shape, _topo)

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs


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
