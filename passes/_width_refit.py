"""Width pruning, part 3: which channels to keep (filter norms or least-squares elimination), the
edit that removes them, and the least-squares refit of their consumers. See passes/width.py."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from graphopt.plugin import MoveContext

from ._graph import _const, _fresh_name, _input
from ._width_analysis import _Analysis
from ._width_layout import (ELIMINATION_CHUNK, MAX_ROWS, RATIOS, RIDGE, RIDGE_PER_DOF, SELECT_ROWS, _attr_str,
                            _Consumer, _Group, _Layout)

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from .width import _Base


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
    from graphopt.recovery.repair import activations

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
    from graphopt.recovery.repair import activations

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

    from graphopt.recovery.repair import refit_conv, refit_linear

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
