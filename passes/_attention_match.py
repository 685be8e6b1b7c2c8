"""Attention fusion, part 1: recognising the attention forms (classic, sdpa, qkv, onnx23) and
the projections feeding them; `_match(node) -> _Match | reason`. See passes/attention.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._graph import _const, _input


_BOOL_MASK_FILL = float(np.finfo(np.float32).min)


# ----------------------------------------------------------------------------- small helpers
def _prod(t):
    return t.inputs[0] if t is not None and len(t.inputs) == 1 else None


def _shape(t) -> tuple | None:
    s = getattr(t, "shape", None)
    if s is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in s):
        return None
    return tuple(int(d) for d in s)


def _perm(node) -> tuple[int, ...] | None:
    p = node.attrs.get("perm")
    return tuple(int(x) for x in p) if p is not None else None


def _scalar(t) -> float | None:
    v = _const(t)
    if v is None or v.size != 1 or not np.issubdtype(v.dtype, np.floating):
        return None
    return float(v.reshape(()))


def _ints(t) -> list[int] | None:
    v = _const(t)
    return None if v is None else [int(x) for x in np.asarray(v).ravel()]


def _strip_scale(t, nodes: list) -> tuple[Any, float]:
    """Walk up through Mul/Div by a scalar constant; returns (tensor, product of the factors)."""
    factor = 1.0
    while True:
        p = _prod(t)
        if p is None or p.op not in ("Mul", "Div") or len(p.inputs) != 2:
            return t, factor
        if p.op == "Mul":
            for i in (0, 1):
                s = _scalar(p.inputs[i])
                if s is not None and _const(p.inputs[1 - i]) is None:
                    factor *= s
                    nodes.append(p)
                    t = p.inputs[1 - i]
                    break
            else:
                return t, factor
        else:
            s = _scalar(p.inputs[1])
            if s is None or s == 0.0:
                return t, factor
            factor /= s
            nodes.append(p)
            t = p.inputs[0]


@dataclass
class _Proj:
    """One of Q, K, V: X @ W[:, cols] + b[cols] with W constant, then split into H heads of D."""

    x: Any  # gs tensor, [B, S, hidden]
    w: np.ndarray  # [hidden, H * D]
    b: np.ndarray | None  # [H * D]
    heads: int
    head_dim: int
    nodes: list = field(default_factory=list)


def _linear(y, nodes: list) -> tuple[Any, np.ndarray, np.ndarray | None] | str:
    """y = MatMul(x, W) [+ b]  ->  (x, W, b)."""
    p = _prod(y)
    bias = None
    if p is not None and p.op == "Add" and len(p.inputs) == 2:
        for i in (0, 1):
            c = _const(p.inputs[i])
            q = _prod(p.inputs[1 - i])
            if c is not None and q is not None and q.op == "MatMul":
                bias, nodes_add, p = c, p, q
                nodes.append(nodes_add)
                break
        else:
            return f"projection comes from Add {p.name}, not MatMul + constant bias"
    if p is None or p.op != "MatMul":
        return f"projection is not a MatMul with a constant weight ({p.op + ' ' + p.name if p else 'graph input'})"
    w = _const(_input(p, 1))
    if w is None or w.ndim != 2:
        return f"MatMul {p.name} has no constant 2-D weight"
    if bias is not None:
        bias = np.broadcast_to(bias.reshape(-1) if bias.size == w.shape[1] else bias, (w.shape[1],)).copy() \
            if bias.size in (1, w.shape[1]) else None
        if bias is None:
            return "projection bias does not broadcast over the output features"
    nodes.append(p)
    return p.inputs[0], w, bias


def _heads(t, transposed_k: bool) -> tuple[_Proj, float] | str:
    """Trace a per-head tensor ([B, H, S, D], or K^T [B, H, D, S]) back to its projection."""
    nodes: list = []
    t, factor = _strip_scale(t, nodes)
    p = _prod(t)
    if p is None:
        return "per-head tensor is a graph input or constant"
    if transposed_k:
        if p.op != "Transpose":
            return f"K^T comes from {p.op} {p.name}, not Transpose"
        perm = _perm(p)
        if perm == (0, 2, 3, 1):
            nodes.append(p)
            return _from_reshape(p.inputs[0], nodes, factor)
        if perm == (0, 1, 3, 2):
            nodes.append(p)
            r = _heads(p.inputs[0], False)
            if isinstance(r, str):
                return r
            r[0].nodes[:0] = nodes
            return r[0], r[1] * factor
        return f"K^T Transpose {p.name} has perm {perm}"
    if p.op == "Transpose" and _perm(p) == (0, 2, 1, 3):
        nodes.append(p)
        return _from_reshape(p.inputs[0], nodes, factor)
    if p.op in ("Gather", "Squeeze"):
        return _from_qkv(p, nodes, factor)
    return f"per-head tensor comes from {p.op} {p.name}, not Transpose(0,2,1,3) / Gather / Squeeze"


def _from_reshape(t, nodes: list, factor: float) -> tuple[_Proj, float] | str:
    """t = Reshape(y [B, S, H*D], [B, S, H, D])."""
    r = _prod(t)
    if r is None or r.op != "Reshape":
        return "heads are not split by a Reshape"
    shp, yshp = _shape(t), _shape(r.inputs[0])
    if shp is None or yshp is None or len(shp) != 4 or len(yshp) != 3 or shp[:2] != yshp[:2] \
            or shp[2] * shp[3] != yshp[2]:
        return f"Reshape {r.name} does not split [B, S, H*D] into [B, S, H, D] (shapes {yshp} -> {shp})"
    nodes.append(r)
    lin = _linear(r.inputs[0], nodes)
    if isinstance(lin, str):
        return lin
    x, w, b = lin
    if w.shape[1] != yshp[2]:
        return f"projection weight has {w.shape[1]} columns, heads need {yshp[2]}"
    return _Proj(x, w, b, shp[2], shp[3], nodes), factor


def _from_qkv(p, nodes: list, factor: float) -> tuple[_Proj, float] | str:
    """Gather(T5, i, axis 0) or Squeeze(Slice(T5, i:i+1, axis 0), 0) with
    T5 = Transpose(2, 0, 3, 1, 4)(Reshape(qkv [B, S, 3*H*D], [B, S, 3, H, D]))."""
    if p.op == "Gather":
        idx = _ints(_input(p, 1))
        if int(p.attrs.get("axis", 0)) != 0 or idx is None or len(idx) != 1 or np.asarray(_const(p.inputs[1])).ndim:
            return f"Gather {p.name} is not a scalar index on axis 0"
        i, src = idx[0], p.inputs[0]
        nodes.append(p)
    else:  # Squeeze(Slice)
        axes = _ints(_input(p, 1)) if len(p.inputs) > 1 else p.attrs.get("axes")
        if axes is None or list(axes) != [0]:
            return f"Squeeze {p.name} does not squeeze axis 0"
        s = _prod(p.inputs[0])
        if s is None or s.op != "Slice":
            return f"Squeeze {p.name} does not read a Slice"
        starts, ends = _ints(_input(s, 1)), _ints(_input(s, 2))
        axes_s = _ints(_input(s, 3)) if _input(s, 3) is not None else [0]
        steps = _ints(_input(s, 4)) if _input(s, 4) is not None else [1]
        if not starts or not ends or axes_s != [0] or steps != [1] or ends[0] - starts[0] != 1:
            return f"Slice {s.name} does not take one index on axis 0"
        i, src = starts[0], s.inputs[0]
        nodes += [p, s]
    t5 = _prod(src)
    if t5 is None or t5.op != "Transpose" or _perm(t5) != (2, 0, 3, 1, 4):
        return "qkv split does not read Transpose(2, 0, 3, 1, 4)"
    r = _prod(t5.inputs[0])
    shp = _shape(t5.inputs[0])
    yshp = _shape(r.inputs[0]) if r is not None and r.op == "Reshape" else None
    if yshp is None or shp is None or len(shp) != 5 or shp[2] != 3 or len(yshp) != 3 or shp[:2] != yshp[:2] \
            or 3 * shp[3] * shp[4] != yshp[2]:
        return "qkv is not Reshape([B, S, 3*H*D] -> [B, S, 3, H, D])"
    if i < 0:
        i += 3
    if not 0 <= i < 3:
        return f"qkv index {i} out of range"
    nodes += [t5, r]
    lin = _linear(r.inputs[0], nodes)
    if isinstance(lin, str):
        return lin
    x, w, b = lin
    hd = shp[3] * shp[4]
    cols = slice(i * hd, (i + 1) * hd)
    return _Proj(x, w[:, cols], None if b is None else b[cols], shp[3], shp[4], nodes), factor


# ------------------------------------------------------------------------------ the match
@dataclass
class _Match:
    form: str  # classic | sdpa | qkv | onnx23
    q: _Proj
    k: _Proj
    v: _Proj
    scale: float  # total factor on Q.K^T
    mask: Any  # gs tensor or None
    mask_is_bool: bool
    context: Any  # [B, H, S, D] tensor (output of MatMul(P, V) or of the opset-23 Attention)
    out: Any  # the [B, S, H*D] tensor the block writes
    out_node: Any  # the Reshape writing it
    anchor: Any  # Softmax or Attention node
    core: list  # nodes from the scores MatMul to the output Reshape

    @property
    def heads(self) -> int:
        return self.q.heads

    @property
    def head_dim(self) -> int:
        return self.q.head_dim

    @property
    def node_names(self) -> tuple[str, ...]:
        seen, out = set(), []
        for n in self.core + self.q.nodes + self.k.nodes + self.v.nodes:
            if n.name not in seen:
                seen.add(n.name)
                out.append(n.name)
        return tuple(out)


def _tail(ctx_t, core: list) -> tuple[Any, Any] | str:
    """context [B, H, S, D] -> [optional no-op Reshape] -> Transpose(0,2,1,3) -> Reshape [B, S, H*D]."""
    cshape = _shape(ctx_t)
    t = ctx_t
    if len(t.outputs) != 1:
        return "attention context has more than one consumer"
    n = t.outputs[0]
    if n.op == "Reshape" and _shape(n.outputs[0]) == cshape:
        core.append(n)
        t = n.outputs[0]
        if len(t.outputs) != 1:
            return "attention context has more than one consumer"
        n = t.outputs[0]
    if n.op != "Transpose" or _perm(n) != (0, 2, 1, 3):
        return f"attention context goes to {n.op} {n.name}, not Transpose(0,2,1,3)"
    core.append(n)
    t = n.outputs[0]
    if len(t.outputs) != 1 or t.outputs[0].op != "Reshape":
        return "heads are not merged by one Reshape"
    r = t.outputs[0]
    s, o = _shape(t), _shape(r.outputs[0])
    if s is None or o is None or len(o) != 3 or o != (s[0], s[1], s[2] * s[3]):
        return f"Reshape {r.name} does not merge heads into [B, S, H*D] ({s} -> {o})"
    core.append(r)
    return r.outputs[0], r


def _finish(form, q, k, v, scale, mask, mask_is_bool, ctx_t, anchor, core) -> _Match | str:
    (qp, qf), (kp, kf), (vp, vf) = q, k, v
    if vf != 1.0:
        return "V is scaled (only Q and K may carry the attention scale)"
    if not (qp.x is kp.x is vp.x):
        return "Q, K and V read different inputs (cross-attention is not fused)"
    xs = _shape(qp.x)
    if xs is None or len(xs) != 3:
        return "attention input is not [B, S, hidden] with a static shape"
    if not (qp.heads == kp.heads == vp.heads and qp.head_dim == kp.head_dim == vp.head_dim):
        return "Q, K, V head counts or head sizes differ"
    tail = _tail(ctx_t, core)
    if isinstance(tail, str):
        return tail
    out, out_node = tail
    return _Match(form, qp, kp, vp, scale * qf * kf, mask, mask_is_bool, ctx_t, out, out_node, anchor, core)


def _match_softmax(sm) -> _Match | str:
    axis = int(sm.attrs.get("axis", -1))
    sshape = _shape(sm.outputs[0])
    if sshape is None or len(sshape) != 4:
        return "Softmax input is not a static 4-D [B, H, S, T] tensor"
    if axis not in (-1, 3):
        return f"Softmax axis is {axis}, not the last"
    core = [sm]
    # after: optional Where(IsNaN(P), 0, P), then MatMul(P, V)
    p_t = sm.outputs[0]
    users = list(p_t.outputs)
    form = "classic"
    if len(users) == 2 and {u.op for u in users} == {"IsNaN", "Where"}:
        isnan = next(u for u in users if u.op == "IsNaN")
        where = next(u for u in users if u.op == "Where")
        if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not p_t or _scalar(where.inputs[1]) != 0.0:
            return "Softmax is followed by IsNaN/Where that is not Where(IsNaN(P), 0, P)"
        core += [isnan, where]
        p_t, users, form = where.outputs[0], list(where.outputs[0].outputs), "sdpa"
    if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not p_t:
        return "Softmax output does not feed exactly one MatMul(P, V)"
    pv = users[0]
    core.append(pv)
    # before: [Add(mask)] <- [Mul/Div scale]* <- MatMul(Q, K^T)
    t = sm.inputs[0]
    mask = None
    p = _prod(t)
    if p is not None and p.op == "Add":
        for i in (0, 1):
            a = _prod(p.inputs[i])
            if a is not None and a.op in ("MatMul", "Mul", "Div") and _shape(p.inputs[i]) == sshape:
                mask, t = p.inputs[1 - i], p.inputs[i]
                core.append(p)
                break
        else:
            return f"Add {p.name} before the Softmax has no [B, H, S, T] scores operand"
    pre: list = []
    t, scale = _strip_scale(t, pre)
    core += pre
    mm = _prod(t)
    if mm is None or mm.op != "MatMul":
        return "Softmax does not read MatMul(Q, K^T) (through scale and mask)"
    core.append(mm)
    q = _heads(mm.inputs[0], False)
    if isinstance(q, str):
        return "Q: " + q
    k = _heads(mm.inputs[1], True)
    if isinstance(k, str):
        return "K: " + k
    v = _heads(pv.inputs[1], False)
    if isinstance(v, str):
        return "V: " + v
    if q[0].nodes and any(n.op in ("Gather", "Squeeze") for n in q[0].nodes):
        form = "qkv"
    return _finish(form, q, k, v, 1.0 * scale, mask, False, pv.outputs[0], sm, core)


def _match_onnx23(node) -> _Match | str:
    if (node.domain or "") not in ("", "ai.onnx"):
        return f"Attention {node.name} is in domain {node.domain!r}, not the ONNX opset-23 op"
    if int(node.attrs.get("is_causal", 0)) or float(node.attrs.get("softcap", 0.0)):
        return "Attention is causal or soft-capped"
    if len([i for i in node.inputs if i.name]) > 4 or any(o.name and (o.outputs) for o in node.outputs[1:]):
        return "Attention uses past key/value or extra outputs"
    q, k, v = (_input(node, i) for i in range(3))
    if q is None or k is None or v is None or _shape(q) is None or len(_shape(q)) != 4:
        return "Attention Q/K/V are not static 4-D [B, H, S, D] tensors"
    qq, kk, vv = _heads(q, False), _heads(k, False), _heads(v, False)
    for nm, r in (("Q", qq), ("K", kk), ("V", vv)):
        if isinstance(r, str):
            return f"{nm}: {r}"
    d = qq[0].head_dim
    scale = float(node.attrs.get("scale", 1.0 / math.sqrt(d)))
    mask = _input(node, 3)
    is_bool = False
    if mask is not None:
        dt = getattr(mask, "dtype", None)
        is_bool = dt is not None and np.dtype(dt) == np.bool_
    return _finish("onnx23", qq, kk, vv, scale, mask, is_bool, node.outputs[0], node, [node])


def _match(node) -> _Match | str:
    if node.op == "Softmax":
        return _match_softmax(node)
    return _match_onnx23(node)


def _candidates(graph):
    return [n for n in graph.nodes if n.op == "Softmax" or (n.op == "Attention" and (n.domain or "") in ("", "ai.onnx"))]


def _out_proj(m: _Match):
    """The constant-weight MatMul reading the block output (for pruning), or a reason."""
    users = list(m.out.outputs)
    if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] is not m.out:
        return "block output does not feed exactly one MatMul (output projection)"
    w = _const(_input(users[0], 1))
    if w is None or w.ndim != 2 or w.shape[0] != m.heads * m.head_dim:
        return "output projection has no constant [H*D, hidden] weight"
    return users[0]


def _mask_heads(m: _Match) -> int | None:
    """The mask's head dimension (1 when it has fewer than 3 dims); None when unknown."""
    if m.mask is None:
        return 1
    ms = _shape(m.mask)
    if ms is None:
        return None
    return ms[-3] if len(ms) >= 3 else 1


def _can_prune(m: _Match) -> bool:
    return not isinstance(_out_proj(m), str) and _mask_heads(m) in (1, m.heads)


def _prune_counts(heads: int) -> list[int]:
    return sorted({k for k in (1, 2, heads // 4, heads // 2) if 0 < k < heads})
