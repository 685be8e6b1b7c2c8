"""Calibration data and fidelity: how closely a candidate computes what the original computes.

Fidelity is measured with onnxruntime on the `select` split (graphopt.evaluation.data), before any compile.
Similarity metrics (all "higher is better", 1.0 = identical; the minimum over outputs):
  channel (default) per output, per channel (see channel_axis), 1 - ||cand_c - orig_c||^2 / scale_c
          where scale_c = max(||orig_c||^2, median over the output's channels of ||orig_k||^2);
          the worst channel. Each channel is judged on its own scale (so 4 box coordinates in
          pixels cannot hide 80 dead class scores), with the typical channel's energy as a floor
          (so a channel that is almost always ~0 is not failed by noise that is tiny next to its
          peers). 1 - noise/signal power, i.e. an SQNR: 0.99 = 20 dB, 0.999 = 30 dB.
  cosine  mean over samples of the cosine similarity of each flattened output with the
          original's. Dominated by the largest-valued channels of an output.
  top1    fraction of samples whose argmax over the last axis agrees with the original's
          (classifier logits).
  rel_l2  1 - ||candidate - original|| / ||original|| per sample, averaged (clipped at 0).
Integer or boolean outputs are compared for exact equality (fraction of equal elements). A shape
mismatch scores 0; a non-finite candidate value where the original is finite scores 0.
Task metrics (ImageNet top-1, STS-B Spearman, plugins) live in graphopt.evaluation.metrics.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .data import CalibrationData, Dataset, load_data  # noqa: F401 (CalibrationData, load_data: re-exported)
from ..errors import ModelError
from ..modelio.ir import InputSpec

if TYPE_CHECKING:
    import onnx

METRICS = ("channel", "cosine", "top1", "rel_l2")  # similarity metrics (graphopt.evaluation.metrics has all)


def synthetic_data(inputs: list[InputSpec], model: "onnx.ModelProto", samples: int = 8,
                   seed: int = 0) -> CalibrationData:
    """Inputs drawn from the declared types and shapes.

    Floats ~ N(0, 1). Integers are kept in a safe range: if the input indexes an embedding
    table (a Gather whose data is an initializer), in [0, table rows); otherwise in [0, 2).
    """
    rng = np.random.default_rng(seed)
    bounds = _index_bounds(model)
    out = {}
    for spec in inputs:
        shape = (samples, *spec.shape)
        if np.issubdtype(spec.dtype, np.floating):  # drawn in the model's dtype: no float64 copy of a big input
            draw = spec.dtype if spec.dtype in (np.float32, np.float64) else np.float32
            out[spec.name] = rng.standard_normal(shape, dtype=draw).astype(spec.dtype, copy=False)
        elif spec.dtype == np.bool_:
            out[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif np.issubdtype(spec.dtype, np.integer):
            hi = bounds.get(spec.name, 2)
            draw = spec.dtype if np.iinfo(spec.dtype).max >= hi else np.int64
            out[spec.name] = rng.integers(0, hi, size=shape, dtype=draw).astype(spec.dtype, copy=False)
        else:
            raise ModelError(f"input {spec.name!r} has dtype {spec.dtype}, which graphopt cannot synthesize; "
                             "pass real inputs with --data")
    return CalibrationData(out, "synthetic")


def _index_bounds(model: "onnx.ModelProto") -> dict[str, int]:
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) >= 2 and node.input[0] in inits:
            rows = inits[node.input[0]][0] if inits[node.input[0]] else 0
            if rows:
                bounds[node.input[1]] = min(bounds.get(node.input[1], rows), rows)
    return bounds


def _session(model: "onnx.ModelProto", threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_model(model: "onnx.ModelProto", data: Dataset) -> list[list[np.ndarray]]:
    """Outputs per sample: result[i][j] = output j of sample i."""
    sess = _session(model)
    return [sess.run(None, data.sample(i)) for i in range(data.num_samples)]


def stack_outputs(per_sample: list[list[np.ndarray]], names: list[str]) -> dict[str, np.ndarray | list]:
    """Output name -> [samples, *shape] (a list of arrays when the shapes differ between samples)."""
    out: dict[str, np.ndarray | list] = {}
    for j, name in enumerate(names):
        arrs = [np.asarray(r[j]) for r in per_sample]
        try:
            out[name] = np.stack(arrs) if arrs else np.zeros((0,))
        except ValueError:
            out[name] = arrs
    return out


@dataclass
class Fidelity:
    value: float
    metric: str
    per_output: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"value": self.value, "metric": self.metric, "per_output": self.per_output}


def compare(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]], names: list[str],
            metric: str) -> Fidelity:
    """Per-sample outputs of the original and a candidate -> a similarity Fidelity."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    value, per_output = similarity(stack_outputs(reference, names), stack_outputs(candidate, names), metric)
    return Fidelity(value, metric, per_output)


