"""Fuse an inference-mode BatchNormalization into the Conv, Gemm or MatMul(+Add) before it.

An exact rewrite. With s = gamma / sqrt(var + eps), a BN computes y * s + (beta - mean * s)
per channel (axis 1), so it folds into the producer's weights and bias:

    W' = W * s   (scaled along the output-channel axis)
    b' = (b - mean) * s + beta

Conv: weight [Cout, Cin/g, k...] scaled along axis 0 (grouped and depthwise alike).
Gemm: B scaled along N (axis 1, or axis 0 with transB=1); C' = (beta_attr * C - mean) * s + beta
      and the Gemm's beta attribute becomes 1. alpha stays as it is.
MatMul with a constant [K, N] weight and a rank-2 output: weight scaled along axis 1; a
following Add with a constant bias gets the new bias, otherwise an Add with the shift is inserted.

Like onnxscript's `_fuse_batchnorm.py`, matching is split into `_pattern` (the shape of the
subgraph), `_check` (the conditions that make the fusion exact, each failure saying why) and
`_rewrite`. Arithmetic is done in float64 and cast back to the weight dtype; new gs.Constant
tensors are created (the base graph's arrays may be shared with the clone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from graphopt.genotype import Choice
from graphopt.plugin import Fail, Match, Pass
from graphopt.rewrite import set_input as _set_input
from graphopt.rewrite import take_over_outputs
from ._graph import _present, _const, _input, _static_size, _fresh_name

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

_PRODUCERS = "Conv/Gemm/MatMul"


@dataclass
class _Match:
    bn: "gs.Node"
    prod: "gs.Node"  # the Conv, Gemm or MatMul
    add: "gs.Node | None" = None  # MatMul + Add(constant bias)
    add_bias_index: int = 1  # which input of the Add is the constant bias

    @property
    def last(self) -> "gs.Node":
        """The node whose output the BN reads."""
        return self.add if self.add is not None else self.prod

    @property
    def nodes(self) -> tuple["gs.Node", ...]:
        return (self.prod,) + ((self.add,) if self.add is not None else ()) + (self.bn,)

    def note(self) -> str:
        mid = f"{self.prod.op} {self.prod.name}"
        if self.add is not None:
            mid += f" + Add {self.add.name}"
        return f"{mid} -> BN {self.bn.name}"


# ----------------------------------------------------------------------------- small helpers
def _is_graph_output(graph: "gs.Graph", t) -> bool:
    return any(o is t for o in graph.outputs)


def _producer(t):
    return t.inputs[0] if len(t.inputs) == 1 else None


def _rank(t) -> int | None:
    return len(t.shape) if t is not None and t.shape is not None else None


def _single_consumer(graph: "gs.Graph", node, consumer) -> str | None:
    """None if `node`'s only output feeds only `consumer`; else why not."""
    out = node.outputs[0]
    n = len(out.outputs)
    if n != 1 or out.outputs[0] is not consumer:
        return f"{node.op} {node.name} output has {n} consumers"
    if _is_graph_output(graph, out):
        return f"{node.op} {node.name} output is also a graph output"
    return None


# ------------------------------------------------------------------ pattern / check / rewrite
def _pattern(bn: "gs.Node") -> _Match | str:
    """BN <- Conv | Gemm | MatMul | Add(MatMul, constant): the structure only."""
    if not bn.outputs or not _present(bn.outputs[0]):
        return "BatchNormalization has no output (already fused?)"
    x = _input(bn, 0)
    if x is None:
        return "BatchNormalization has no input"
    prod = _producer(x)
    if prod is None:
        return "input is a graph input or constant, not the output of Conv/Gemm/MatMul"
    if len(prod.outputs) != 1:
        return f"input comes from {prod.op} {prod.name} with {len(prod.outputs)} outputs"
    if prod.op in ("Conv", "Gemm", "MatMul"):
        return _Match(bn, prod)
    if prod.op == "Add":
        for bias_i in (1, 0):
            a = _input(prod, 1 - bias_i)
            mm = _producer(a) if a is not None else None
            if mm is not None and mm.op == "MatMul" and _const(_input(prod, bias_i)) is not None:
                return _Match(bn, mm, add=prod, add_bias_index=bias_i)
        return "input comes from Add, which is not MatMul + constant bias"
    return f"input comes from {prod.op}, not {_PRODUCERS}"


