"""Attention fusion, part 2: the rewrites: the fused com.microsoft.Attention op (optionally with
heads pruned) and the block-local (window) and linear attention forms. See passes/attention.py."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ._attention_match import _BOOL_MASK_FILL, _Match, _mask_heads, _out_proj, _shape
from ._graph import _const, _fresh_name

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs


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