def similarity(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], metric: str
               ) -> tuple[float, dict[str, float]]:
    """(worst output's score, per output) for a similarity metric on stacked outputs."""
    per_output = {}
    for name, ref in reference.items():
        cand = candidate.get(name)
        if cand is None:
            per_output[name] = 0.0
        elif metric == "channel":
            per_output[name] = channel_score(ref, cand)
        else:
            refs, cands = list(ref), list(cand)
            per_output[name] = 0.0 if len(refs) != len(cands) else _score_output(refs, cands, metric)
    return (min(per_output.values()) if per_output else 1.0), per_output


def channel_axis(sample_shape: tuple[int, ...]) -> int | None:
    """The channel axis of one sample's output: none for a scalar; the features of [F] and [B, F];
    for [B, A, C] the shorter of A and C (a detector's [1, 84, anchors] or [1, anchors, 85], a
    transformer's [1, tokens, hidden]) -- channel_score judges [B, A, C] along both A and C and
    keeps the worse, so a layout the guess gets wrong is still covered; axis 1 for rank >= 4 (NCHW)."""
    r = len(sample_shape)
    if r == 0:
        return None
    if r == 1:
        return 0
    if r == 2:
        return 1
    if r == 3:
        return 1 if sample_shape[1] <= sample_shape[2] else 2
    return 1


def channel_score(ref, cand) -> float:
    """The `channel` metric on one output, stacked [samples, *shape]. See the module doc."""
    if isinstance(ref, list) or isinstance(cand, list):  # ragged: per sample, the worst
        if len(ref) != len(cand) or not len(ref):
            return 0.0 if len(ref) != len(cand) else 1.0
        return min(channel_score(np.asarray(r)[None], np.asarray(c)[None]) for r, c in zip(ref, cand))
    r, c = np.asarray(ref), np.asarray(cand)
    if r.shape != c.shape:
        return 0.0
    if r.size == 0:
        return 1.0
    if not np.issubdtype(r.dtype, np.floating):
        return float(np.mean(r == c))
    r64, c64 = r.astype(np.float64), c.astype(np.float64)
    fin_r, fin_c = np.isfinite(r64), np.isfinite(c64)
    if np.any(fin_r & ~fin_c):
        return 0.0
    if not np.all(fin_r):  # where the original is inf/nan the candidate must be the same
        same = np.where(np.isnan(r64), np.isnan(c64), r64 == c64)
        if not np.all(same[~fin_r]):
            return 0.0
        r64, c64 = np.where(fin_r, r64, 0.0), np.where(fin_r, c64, 0.0)
    ax = channel_axis(r.shape[1:])
    axes = [ax] if len(r.shape) != 4 else [1, 2]  # [B, A, C]: both axes, the worst (layout unknown)
    return min(_channel_fid(r64, c64, a) for a in axes)


def _channel_fid(r64: np.ndarray, c64: np.ndarray, ax: int | None) -> float:
    if ax is None:
        rc, cc = r64.reshape(1, -1), c64.reshape(1, -1)
    else:
        rc = np.moveaxis(r64, ax + 1, 0).reshape(r64.shape[ax + 1], -1)
        cc = np.moveaxis(c64, ax + 1, 0).reshape(r64.shape[ax + 1], -1)
    energy = np.mean(rc * rc, axis=1)
    err = np.mean((cc - rc) ** 2, axis=1)
    scale = np.maximum(energy, np.median(energy))
    with np.errstate(divide="ignore", invalid="ignore"):
        fid = np.where(scale > 0, 1.0 - err / np.where(scale > 0, scale, 1.0), np.where(err > 0, 0.0, 1.0))
    return float(np.clip(np.min(fid), 0.0, 1.0))


def _score_output(refs: list[np.ndarray], cands: list[np.ndarray], metric: str) -> float:
    vals = []
    for r, c in zip(refs, cands):
        r = np.asarray(r)
        c = np.asarray(c)
        if r.shape != c.shape:
            return 0.0
        if metric == "channel":
            vals.append(channel_score(r[None], c[None]))
            continue
        if not np.issubdtype(r.dtype, np.floating):
            vals.append(float(np.mean(r == c)) if r.size else 1.0)
            continue
        r64 = r.astype(np.float64).ravel()
        c64 = c.astype(np.float64).ravel()
        if not np.all(np.isfinite(c64)):
            return 0.0
        if metric == "cosine":
            nr, nc = np.linalg.norm(r64), np.linalg.norm(c64)
            if nr == 0 and nc == 0:
                vals.append(1.0)
            elif nr == 0 or nc == 0:
                vals.append(0.0)
            else:
                vals.append(float(np.dot(r64, c64) / (nr * nc)))
        elif metric == "rel_l2":
            nr = np.linalg.norm(r64)
            err = np.linalg.norm(c64 - r64) / nr if nr > 0 else float(np.linalg.norm(c64) > 0)
            vals.append(max(0.0, 1.0 - float(err)))
        else:  # top1 over the last axis
            if r.ndim == 0:
                vals.append(float(r == c))
            else:
                vals.append(float(np.mean(np.argmax(r, axis=-1) == np.argmax(c, axis=-1))))
    return float(np.mean(vals)) if vals else 1.0