def _check(graph: "gs.Graph", m: _Match) -> str | None:
    """Conditions for an exact fusion; None if they hold, else the first reason they do not."""
    bn, prod = m.bn, m.prod
    if int(bn.attrs.get("training_mode", 0)) != 0:
        return "BatchNormalization is in training mode (training_mode=1)"
    if "spatial" in bn.attrs and int(bn.attrs["spatial"]) == 0:
        return "BatchNormalization has spatial=0 (per-activation statistics)"
    used = [o for o in bn.outputs if _present(o) and (o.outputs or _is_graph_output(graph, o))]
    if len(used) > 1 or any(o is not bn.outputs[0] for o in used):
        return (f"BatchNormalization has {len(used)} used outputs "
                "(running mean/var outputs exist only in training mode)")
    params = [_const(_input(bn, i)) for i in range(1, 5)]
    for pname, p in zip(("scale", "B", "mean", "var"), params):
        if p is None:
            return f"BatchNormalization {pname} is not a constant"
        if p.ndim != 1:
            return f"BatchNormalization {pname} has shape {list(p.shape)}, expected [C]"
    channels = params[0].shape[0]
    if any(p.shape[0] != channels for p in params):
        return "BatchNormalization scale/B/mean/var lengths differ"

    if m.add is not None:
        why = _single_consumer(graph, prod, m.add) or _single_consumer(graph, m.add, bn)
    else:
        why = _single_consumer(graph, prod, bn)
    if why:
        return why

    w = _const(_input(prod, 1))
    if prod.op == "Conv":
        if w is None:
            return f"Conv {prod.name} weight is not a constant"
        if w.ndim < 3:
            return f"Conv {prod.name} weight has rank {w.ndim}"
        bias_t = _input(prod, 2)
        if bias_t is not None:
            b = _const(bias_t)
            if b is None:
                return f"Conv {prod.name} bias is not a constant"
            if b.shape != (w.shape[0],):
                return f"Conv {prod.name} bias has shape {list(b.shape)}, expected [{w.shape[0]}]"
        n_out = w.shape[0]
    elif prod.op == "Gemm":
        if w is None:
            return f"Gemm {prod.name} weight B is not a constant"
        if w.ndim != 2:
            return f"Gemm {prod.name} weight B has rank {w.ndim}"
        n_out = w.shape[0] if int(prod.attrs.get("transB", 0)) else w.shape[1]
        c_t = _input(prod, 2)
        if c_t is not None:
            c = _const(c_t)
            if c is None:
                return f"Gemm {prod.name} bias C is not a constant"
            if c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n_out)):
                return f"Gemm {prod.name} bias C has shape {list(c.shape)}, not broadcastable to [M, {n_out}]"
    else:  # MatMul
        if w is None:
            return f"MatMul {prod.name} second input is not a constant weight"
        if w.ndim != 2:
            return f"MatMul {prod.name} weight has rank {w.ndim}, need 2"
        x = _input(prod, 0)
        rank = _rank(prod.outputs[0])
        if rank is None:
            rank = _rank(x)
        if rank is None:
            return f"MatMul {prod.name} output rank is unknown"
        if rank != 2:
            return f"MatMul {prod.name} output has rank {rank}, need 2 (BN channel axis must be the weight's N)"
        n_out = w.shape[1]
        if m.add is not None:
            b = _const(_input(m.add, m.add_bias_index))
            if b.ndim > 2 or (b.ndim >= 1 and b.shape[-1] not in (1, n_out)):
                return f"Add {m.add.name} bias has shape {list(b.shape)}, not broadcastable to [M, {n_out}]"
    if n_out != channels:
        return f"{prod.op} {prod.name} has {n_out} output channels but BatchNormalization has {channels}"
    return None


def _match(graph: "gs.Graph", bn: "gs.Node") -> _Match | str:
    m = _pattern(bn)
    if isinstance(m, str):
        return m
    why = _check(graph, m)
    return why if why else m


