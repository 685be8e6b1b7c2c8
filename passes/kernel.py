"""Resize a 2-D Conv's square kernel by one ring: KxK -> (K-2)x(K-2) or (K+2)x(K+2).

An architecture move. For a KxK Conv with odd K >= 3 (plain, grouped or depthwise) the choices
are ("keep", K-2, K+2): a 3x3 conv gets ("keep", 1, 5), a 5x5 ("keep", 3, 7). A choice is the
new kernel size, an int.

The padding moves with the kernel so that the output keeps its shape and its alignment. Output
position o reads input o*s - pad_begin + d*k for tap k (stride s, dilation d). With the old tap
k at new index k + (K'-K)/2 and every pad changed by (K'-K)/2 * d on each side, each old tap
reads the same input as before, so:

- shrinking (K-2) crops the kernel's centre, dropping the outer ring of taps. Approximate (exact
  only where that ring is zero); the driver measures its fidelity. A conv whose pads would go
  negative is not a site (rejections() says so), which rules out auto_pad=VALID and unpadded
  convs. With calibration data and repair on (ctx.options["repair"], the default) the cropped
  kernel and the bias are then refit by least squares so the conv reproduces the original
  model's output on the calibration inputs (graphopt.recovery.repair.refit_conv; per group, so a
  depthwise conv is C small problems).
- growing (K+2) zero-pads the kernel with a new ring. Exact, yet deliberately NOT the site's
  `exact_choice`: it only adds FLOPs and can never be faster, and strategies take exact_choice
  as a prior for moves worth trying first. It is there for a search that may want it.

auto_pad=SAME_UPPER/SAME_LOWER is resolved to the explicit pads it means (from the static input
size) and the node becomes auto_pad=NOTSET: for the new kernel SAME would pick different pads
where its total pad clamps at zero.

A match() + rewrite() pass (graphopt/plugin.py derives sites, rejections and the stale check).
Like conv_bn, matching is `_pattern` (a constant-weight 2-D Conv and its geometry), `_check`
(the conditions for a site, each failure saying why) and `_rewrite`. A NEW gs.Constant holds the
resized weight (the base graph's arrays may be shared with the clone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from graphopt.genotype import Choice, Site
from graphopt.plugin import Fail, Match, MoveContext, Option, Pass
from ._graph import _const, _input, _static_size, _fresh_name

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs


@dataclass
class _Match:
    conv: "gs.Node"
    weight: np.ndarray  # [Cout, Cin/group, kh, kw]
    pads: list[int]  # explicit [top, left, bottom, right] (auto_pad resolved, a zero Pad absorbed)
    dilations: list[int]
    pad_node: "gs.Node | None" = None  # a constant zero Pad feeding the conv, folded into its pads

    @property
    def k(self) -> int:
        return int(self.weight.shape[2])

    @property
    def group(self) -> int:
        return int(self.conv.attrs.get("group", 1))

    def new_pads(self, k_new: int) -> list[int]:
        half = (k_new - self.k) // 2
        d = self.dilations
        return [p + half * d[i % 2] for i, p in enumerate(self.pads)]

    def note(self) -> str:
        cout, cin = self.weight.shape[0], self.weight.shape[1] * self.group
        g = f" group={self.group}" if self.group != 1 else ""
        return f"Conv {self.k}x{self.k} {cin}->{cout}{g}"


# ----------------------------------------------------------------------------- small helpers
def _ints(conv, attr: str, default: list[int]) -> list[int]:
    v = conv.attrs.get(attr)
    return [int(x) for x in v] if v is not None else list(default)


def _explicit_pads(conv, kernel: tuple[int, int], strides: list[int], dilations: list[int]) -> list[int] | str:
    """[top, left, bottom, right] the conv actually pads by, or why that is not known."""
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad == "NOTSET":
        pads = _ints(conv, "pads", [0, 0, 0, 0])
        return pads if len(pads) == 4 else f"pads has {len(pads)} values, expected 4"
    if auto_pad == "VALID":
        return [0, 0, 0, 0]
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return f"unknown auto_pad {auto_pad!r}"
    x = conv.inputs[0]
    spatial = list(x.shape[2:]) if x.shape is not None and len(x.shape) == 4 else None
    if spatial is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in spatial):
        return f"auto_pad={auto_pad} with unknown input spatial size"
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = math.ceil(int(size) / s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - int(size))
        small, big = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins + ends


# -------------------------------------------------------------------------------- matching
def _pattern(conv: "gs.Node") -> _Match | str:
    """A Conv with a constant 4-D weight and known padding; else why not."""
    w = _const(_input(conv, 1))
    if w is None:
        return "weight is not a constant"
    if w.ndim != 4:
        return f"not a 2-D conv (weight has rank {w.ndim})"
    kernel = (int(w.shape[2]), int(w.shape[3]))
    ks = conv.attrs.get("kernel_shape")
    if ks is not None and tuple(int(k) for k in ks) != kernel:
        return f"kernel_shape {list(ks)} disagrees with weight shape {list(w.shape)}"
    strides = _ints(conv, "strides", [1, 1])
    dilations = _ints(conv, "dilations", [1, 1])
    if len(strides) != 2 or len(dilations) != 2:
        return "strides/dilations do not have 2 values"
    pads = _explicit_pads(conv, kernel, strides, dilations)
    if isinstance(pads, str):
        return pads
    pad_node = _zero_pad_producer(conv)
    if pad_node is not None:  # "same" padding exported as a separate Pad: the conv can own it
        pp = [int(v) for v in _const(_input(pad_node, 1))]
        pads = [pads[0] + pp[2], pads[1] + pp[3], pads[2] + pp[6], pads[3] + pp[7]]
    return _Match(conv, w, pads, dilations, pad_node)


def _zero_pad_producer(conv: "gs.Node") -> "gs.Node | None":
    """The Pad producing the conv's input when it zero-pads only H and W and feeds only this conv."""
    x = conv.inputs[0]
    if len(x.inputs) != 1 or x.inputs[0].op != "Pad" or len(x.outputs) != 1:
        return None
    if str(conv.attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "b'NOTSET'"):
        return None
    pad = x.inputs[0]
    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    pads = _const(_input(pad, 1))
    if mode != "constant" or pads is None or pads.shape != (8,) or _input(pad, 3) is not None:
        return None
    value = _input(pad, 2)
    if value is not None and (_const(value) is None or np.any(_const(value) != 0)):
        return None
    pads = [int(v) for v in pads]
    if any(v < 0 for v in pads) or pads[0] or pads[1] or pads[4] or pads[5]:
        return None
    return pad


