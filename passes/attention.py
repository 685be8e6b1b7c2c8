"""Fuse scaled dot-product attention blocks into one com.microsoft.Attention op; prune heads; cheaper
block-local (windowed) and linear attention forms.

Recognised forms (each a self-attention block whose Q, K and V are constant-weight projections
of one input X [B, S, hidden]):

  classic   MatMul(Q, K^T) -> Mul/Div(scale) -> Add(mask) -> Softmax -> MatMul(., V)
            (transformers' eager path, torch.onnx dynamo=False)
  sdpa      the scale split as Mul(sqrt(scale)) on Q and on K^T, and Where(IsNaN(P), 0, P) after
            the Softmax (transformers' sdpa path)
  qkv       one fused qkv projection, Reshape [B, S, 3, H, D] -> Transpose(2, 0, 3, 1, 4) ->
            Gather / Slice+Squeeze per Q, K, V (SVTR / ViT style)
  onnx23    the ONNX opset-23 `Attention` op on 4-D Q, K, V (torch.onnx dynamo=True, opset 23)

Per head Q/V are Transpose(0, 2, 1, 3)(Reshape(proj, [B, S, H, D])); K^T is Transpose(0, 2, 3, 1)
of the same, or Transpose(0, 1, 3, 2) of a per-head K. After the attention, Transpose(0, 2, 1, 3)
and Reshape back to [B, S, H * D] end the block; the tensor that Reshape writes is replaced.

Choices per site:
  "fused"    exact. One com.microsoft.Attention node: packed weights [hidden, 3 * H * D] and bias,
             the mask (additive float, or a bool mask turned into 0 / float32-min) as its
             `attention_bias` input (broadcast to [., ., S, T] with an Expand when needed). The
             scale is folded into the Q weights when it is not the default 1/sqrt(D), because
             TVM's importer rejects the `scale` attribute. A mask that calibration data shows
             to be a padding mask of a [B, T] graph input (see padding_masks) is passed instead
             as `mask_index` (that input cast to int32), the form onnxruntime's QAttention
             keeps when int8 dynamic quantization quantizes the fused op.
             com.microsoft.Attention is the one
             contrib attention op that both onnxruntime and TVM 0.27 import
             (TVM -> R.nn.attention); MultiHeadAttention and the opset-23 op fail in TVM.
  "prune_k"  approximate: the fused op with the k least important heads removed, and the rows
             of the output projection (a constant-weight MatMul right after the block, required)
             that read them. Head importance = mean L2 norm, over the calibration samples and
             positions, of the head's contribution to the output projection
             (context_h @ W_o[h rows]); computed once per run with onnxruntime on the base model.
             Fidelity is measured by the driver (uses_calibration: held-out half).

  "window_W" approximate, a cheaper form for long sequences: block-local attention. The sequence is
             cut into S/W blocks of W tokens and each query attends only to the keys of its own
             block (scores [B, H, S/W, W, W] instead of [B, H, S, S]: the two attention matmuls
             and the softmax cost W/S of the original). Plain ONNX ops (one packed qkv MatMul,
             Reshape/Transpose, MatMul, Softmax), so every target compiles it. Offered for
             W = S/2, S/4, S/8 (W >= 4, S % W == 0) when there is no mask or the mask does not
             depend on the query: a key-padding mask [., ., 1, T], or a [., ., S, T] mask that
             calibration data shows to be a padding mask (see padding_masks; the bias is then
             rebuilt from that [B, T] input, else the move does not apply); clamped at -1e4
             (onnxruntime's mask_filter_value) so a block whose keys are all masked gives finite
             rows (attention within the block) instead of NaN.
             Exact for a query whose unmasked keys all lie in its own block (a padded sentence
             no longer than W tokens); otherwise its fidelity is measured like any other choice.
  "linear"   approximate: linear attention, softmax(QK^T)V replaced by
             phi(Q) (phi(K)^T V) / (phi(Q) sum_t phi(K_t)) with phi = elu + 1 (Katharopoulos et al.
             2020), masked keys zeroed in phi(K). Cost O(S D^2) instead of O(S^2 D). Without
             retraining the pretrained weights it is a different function; it is offered so
             the search measures that, not assumed (see the README for what it measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.genotype import Choice, Site
from graphopt.ir import node_by_name
from graphopt.plugin import MoveContext, Pass

from ._graph import _const, _fresh_name, _input

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

_MAX_IMPORTANCE_SAMPLES = 16
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


# ----------------------------------------------------------------------------------- rewrite
def _mask_index(graph: gs.Graph, source: str):
    """The int32 [B, T] copy of the padding-mask graph input `source` (one Cast per graph)."""
    import onnx_graphsurgeon as gs

    name = f"{source}_mask_index_i32"
    tensors = graph.tensors(check_duplicates=False)
    if name in tensors:
        return tensors[name]
    src = next(t for t in graph.inputs if t.name == source)
    out = gs.Variable(name, dtype=np.int32, shape=list(src.shape) if src.shape is not None else None)
    graph.nodes.append(gs.Node("Cast", f"{source}/to_mask_index", attrs={"to": 6}, inputs=[src], outputs=[out]))
    return out


def _rewrite(graph: gs.Graph, m: _Match, keep_heads: list[int] | None = None,
             mask_source: str | None = None) -> None:
    import onnx_graphsurgeon as gs

    h, d = m.heads, m.head_dim
    heads = list(range(h)) if keep_heads is None else sorted(keep_heads)
    cols = np.concatenate([np.arange(i * d, (i + 1) * d) for i in heads])
    dtype = m.q.w.dtype
    fold = m.scale * math.sqrt(d)  # com.microsoft.Attention applies 1/sqrt(D) itself
    ws, bs = [], []
    for proj, f in ((m.q, fold), (m.k, 1.0), (m.v, 1.0)):
        w = proj.w.astype(np.float64)[:, cols]
        b = proj.b.astype(np.float64)[cols] if proj.b is not None else np.zeros(len(cols))
        if f != 1.0:
            w, b = w * f, b * f
        ws.append(w)
        bs.append(b)
    taken = set(graph.tensors(check_duplicates=False).keys())
    names = {n.name for n in graph.nodes}
    base = (m.anchor.name.strip("/").replace("/", "_") or "attn") + "_fused"
    w_c = gs.Constant(_fresh_name(taken, base + "_qkv_weight"), np.ascontiguousarray(np.concatenate(ws, 1).astype(dtype)))
    b_c = gs.Constant(_fresh_name(taken, base + "_qkv_bias"), np.ascontiguousarray(np.concatenate(bs).astype(dtype)))
    inputs = [m.q.x, w_c, b_c]
    if m.mask is not None and mask_source is not None:
        inputs.append(_mask_index(graph, mask_source))  # mask_index [B, T]: 1 keep, 0 padding
    elif m.mask is not None:
        bias = m.mask
        s, t = _shape(m.q.x)[1], _shape(m.k.x)[1]
        if m.mask_is_bool:
            fb = gs.Variable(_fresh_name(taken, base + "_mask_bias"), dtype=dtype)
            graph.nodes.append(gs.Node("Where", _fresh_name(names, base + "/mask_to_bias"), inputs=[
                bias, gs.Constant(_fresh_name(taken, base + "_zero"), np.zeros((), dtype)),
                gs.Constant(_fresh_name(taken, base + "_fill"), np.full((), _BOOL_MASK_FILL, dtype))], outputs=[fb]))
            bias = fb
        ms = _shape(bias)
        if ms is None or len(ms) != 4 or ms[2:] != (s, t) or ms[1] not in (1, h):
            ex = gs.Variable(_fresh_name(taken, base + "_mask_4d"), dtype=dtype)
            graph.nodes.append(gs.Node("Expand", _fresh_name(names, base + "/mask_expand"), inputs=[
                bias, gs.Constant(_fresh_name(taken, base + "_mask_shape"), np.array([1, 1, s, t], np.int64))],
                outputs=[ex]))
            bias = ex
        if keep_heads is not None and _mask_heads(m) == h:  # a per-head mask keeps the kept heads
            sel = gs.Variable(_fresh_name(taken, base + "_mask_heads"), dtype=dtype)
            graph.nodes.append(gs.Node("Gather", _fresh_name(names, base + "/mask_heads"), attrs={"axis": 1},
                                       inputs=[bias, gs.Constant(_fresh_name(taken, base + "_kept"),
                                                                 np.array(heads, np.int64))], outputs=[sel]))
            bias = sel
        inputs += [gs.Variable.empty(), gs.Variable.empty(), bias]
    node = gs.Node("Attention", _fresh_name(names, base), domain="com.microsoft",
                   attrs={"num_heads": len(heads)}, inputs=inputs)
    graph.nodes.append(node)
    if keep_heads is None:
        out = m.out
        m.out_node.outputs.clear()
        node.outputs = [out]
    else:
        op = _out_proj(m)
        sh = _shape(m.out)
        out = gs.Variable(_fresh_name(taken, base + "_pruned_out"), dtype=dtype, shape=[sh[0], sh[1], len(cols)])
        node.outputs = [out]
        wo = _const(op.inputs[1])
        op.inputs[0] = out
        op.inputs[1] = gs.Constant(_fresh_name(taken, base + "_out_weight"), np.ascontiguousarray(wo[cols]))


def _local_ok(m: _Match) -> bool:
    """Whether window/linear forms are offered: no mask, a key-padding mask [., ., 1, T], or a
    full [., ., S, T] mask that may be a padding mask (checked on calibration data when applied)."""
    if m.mask is None or (not m.mask_is_bool and _query_free_mask(m) is not None):
        return True
    ms = _shape(m.mask)
    return ms is not None and len(ms) == 4 and ms[2:] == (_shape(m.q.x)[1], _shape(m.k.x)[1])


def _window_sizes(m: _Match) -> list[int]:
    """Block sizes offered for window_W: S/2, S/4, S/8 (>= 4, dividing S)."""
    s = _shape(m.q.x)[1]
    if not _local_ok(m):
        return []
    return sorted({s // f for f in (2, 4, 8) if s % f == 0 and s // f >= 4})


def _query_free_mask(m: _Match) -> tuple[int, int] | None:
    """(batch, heads) of a key-padding mask that broadcasts as [b, h, 1, T]; None otherwise."""
    ms = _shape(m.mask)
    t = _shape(m.k.x)[1]
    if ms is None or len(ms) > 4 or not ms or ms[-1] != t:
        return None
    ms = (1,) * (4 - len(ms)) + ms
    if ms[2] != 1 or ms[1] not in (1, m.heads) or ms[0] not in (1, _shape(m.q.x)[0]):
        return None
    return ms[0], ms[1]


class _Builder:
    """Appends nodes to a graph under fresh names derived from one base."""

    def __init__(self, graph, base: str, dtype):
        self.graph, self.base, self.dtype = graph, base, dtype
        self.taken = set(graph.tensors(check_duplicates=False).keys())
        self.names = {n.name for n in graph.nodes}

    def const(self, tag: str, value) -> Any:
        import onnx_graphsurgeon as gs

        return gs.Constant(_fresh_name(self.taken, f"{self.base}_{tag}"), np.array(value, copy=True))  # keeps 0-d

    def op(self, op: str, inputs: list, tag: str, out=None, dtype=None, **attrs) -> Any:
        import onnx_graphsurgeon as gs

        if out is None:
            out = gs.Variable(_fresh_name(self.taken, f"{self.base}_{tag}"), dtype=dtype or self.dtype)
        self.graph.nodes.append(gs.Node(op, _fresh_name(self.names, f"{self.base}/{tag}"), attrs=attrs,
                                        inputs=inputs, outputs=[out]))
        return out


def _packed_qkv(m: _Match) -> tuple[np.ndarray, np.ndarray]:
    """[hidden, 3*H*D] weight and [3*H*D] bias of Q | K | V, the total score scale folded into Q."""
    ws, bs = [], []
    for proj, f in ((m.q, m.scale), (m.k, 1.0), (m.v, 1.0)):
        w = proj.w.astype(np.float64)
        b = proj.b.astype(np.float64) if proj.b is not None else np.zeros(w.shape[1])
        ws.append(w * f)
        bs.append(b * f)
    dtype = m.q.w.dtype
    return np.concatenate(ws, 1).astype(dtype), np.concatenate(bs).astype(dtype)


def _rewrite_local(graph: gs.Graph, m: _Match, form: str, window: int = 0, mask_source: str | None = None) -> None:
    """Replace the block by block-local (form "window", blocks of `window` tokens) or linear
    attention built from plain ONNX ops; the tensor the block wrote keeps its name. The mask is
    the block's own when it is a key-padding mask [., ., 1, T]; a full [., ., S, T] mask must be
    a verified padding mask of graph input `mask_source` [B, T], rebuilt as (1 - input) * -1e4."""
    bsz, s, hid = _shape(m.q.x)
    h, d = m.heads, m.head_dim
    dtype = m.q.w.dtype
    g = _Builder(graph, (m.anchor.name.strip("/").replace("/", "_") or "attn") + f"_{form}", dtype)
    w, b = _packed_qkv(m)
    qkv = g.op("Add", [g.op("MatMul", [m.q.x, g.const("qkv_weight", w)], "qkv_mm"), g.const("qkv_bias", b)], "qkv")
    mask = None
    if m.mask is not None and mask_source is not None:
        src = next(t for t in graph.inputs if t.name == mask_source)
        mb, mh = int(src.shape[0]), 1
        keep = g.op("Cast", [src], "keep_f", to=int(_onnx_dtype(dtype)))
        pad = g.op("Sub", [g.const("one_m", np.ones((), dtype)), keep], "padding")
        mask = g.op("Mul", [pad, g.const("fill", np.full((), -1e4, dtype))], "padding_bias")
        mask = g.op("Reshape", [mask, g.const("mask_shape", np.array([mb, mh, 1, s], np.int64))], "mask_4d")
    elif m.mask is not None:
        mb, mh = _query_free_mask(m)
        mask = g.op("Reshape", [m.mask, g.const("mask_shape", np.array([mb, mh, 1, s], np.int64))], "mask_4d")
        mask = g.op("Max", [mask, g.const("mask_floor", np.full((), -1e4, dtype))], "mask_clamped")
    if form == "window":
        n = s // window
        t = g.op("Reshape", [qkv, g.const("qkv_shape", np.array([bsz, n, window, 3, h, d], np.int64))], "qkv_blocks")
        t = g.op("Transpose", [t], "qkv_heads", perm=[3, 0, 4, 1, 2, 5])  # [3, B, H, n, W, D]
        q, k, v = (g.op("Gather", [t, g.const(f"pick{i}", np.array(i, np.int64))], f"{'qkv'[i]}", axis=0)
                   for i in range(3))
        sc = g.op("MatMul", [q, g.op("Transpose", [k], "k_t", perm=[0, 1, 2, 4, 3])], "scores")  # [B,H,n,W,W]
        if mask is not None:
            mask = g.op("Reshape", [mask, g.const("mask_blocks", np.array([mb, mh, n, 1, window], np.int64))],
                        "mask_blocks")
            sc = g.op("Add", [sc, mask], "masked")
        ctx = g.op("MatMul", [g.op("Softmax", [sc], "softmax", axis=-1), v], "context")  # [B, H, n, W, D]
        ctx = g.op("Transpose", [ctx], "context_t", perm=[0, 2, 3, 1, 4])  # [B, n, W, H, D]
    else:  # linear
        t = g.op("Reshape", [qkv, g.const("qkv_shape", np.array([bsz, s, 3, h, d], np.int64))], "qkv_heads_rs")
        t = g.op("Transpose", [t], "qkv_heads", perm=[2, 0, 3, 1, 4])  # [3, B, H, S, D]
        q, k, v = (g.op("Gather", [t, g.const(f"pick{i}", np.array(i, np.int64))], f"{'qkv'[i]}", axis=0)
                   for i in range(3))
        one = g.const("one", np.ones((), dtype))
        fq = g.op("Add", [g.op("Elu", [q], "elu_q"), one], "phi_q")
        fk = g.op("Add", [g.op("Elu", [k], "elu_k"), one], "phi_k")  # [B, H, S, D]
        if mask is not None:  # keep = 1 where the additive mask is > -1 (unmasked key)
            keep = g.op("Cast", [g.op("Greater", [mask, g.const("keep_floor", np.full((), -1.0, dtype))],
                                      "key_kept", dtype=np.bool_)], "keep", to=int(_onnx_dtype(dtype)))
            keep = g.op("Transpose", [keep], "keep_t", perm=[0, 1, 3, 2])  # [b, h, T, 1]
            fk = g.op("Mul", [fk, keep], "phi_k_masked")
        fkt = g.op("Transpose", [fk], "phi_k_t", perm=[0, 1, 3, 2])  # [B, H, D, S]
        kv = g.op("MatMul", [fkt, v], "kv")  # [B, H, D, D]
        num = g.op("MatMul", [fq, kv], "numerator")  # [B, H, S, D]
        ksum = g.op("ReduceSum", [fkt, g.const("axis_s", np.array([3], np.int64))], "k_sum", keepdims=1)
        den = g.op("MatMul", [fq, ksum], "denominator")  # [B, H, S, 1]
        den = g.op("Max", [den, g.const("den_floor", np.full((), 1e-6, dtype))], "denominator_safe")
        ctx = g.op("Transpose", [g.op("Div", [num, den], "context")], "context_t", perm=[0, 2, 1, 3])
    out = m.out
    m.out_node.outputs.clear()
    g.op("Reshape", [ctx, g.const("out_shape", np.array([bsz, s, h * d], np.int64))], "merge_heads", out=out)


def _onnx_dtype(dtype) -> int:
    import onnx

    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# -------------------------------------------------------------------------------- importance
def _importance(ctx: MoveContext, site: Site) -> np.ndarray:
    """Per-head importance of every site, from one onnxruntime run of the base model."""
    cache = ctx.cache.setdefault("attention_importance", {})
    if site.key in cache:
        return cache[site.key]
    import onnx
    import onnxruntime as ort

    from graphopt.errors import DataError
    from graphopt.ir import import_graph

    if not ctx.calibration:
        raise DataError("attention prune: head importance needs calibration data; pass --data samples.npz")
    base = import_graph(ctx.base_model)
    matches = {}
    for n in _candidates(base):
        mm = _match(n)
        if isinstance(mm, _Match) and _can_prune(mm):
            matches[f"attention:{n.name}"] = mm
    model = onnx.ModelProto()
    model.CopyFrom(ctx.base_model)
    have = {o.name for o in model.graph.output}
    for mm in matches.values():
        if mm.context.name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(mm.context.name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [mm.context.name for mm in matches.values()]
    feeds = {i.name for i in sess.get_inputs()}
    n = min(_MAX_IMPORTANCE_SAMPLES, next(iter(ctx.calibration.values())).shape[0])
    sums = {k: np.zeros(mm.heads) for k, mm in matches.items()}
    for i in range(n):
        outs = sess.run(names, {k: v[i] for k, v in ctx.calibration.items() if k in feeds})
        for (key, mm), c in zip(matches.items(), outs):
            wo = _const(_out_proj(mm).inputs[1]).astype(np.float64)  # [H*D, hidden]
            c = c.astype(np.float64)  # [B, H, S, D]
            for hh in range(mm.heads):
                contrib = c[:, hh] @ wo[hh * mm.head_dim:(hh + 1) * mm.head_dim]  # [B, S, hidden]
                sums[key][hh] += float(np.linalg.norm(contrib, axis=-1).mean())
    for key, total in sums.items():
        cache[key] = total / max(n, 1)
    if site.key not in cache:
        raise ValueError(f"attention: no head importance for site {site.key}")
    return cache[site.key]


def _ancestor_inputs(graph: gs.Graph, t) -> set[str]:
    """Names of the graph inputs that tensor `t` depends on."""
    inputs = {x.name for x in graph.inputs}
    seen, stack, found = set(), [t], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if x.name in inputs:
            found.add(x.name)
        for p in x.inputs:  # producer nodes
            stack.extend(p.inputs)
    return found


def padding_masks(ctx: MoveContext) -> dict[str, str]:
    """Mask tensors of the base model's attention blocks that are padding masks: tensor name ->
    the rank-2 integer/bool graph input [B, T] they are computed from.

    A mask qualifies when (a) the only graph input it depends on is that [B, T] input, and (b) on
    every calibration sample (up to 16) the mask, broadcast to [B, ., S, T], is exactly 0 where
    the input is non-zero and <= -1e4 where it is zero, for every query row (a bool mask: True
    and False); and at least one
    zero was seen. Such a mask can be passed as com.microsoft.Attention's `mask_index` (ORT adds
    mask_filter_value -1e4 at zeros; after the softmax that is the same 0 weight as -3.4e38),
    which onnxruntime's quantizer keeps when it turns Attention into QAttention (it drops an
    `attention_bias` input, so quantized attention would attend to padding). Cached per run.
    """
    if "attention_padding_masks" in ctx.cache:
        return ctx.cache["attention_padding_masks"]
    out: dict[str, str] = {}
    ctx.cache["attention_padding_masks"] = out
    if not ctx.calibration or ctx.base_model is None:
        return out
    import onnx
    import onnxruntime as ort

    from graphopt.ir import import_graph

    base = import_graph(ctx.base_model)
    masks, mask_dtypes = {}, {}
    for n in _candidates(base):
        mm = _match(n)
        if isinstance(mm, _Match) and mm.mask is not None and mm.mask.name:
            ms = _shape(mm.mask)
            srcs = _ancestor_inputs(base, mm.mask)
            if ms is None or len(srcs) != 1:
                continue
            src = next(x for x in base.inputs if x.name in srcs)
            ss = src.shape
            if (ss is None or len(ss) != 2 or ss[1] != ms[-1] or src.dtype is None
                    or not (np.issubdtype(np.dtype(src.dtype), np.integer) or np.dtype(src.dtype) == np.bool_)):
                continue
            if mm.mask.dtype is None:
                continue
            masks[mm.mask.name] = src.name
            mask_dtypes[mm.mask.name] = mm.mask.dtype
    if not masks:
        return out
    model = onnx.ModelProto()
    model.CopyFrom(ctx.base_model)
    have = {o.name for o in model.graph.output}
    names = sorted(masks)
    for nm in names:
        if nm not in have:
            dt = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(mask_dtypes[nm]))
            model.graph.output.append(onnx.helper.make_tensor_value_info(nm, dt, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - an unverifiable mask keeps the exact bias form
        return out
    feeds = {i.name for i in sess.get_inputs()}
    if not feeds <= set(ctx.calibration):
        return out
    n = min(_MAX_IMPORTANCE_SAMPLES, next(iter(ctx.calibration.values())).shape[0])
    ok = {nm: True for nm in names}
    zeros = {nm: False for nm in names}
    for i in range(n):
        feed = {k: ctx.calibration[k][i] for k in feeds}
        for nm, val in zip(names, sess.run(names, feed)):
            keep = np.asarray(feed[masks[nm]]) != 0  # [B, T]
            is_bool = np.asarray(val).dtype == np.bool_  # bool masks: True = attend
            v = np.asarray(val, dtype=np.float64)
            if v.ndim > 4:
                ok[nm] = False
                continue
            v = v.reshape((1,) * (4 - v.ndim) + v.shape)
            try:
                v = np.broadcast_to(v, (keep.shape[0],) + v.shape[1:3] + (keep.shape[1],))
            except ValueError:
                ok[nm] = False
                continue
            kb = np.broadcast_to(keep[:, None, None, :], v.shape)
            zeros[nm] |= bool((~keep).any())
            if is_bool:
                ok[nm] &= bool(np.all(v[kb] == 1.0) and np.all(v[~kb] == 0.0))
            else:
                ok[nm] &= bool(np.all(v[kb] == 0.0) and np.all(v[~kb] <= -1e4))
    out.update({nm: masks[nm] for nm in names if ok[nm] and zeros[nm]})
    return out


# ------------------------------------------------------------------------------------- the pass
class AttentionFusion(Pass):
    name = "attention"
    description = ("fuse attention blocks into com.microsoft.Attention (exact); prune least important heads; "
                   "block-local (window_W) or linear attention")
    fidelity = "fusion exact; head pruning, windowed and linear attention approximate (calibrated)"
    OPTIONS = ()  # reads no pass options
    stage = 20
    uses_calibration = True  # prune_k ranks heads on calibration data

    def sites(self, graph: gs.Graph) -> list[Site]:
        out = []
        for n in _candidates(graph):
            m = _match(n)
            if isinstance(m, str):
                continue
            choices: tuple = ("keep", "fused")
            if _can_prune(m):
                choices += tuple(f"prune_{k}" for k in _prune_counts(m.heads))
            choices += tuple(f"window_{w}" for w in _window_sizes(m))
            if _local_ok(m):
                choices += ("linear",)
            s, hid = _shape(m.q.x)[1], m.heads * m.head_dim
            cost = 2.0 * _shape(m.q.x)[0] * (2 * s * s * hid + 3 * s * _shape(m.q.x)[2] * hid)
            out.append(Site(key=f"attention:{n.name}", pass_name=self.name, nodes=(n.name,) + tuple(
                x for x in m.node_names if x != n.name), choices=choices, exact_choice="fused", cost=cost,
                note=f"{m.form} attention, {m.heads} heads x {m.head_dim}, seq {s}"
                     + (", masked" if m.mask is not None else "")))
        return out

    def apply(self, graph: gs.Graph, site: Site, choice: Choice, ctx: MoveContext) -> bool:
        if choice not in ("fused", "linear") and not (
                isinstance(choice, str) and choice.startswith(("prune_", "window_"))):
            raise ValueError(f"attention: unknown choice {choice!r} for site {site.key}")
        anchor = node_by_name(graph, site.nodes[0])
        if anchor is None:
            return False
        m = _match(anchor)
        if isinstance(m, str):
            return False
        src = padding_masks(ctx).get(m.mask.name) if m.mask is not None else None
        if choice == "linear" or str(choice).startswith("window_"):
            w = int(str(choice).split("_", 1)[1]) if choice != "linear" else 0
            if (w and w not in _window_sizes(m)) or not _local_ok(m):
                return False
            if m.mask is not None and src is None and (m.mask_is_bool or _query_free_mask(m) is None):
                return False  # a query-dependent mask (causal, per-pair) has no block-local form here
            _rewrite_local(graph, m, "window" if w else "linear", w, mask_source=src)
            return True
        if choice == "fused":
            _rewrite(graph, m, mask_source=src)
            return True
        k = int(str(choice).split("_", 1)[1])
        if not 0 < k < m.heads or not _can_prune(m):
            return False
        imp = _importance(ctx, site)
        keep = sorted(np.argsort(-imp, kind="stable")[: m.heads - k].tolist())
        _rewrite(graph, m, keep_heads=keep, mask_source=src)
        return True

    def data_moves(self, sites: list[Site], options) -> str | None:
        prune = any(str(c).startswith("prune_") for s in sites for c in s.choices)
        return "head importance ranked on calibration data (prune_k)" if prune else None

    def rejections(self, graph: gs.Graph) -> list[tuple[str, str]]:
        out = []
        for n in _candidates(graph):
            m = _match(n)
            if isinstance(m, str):
                out.append((n.name, m))
        return out
