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