def _check(m: _Match, k_new: int | None = None) -> str | None:
    """Conditions for a site (k_new None: both ring moves); None if they hold, else why not."""
    kh, kw = m.weight.shape[2:]
    if kh != kw:
        return f"non-square kernel {kh}x{kw}"
    if kh % 2 == 0:
        return f"even kernel {kh}x{kw} (no centre to crop or pad around)"
    if kh == 1:
        return "1x1 kernel (pointwise; no ring to resize)"
    k_new = m.k - 2 if k_new is None else k_new
    if min(m.new_pads(k_new)) < 0:
        return (f"pads {m.pads} would go negative ({m.new_pads(k_new)}) "
                f"when shrinking to {k_new}x{k_new}")
    return None


def _match(conv: "gs.Node") -> _Match | str:
    m = _pattern(conv)
    if isinstance(m, str):
        return m
    why = _check(m)
    return why if why else m


def _resize(w: np.ndarray, k_new: int) -> np.ndarray:
    """Crop the centre (k_new < K) or zero-pad a ring (k_new > K) of the two spatial axes."""
    half = (k_new - w.shape[2]) // 2
    if half >= 0:
        return np.pad(w, ((0, 0), (0, 0), (half, half), (half, half)))
    return w[:, :, -half:w.shape[2] + half, -half:w.shape[3] + half]


def _rewrite(graph: "gs.Graph", m: _Match, k_new: int) -> None:
    import onnx_graphsurgeon as gs

    conv = m.conv
    taken = set(graph.tensors(check_duplicates=False).keys())
    base = conv.name.strip("/").replace("/", "_") or "conv"
    new_w = np.ascontiguousarray(_resize(m.weight, k_new).astype(m.weight.dtype))
    conv.inputs[1] = gs.Constant(_fresh_name(taken, f"{base}_k{k_new}_weight"), new_w)
    if m.pad_node is not None:  # the conv takes over the Pad's padding (cleanup drops the Pad)
        conv.inputs[0] = m.pad_node.inputs[0]
    conv.attrs["pads"] = m.new_pads(k_new)
    conv.attrs["kernel_shape"] = [k_new, k_new]
    conv.attrs.pop("auto_pad", None)  # explicit pads now say it all (NOTSET)


