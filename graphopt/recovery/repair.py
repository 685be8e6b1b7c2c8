"""Data-driven weight repair: refit a layer so its outputs match the original network's.

After an approximate move (a low-rank depthwise substitution, later channel pruning), the
layer that consumes the changed tensor is refit by least squares on activations the ORIGINAL
model produces on the calibration inputs (the channel-pruning reconstruction of He et al.
2017 / ThiNet). Activations come from onnxruntime with the wanted tensors added as outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np

if TYPE_CHECKING:
    import onnx

MAX_ROWS = 20000  # pixels (rows of the least-squares problem) sampled per refit


class Activations:
    """Original-model activations on the calibration inputs, fetched on demand and cached."""

    def __init__(self, model: "onnx.ModelProto", calibration: Mapping[str, np.ndarray]):
        self.model = model
        self.calibration = calibration
        self._cache: dict[str, np.ndarray] = {}

    def get(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        names = list(names)
        missing = [n for n in names if n not in self._cache]
        if missing:
            self._cache.update(self._run(missing))
        return {n: self._cache[n] for n in names}

    def _run(self, names: list[str]) -> dict[str, np.ndarray]:
        import onnx
        import onnxruntime as ort

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        have = {o.name for o in m.graph.output}
        for n in names:
            if n not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=n))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        count = next(iter(self.calibration.values())).shape[0]
        outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for i in range(count):
            res = sess.run(names, {k: v[i] for k, v in self.calibration.items()})
            for n, r in zip(names, res):
                outs[n].append(r)
        return {n: np.concatenate(v, axis=0) for n, v in outs.items()}


def activations(ctx) -> Activations | None:
    """The run's shared Activations (None without calibration data)."""
    if not ctx.calibration:
        return None
    act = ctx.cache.get("activations")
    if act is None:
        act = ctx.cache["activations"] = Activations(ctx.base_model, ctx.calibration)
    return act