def _bn_scale_shift(bn: "gs.Node") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s, mean, beta) in float64, with s = gamma / sqrt(var + eps)."""
    gamma, beta, mean, var = (_const(_input(bn, i)).astype(np.float64) for i in range(1, 5))
    eps = float(bn.attrs.get("epsilon", 1e-5))
    return gamma / np.sqrt(var + eps), mean, beta


def _rewrite(graph: "gs.Graph", m: _Match) -> None:
    import onnx_graphsurgeon as gs

    bn, prod = m.bn, m.prod
    s, mean, beta = _bn_scale_shift(bn)
    w_t = prod.inputs[1]
    w = _const(w_t)
    dtype = w.dtype
    w64 = w.astype(np.float64)
    taken = set(graph.tensors(check_duplicates=False).keys())
    base = bn.name.strip("/").replace("/", "_") or "bn"

    def const(suffix: str, value: np.ndarray) -> "gs.Constant":
        return gs.Constant(_fresh_name(taken, f"{base}_fused_{suffix}"), np.ascontiguousarray(value.astype(dtype)))

    if prod.op == "Conv":
        new_w = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
        b_t = _input(prod, 2)
        b = _const(b_t).astype(np.float64) if b_t is not None else np.zeros_like(s)
        new_b = (b - mean) * s + beta
        prod.inputs[1] = const("weight", new_w)
        _set_input(prod, 2, const("bias", new_b))
    elif prod.op == "Gemm":
        trans_b = int(prod.attrs.get("transB", 0))
        new_w = w64 * (s[:, None] if trans_b else s[None, :])
        gemm_beta = float(prod.attrs.get("beta", 1.0))
        c_t = _input(prod, 2)
        c = gemm_beta * _const(c_t).astype(np.float64) if c_t is not None else np.zeros_like(s)
        new_c = (c - mean) * s + beta  # broadcasts [], [1], [N], [1,N], [M,1], [M,N]
        prod.inputs[1] = const("weight", new_w)
        _set_input(prod, 2, const("bias", new_c))
        prod.attrs["beta"] = 1.0
    else:  # MatMul (+ Add)
        prod.inputs[1] = const("weight", w64 * s[None, :])
        if m.add is not None:
            b = _const(m.add.inputs[m.add_bias_index]).astype(np.float64)
            m.add.inputs[m.add_bias_index] = const("bias", (b - mean) * s + beta)
        else:
            shift = beta - mean * s
            names = {n.name for n in graph.nodes}
            add = gs.Node("Add", name=_fresh_name(names, f"{bn.name}/shift"),
                          inputs=[prod.outputs[0], const("bias", shift)])
            graph.nodes.append(add)
            m = _Match(bn, prod, add=add)

    # Producer (or the Add after it) takes over the BN's output tensor; the BN is unhooked
    # and dropped so later moves in the same candidate see a consistent graph.
    take_over_outputs(graph, m.last, bn)


def _cost(m: _Match) -> float:
    """Rough FLOPs of the producer (2 * MACs); 0 when shapes are unknown."""
    prod = m.prod
    out = _static_size(prod.outputs[0].shape)
    w = _const(_input(prod, 1))
    if out is None or w is None:
        return 0.0
    if prod.op == "Conv":
        return 2.0 * out * int(np.prod(w.shape[1:]))
    k = w.shape[1] if prod.op == "Gemm" and int(prod.attrs.get("transB", 0)) else w.shape[0]
    return 2.0 * out * int(k)


# ------------------------------------------------------------------------------------- the pass
class ConvBnFusion(Pass):
    """match() finds the pattern and checks it; the base class derives sites, rejections and the
    stale-site check in apply (graphopt/plugin.py)."""

    name = "conv_bn"
    description = "fuse inference BatchNormalization into the preceding Conv/Gemm/MatMul (exact)"
    fidelity = "exact"
    OPTIONS = ()
    stage = 10
    anchor_ops = ("BatchNormalization",)
    choices = ("keep", "fuse")
    exact_choice = "fuse"

    def match(self, graph: "gs.Graph", bn: "gs.Node") -> Match | Fail:
        m = _match(graph, bn)
        if isinstance(m, str):
            return Fail(m, bn)
        return Match(*m.nodes, cost=_cost(m), note=m.note(), fusion=m)

    def rewrite(self, graph: "gs.Graph", match: Match, choice: Choice, ctx) -> None:
        _rewrite(graph, match.fusion)