def _repair(ctx: MoveContext, conv: "gs.Node") -> bool:
    """Least-squares refit of a shrunk kernel (and bias) so the conv reproduces the original
    model's output on the calibration inputs (ridge toward the cropped kernel); False when there
    is no calibration data or the conv's tensors are not the base model's."""
    import onnx_graphsurgeon as gs

    from graphopt.recovery.repair import activations, base_tensor_names, refit_conv

    act = activations(ctx)
    if act is None:
        return False
    names = base_tensor_names(ctx)
    x_name, y_name = conv.inputs[0].name, conv.outputs[0].name
    if x_name not in names or y_name not in names:
        return False
    a = act.get([x_name, y_name])
    w0 = np.asarray(conv.inputs[1].values)
    b0 = _const(_input(conv, 2))
    if a[x_name].shape[1] != w0.shape[1] * int(conv.attrs.get("group", 1)) or a[y_name].shape[1] != w0.shape[0]:
        return False  # channel counts changed by another move: the original tensors no longer match
    w, b = refit_conv(a[x_name], a[y_name], w0, conv.attrs, b0=b0, intercept=True)
    conv.inputs[1].values = np.ascontiguousarray(w.astype(w0.dtype))  # the new constant _rewrite made
    if b0 is not None:
        conv.inputs[2] = gs.Constant(f"{conv.inputs[1].name}_bias", np.ascontiguousarray(b.astype(b0.dtype)))
    else:
        conv.inputs.append(gs.Constant(f"{conv.inputs[1].name}_bias", np.ascontiguousarray(b.astype(w0.dtype))))
    return True


def _cost(m: _Match) -> float:
    """FLOPs of the conv (2 * MACs); 0 when the output shape is unknown."""
    out = _static_size(m.conv.outputs[0].shape)
    if out is None:
        return 0.0
    return 2.0 * out * int(np.prod(m.weight.shape[1:]))


# ------------------------------------------------------------------------------------- the pass
class KernelResize(Pass):
    """Shrink (approximate) or grow (exact, never faster) a square odd 2-D conv kernel by a ring.

    Growth is exact but is not the site's exact_choice: only moves that can pay are priors.
    """

    uses_calibration = True  # shrinking refits the cropped kernel to the original outputs

    def data_moves(self, sites, options) -> str | None:
        return "least-squares repair of the new weights" if options.get("repair", True) else None

    name = "kernel"
    description = "resize a KxK conv kernel to (K-2)x(K-2) (crop centre) or (K+2)x(K+2) (zero ring)"
    fidelity = "smaller kernel approximate (centre crop); larger kernel exact (zero ring)"
    OPTIONS = (
        Option("repair", bool, True, "least-squares repair of new weights on calibration data (--no-repair: 0)"),
    )
    stage = 30

    anchor_ops = ("Conv",)

    def match(self, graph: "gs.Graph", conv: "gs.Node") -> Match | Fail:
        m = _match(conv)
        if isinstance(m, str):
            return Fail(m)
        return Match(conv, choices=("keep", m.k - 2, m.k + 2), cost=_cost(m), note=m.note(), conv=m)

    def check_choice(self, site: Site, choice: Choice) -> None:
        """Any odd kernel size >= 1 (one the conv's pads cannot take does not apply)."""
        if isinstance(choice, bool) or not isinstance(choice, (int, np.integer)) or choice < 1 or choice % 2 == 0:
            raise ValueError(f"kernel: choice {choice!r} for site {site.key} is not an odd kernel size")

    def rewrite(self, graph: "gs.Graph", match: Match, choice: Choice, ctx: MoveContext) -> bool:
        m, k_new = match.conv, int(choice)
        if m.k == k_new or _check(m, k_new) is not None:
            return False
        _rewrite(graph, m, k_new)
        if k_new < m.k and ctx.options.get("repair", True):
            _repair(ctx, m.conv)
        return True
