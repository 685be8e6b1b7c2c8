"""Replace a standard KxK Conv by a depthwise KxK Conv (channel multiplier r) + a pointwise 1x1 Conv.

An architecture move. A group=1 Conv with weight W [Cout, Cin, kh, kw] (kh*kw > 1) becomes

    x -> Conv(group=Cin, weight D [Cin*r, 1, kh, kw], strides/pads/dilations/auto_pad of the original)
      -> Conv 1x1 (weight P [Cout, Cin*r, 1, 1], the original bias) -> the original output tensor

so a following BN / activation / residual Add keeps consuming the same tensor. The weights come
from the original by SVD: for each input channel i, W[:, i] reshaped to M_i [Cout, kh*kw] is
factorised M_i = U S V^T and truncated to rank r. Channel i's r depthwise filters are the rows
of S_r^(1/2) V_r^T, its r pointwise columns (P[:, i*r:(i+1)*r]) are U_r S_r^(1/2), so the
composition computes the conv with every M_i replaced by its best rank-r approximation
(Eckart-Young). At full rank r = min(Cout, kh*kw) it is exact, but full rank never saves FLOPs,
so it is not offered as a choice; apply() accepts any int 1 <= r <= full rank.

Choices per site: ("keep", r...) for r in (1, 2, 4) with r <= full rank and FLOPs below the
original's: the pair costs Cin*r*(kh*kw + Cout) MACs per output pixel against Cout*Cin*kh*kw.
A conv for which no r saves FLOPs is not a site. Approximate: the driver measures fidelity.

The pass is match() + rewrite() (graphopt/plugin.py derives sites, rejections and the stale
check). Not sites (rejections() says why): grouped or depthwise convs, 1x1 kernels, non-constant
weights, convs that are not 2-D. Arithmetic is float64 and cast back to the weight dtype; new
gs.Constant tensors hold the new weights (the base graph's arrays may be shared with the clone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from graphopt.genotype import Choice, Site
from graphopt.plugin import Fail, Match, MoveContext, Option, Pass
from ._graph import _const, _input, _static_size, _fresh_name

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

RANKS = (1, 2, 4)


@dataclass
class _Match:
    conv: "gs.Node"
    weight: np.ndarray  # [Cout, Cin, kh, kw]

    @property
    def cout(self) -> int:
        return int(self.weight.shape[0])

    @property
    def cin(self) -> int:
        return int(self.weight.shape[1])

    @property
    def taps(self) -> int:
        return int(self.weight.shape[2] * self.weight.shape[3])

    @property
    def full_rank(self) -> int:
        return min(self.cout, self.taps)

    def saves_flops(self, r: int) -> bool:
        return r * (self.taps + self.cout) < self.cout * self.taps

    def ranks(self) -> list[int]:
        return [r for r in RANKS if r <= self.full_rank and self.saves_flops(r)]

    def note(self) -> str:
        kh, kw = self.weight.shape[2:]
        return f"Conv {kh}x{kw} {self.cin}->{self.cout}"


# -------------------------------------------------------------------------------- matching
def _pattern(conv: "gs.Node") -> _Match | str:
    """A Conv with a constant 4-D weight; else why not."""
    w = _const(_input(conv, 1))
    if w is None:
        return "weight is not a constant"
    if w.ndim != 4:
        return f"not a 2-D conv (weight has rank {w.ndim})"
    if not np.issubdtype(w.dtype, np.floating):
        return f"weight dtype {w.dtype} is not floating point"
    return _Match(conv, w)


def _check(m: _Match) -> str | None:
    """Conditions for a standard conv the substitution can act on; None if they hold."""
    group = int(m.conv.attrs.get("group", 1))
    if group != 1:
        if m.cin == 1:
            return f"already depthwise (group={group})"
        return f"grouped conv (group={group})"
    kh, kw = m.weight.shape[2:]
    if kh * kw == 1:
        return "1x1 kernel (already pointwise)"
    b = _input(m.conv, 2)
    if b is not None and b.shape is not None and tuple(b.shape) != (m.cout,):
        return f"bias has shape {list(b.shape)}, expected [{m.cout}]"
    return None


def _match(conv: "gs.Node") -> _Match | str:
    m = _pattern(conv)
    if isinstance(m, str):
        return m
    why = _check(m)
    return why if why else m


def factorize(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(depthwise [Cin*r, 1, kh, kw], pointwise [Cout, Cin*r, 1, 1]) from W [Cout, Cin, kh, kw].

    Per input channel i, the rank-r truncated SVD of W[:, i] as [Cout, kh*kw]; float64.
    """
    cout, cin, kh, kw = w.shape
    mats = w.astype(np.float64).transpose(1, 0, 2, 3).reshape(cin, cout, kh * kw)
    u, s, vt = np.linalg.svd(mats, full_matrices=False)  # [Cin,Cout,k], [Cin,k], [Cin,k,kh*kw]
    root = np.sqrt(s[:, :r])  # [Cin, r]
    dw = root[:, :, None] * vt[:, :r, :]  # [Cin, r, kh*kw]: channel i's r filters
    pw = u[:, :, :r] * root[:, None, :]  # [Cin, Cout, r]
    return (dw.reshape(cin * r, 1, kh, kw),
            pw.transpose(1, 0, 2).reshape(cout, cin * r, 1, 1))