def run_conv(x: np.ndarray, weight: np.ndarray, attrs: Mapping) -> np.ndarray:
    """One Conv (no bias) on x with onnxruntime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    attrs = {k: v for k, v in attrs.items() if v is not None}
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    g = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(weight.astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = min(m.ir_version, 10)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.astype(np.float32)})[0]


def refit_pointwise(features: np.ndarray, target: np.ndarray, seed: int = 0) -> np.ndarray:
    """W [Cout, Cf] minimising ||W f - t|| over pixels; features [N, Cf, H, W], target [N, Cout, H, W].

    Ridge-regularised normal equations (lambda = 1e-6 of the mean feature energy) on at most
    MAX_ROWS randomly sampled pixels; float64.
    """
    f = features.transpose(0, 2, 3, 1).reshape(-1, features.shape[1]).astype(np.float64)
    t = target.transpose(0, 2, 3, 1).reshape(-1, target.shape[1]).astype(np.float64)
    if f.shape[0] > MAX_ROWS:
        idx = np.random.default_rng(seed).choice(f.shape[0], MAX_ROWS, replace=False)
        f, t = f[idx], t[idx]
    gram = f.T @ f
    lam = 1e-6 * (np.trace(gram) / max(1, gram.shape[0])) + 1e-12
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), f.T @ t)  # [Cf, Cout]
    return w.T


# ------------------------------------------------------------- general refits (width, kernel)
RIDGE = 1e-4  # ridge weight toward the layer's current weights, relative to the mean feature energy


def im2col(x: np.ndarray, kernel: tuple[int, int], attrs: Mapping) -> np.ndarray:
    """Patches of x as channels, [N, Cin*kh*kw, H', W'], for a conv geometry (strides, pads,
    dilations, auto_pad in attrs): channel c*kh*kw + i*kw + j holds input channel c at tap (i, j),
    the order of a conv weight [Cout, Cin, kh, kw] flattened per output. One onnxruntime conv
    with one-hot weights (group = Cin)."""
    kh, kw = int(kernel[0]), int(kernel[1])
    geo = {k: attrs[k] for k in ("strides", "pads", "dilations", "auto_pad") if attrs.get(k) is not None}
    trivial = (kh * kw == 1 and all(int(s) == 1 for s in geo.get("strides", [1]))
               and not any(int(p) for p in geo.get("pads", [0])) and str(geo.get("auto_pad", "NOTSET")) in ("NOTSET", "VALID"))
    if trivial:
        return x
    cin, taps = x.shape[1], kh * kw
    eye = np.zeros((cin * taps, 1, kh, kw), np.float32)
    for t in range(taps):
        eye[t::taps, 0, t // kw, t % kw] = 1.0
    return run_conv(x, eye, {**geo, "group": cin, "kernel_shape": [kh, kw]})


def refit_linear(features: np.ndarray, target: np.ndarray, w0: np.ndarray | None = None, groups: int = 1,
                 ridge: float = RIDGE, seed: int = 0, max_rows: int = MAX_ROWS,
                 b0: np.ndarray | None = None, intercept: bool = False):
    """W [G*o, d] minimising, per group g, ||F_g W_g^T (+ b_g) - T_g||^2 + lam ||W_g - W0_g||^2.

    features [P, G*d] (group g owns columns g*d..), target [P, G*o]; w0 [G*o, d] is the prior
    (zeros if None) that fixes the directions the data does not determine (fewer rows than
    features, dead channels). lam = ridge * mean diagonal of the group's Gram matrix. With
    intercept=True a bias is fit too (prior b0, default zeros) and (W, b [G*o]) is returned: it
    absorbs the mean of what a pruned input used to contribute. Rows are sampled down to
    max_rows; float64 arithmetic.
    """
    p = features.shape[0]
    if p > max_rows:
        idx = np.sort(np.random.default_rng(seed).choice(p, max_rows, replace=False))
        features, target = features[idx], target[idx]
        p = max_rows
    d, o = features.shape[1] // groups, target.shape[1] // groups
    f = features.astype(np.float64).reshape(p, groups, d).transpose(1, 0, 2)  # [G, P, d]
    t = target.astype(np.float64).reshape(p, groups, o).transpose(1, 0, 2)  # [G, P, o]
    prior = (np.zeros((groups, d, o)) if w0 is None
             else w0.astype(np.float64).reshape(groups, o, d).transpose(0, 2, 1))
    if intercept:
        f = np.concatenate([f, np.ones((groups, p, 1))], axis=2)
        bias = np.zeros((groups, 1, o)) if b0 is None else b0.astype(np.float64).reshape(groups, 1, o)
        prior = np.concatenate([prior, bias], axis=1)
    gram = np.matmul(f.transpose(0, 2, 1), f)  # [G, d(+1), d(+1)]
    rhs = np.matmul(f.transpose(0, 2, 1), t)  # [G, d(+1), o]
    lam = ridge * np.trace(gram[:, :d, :d], axis1=1, axis2=2) / d + 1e-12  # [G]
    eye = np.eye(gram.shape[1])[None]
    w = np.linalg.solve(gram + lam[:, None, None] * eye, rhs + lam[:, None, None] * prior)  # [G, d(+1), o]
    if intercept:
        return w[:, :d].transpose(0, 2, 1).reshape(groups * o, d), w[:, d].reshape(groups * o)
    return w.transpose(0, 2, 1).reshape(groups * o, d)


def refit_conv(x: np.ndarray, target: np.ndarray, w0: np.ndarray, attrs: Mapping, ridge: float = RIDGE,
               seed: int = 0, b0: np.ndarray | None = None, intercept: bool = False, max_rows: int = MAX_ROWS):
    """Conv weight (shape of w0 [Cout, Cin/group, kh, kw]) whose conv of x best matches target
    [N, Cout, H', W'], for the geometry and group in attrs; ridge toward w0. Plain, grouped and
    depthwise convs (one small problem per group). Without intercept the target must have the
    bias subtracted and the weight is returned; with it, (weight, bias [Cout]) (prior b0)."""
    cout = w0.shape[0]
    groups = int(attrs.get("group", 1) or 1)
    cols = im2col(x, w0.shape[2:], attrs)
    if cols.shape[2:] != target.shape[2:]:
        raise ValueError(f"refit_conv: patches {cols.shape} do not match target {target.shape}")
    f = cols.transpose(0, 2, 3, 1).reshape(-1, cols.shape[1])
    t = target.transpose(0, 2, 3, 1).reshape(-1, cout)
    res = refit_linear(f, t, w0.reshape(cout, -1), groups=groups, ridge=ridge, seed=seed, max_rows=max_rows,
                       b0=b0, intercept=intercept)
    if intercept:
        return res[0].reshape(w0.shape), res[1]
    return res.reshape(w0.shape)


def base_tensor_names(ctx) -> set[str]:
    """Names of the original model's tensors (node outputs and graph inputs), cached per run:
    a repair can only fit to activations the original model computes."""
    names = ctx.cache.get("base_tensor_names")
    if names is None:
        g = ctx.base_model.graph
        names = ctx.cache["base_tensor_names"] = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    return names