def _rewrite(graph: "gs.Graph", m: _Match, r: int):
    """Returns (depthwise weight, depthwise attrs, pointwise node) for an optional repair."""
    import onnx_graphsurgeon as gs

    conv = m.conv
    dtype = m.weight.dtype
    dw_w, pw_w = factorize(m.weight, r)
    taken = set(graph.tensors(check_duplicates=False).keys())
    node_names = {n.name for n in graph.nodes}
    base = conv.name.strip("/").replace("/", "_") or "conv"

    def const(suffix: str, value: np.ndarray) -> "gs.Constant":
        return gs.Constant(_fresh_name(taken, f"{base}_{suffix}"), np.ascontiguousarray(value.astype(dtype)))

    x, bias = conv.inputs[0], _input(conv, 2)
    outs = list(conv.outputs)
    y = outs[0]
    mid_shape = None
    if y.shape is not None and len(y.shape) == 4:
        mid_shape = [y.shape[0], m.cin * r, y.shape[2], y.shape[3]]
    mid = gs.Variable(_fresh_name(taken, f"{base}_dw_r{r}_out"), dtype=y.dtype or dtype, shape=mid_shape)

    dw_attrs = {k: v for k, v in conv.attrs.items() if k in ("auto_pad", "dilations", "pads", "strides")}
    dw_attrs["kernel_shape"] = [int(d) for d in m.weight.shape[2:]]
    dw_attrs["group"] = m.cin

    # Unhook the original first: the pointwise conv takes over its output tensor.
    conv.outputs.clear()
    conv.inputs.clear()
    graph.nodes.remove(conv)
    dw = gs.Node("Conv", name=_fresh_name(node_names, f"{conv.name}/depthwise"), attrs=dw_attrs,
                 inputs=[x, const(f"dw_r{r}_weight", dw_w)], outputs=[mid])
    pw_inputs = [mid, const(f"pw_r{r}_weight", pw_w)] + ([bias] if bias is not None else [])
    pw = gs.Node("Conv", name=_fresh_name(node_names, f"{conv.name}/pointwise"),
                 attrs={"kernel_shape": [1, 1]}, inputs=pw_inputs, outputs=outs)
    graph.nodes.extend([dw, pw])
    return dw_w, dw_attrs, pw


def _repair(ctx: MoveContext, x_name: str, y_name: str, bias: np.ndarray | None, dw_w: np.ndarray,
            dw_attrs: dict, pw) -> bool:
    """Least-squares refit of the pointwise weights so that pointwise(depthwise(x)) matches the
    original conv's output on the calibration inputs (x and y from the original model)."""
    from graphopt.recovery.repair import activations, base_tensor_names, refit_pointwise, run_conv

    act = activations(ctx)
    if act is None:
        return False
    names = base_tensor_names(ctx)
    if x_name not in names or y_name not in names:
        return False  # an earlier move made these tensors: no original activations to match
    a = act.get([x_name, y_name])
    feats = run_conv(a[x_name], dw_w, dw_attrs)
    target = a[y_name].astype(np.float64)
    if bias is not None:
        target = target - bias.reshape(1, -1, 1, 1)
    w = refit_pointwise(feats, target)
    pw.inputs[1].values = np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1], 1, 1).astype(pw.inputs[1].dtype))
    return True


def _cost(m: _Match) -> float:
    """FLOPs of the original conv (2 * MACs); 0 when the output shape is unknown."""
    out = _static_size(m.conv.outputs[0].shape)
    if out is None:
        return 0.0
    return 2.0 * out * m.cin * m.taps


# ------------------------------------------------------------------------------------- the pass
class DepthwiseSeparable(Pass):
    """KxK Conv -> depthwise KxK (multiplier r) + pointwise 1x1, from a per-channel rank-r SVD.

    With calibration data and repair on (the default), the pointwise weights are then refit by
    least squares to the original conv's outputs (graphopt.recovery.repair)."""

    uses_calibration = True

    def data_moves(self, sites, options) -> str | None:
        return "least-squares repair of the new weights" if options.get("repair", True) else None

    name = "depthwise"
    description = "replace a KxK conv by depthwise KxK (multiplier r) + pointwise 1x1, SVD-initialised"
    fidelity = "approximate: a low-rank (SVD) factorisation of the KxK kernel"
    OPTIONS = (
        Option("repair", bool, True, "least-squares repair of new weights on calibration data (--no-repair: 0)"),
    )
    stage = 30
    anchor_ops = ("Conv",)

    def match(self, graph: "gs.Graph", conv: "gs.Node") -> Match | Fail:
        m = _match(conv)
        if isinstance(m, str):
            return Fail(m)
        if not m.ranks():
            return Fail(f"no rank in {RANKS} saves FLOPs: r*({m.taps}+{m.cout}) >= {m.cout}*{m.taps} ({m.note()})")
        return Match(conv, choices=("keep", *m.ranks()), cost=_cost(m), note=m.note(), conv=m)

    def check_choice(self, site: Site, choice: Choice) -> None:
        """Any rank r >= 1 (a rank above the conv's full rank does not apply)."""
        if isinstance(choice, bool) or not isinstance(choice, (int, np.integer)) or choice < 1:
            raise ValueError(f"depthwise: choice {choice!r} for site {site.key} is not a positive rank")

    def rewrite(self, graph: "gs.Graph", match: Match, choice: Choice, ctx: MoveContext) -> bool:
        m = match.conv
        if int(choice) > m.full_rank:
            return False
        x_name, y_name = m.conv.inputs[0].name, m.conv.outputs[0].name
        bias = _const(_input(m.conv, 2))
        dw_w, dw_attrs, pw = _rewrite(graph, m, int(choice))
        if ctx.options.get("repair", True):
            _repair(ctx, x_name, y_name, bias, dw_w, dw_attrs, pw)
        return True
