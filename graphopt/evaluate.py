"""Calibration data and fidelity: how closely a candidate computes what the original computes.

Fidelity is measured with onnxruntime on the `select` split (graphopt.data), before any compile.
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
Task metrics (ImageNet top-1, STS-B Spearman, plugins) live in graphopt.metrics.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .data import ArrayData, Dataset, labels_of, sample_ids
from .errors import DataError, ModelError
from .ir import InputSpec

if TYPE_CHECKING:
    import onnx

METRICS = ("channel", "cosine", "top1", "rel_l2")  # similarity metrics (graphopt.metrics has all)


class CalibrationData(ArrayData):
    """Input name -> array of shape [samples, *input_shape] (+ optional per-sample labels, extras)."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str, labels=None, extras=None):
        super().__init__(arrays, source, labels=labels, extras=extras)


def load_data(path: str | Path, inputs: list[InputSpec]) -> CalibrationData:
    """Read an .npz keyed by input name with a leading sample axis; check it against the model."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"--data {path}: not a readable .npz file ({type(e).__name__}: {e}); "
                        "write one with numpy.savez(path, **{input_name: array})") from None
    names = [s.name for s in inputs]
    labels = arrays.pop("labels", None) if "labels" not in names else None
    extras = {k[len("extra_"):]: arrays.pop(k) for k in list(arrays) if k.startswith("extra_") and k not in names}
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise DataError(f"--data {path}: keys {sorted(arrays)} do not match the model's inputs {names}"
                        + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra}; per-sample "
                           "labels go under 'labels', dataset-level extras under 'extra_<name>')" if extra else ""))
    n = None
    out = {}
    for spec in inputs:
        a = arrays[spec.name]
        if a.shape[1:] != spec.shape:
            hint = ""
            if a.shape == spec.shape:
                hint = "; it has no sample axis: stack samples as array[None] for one sample"
            raise DataError(f"--data {path}: {spec.name!r} has shape {list(a.shape)}, expected "
                            f"[samples, {', '.join(map(str, spec.shape))}]{hint}")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise DataError(f"--data {path}: inputs have different sample counts ({n} vs {a.shape[0]} for {spec.name!r})")
        if a.dtype != spec.dtype:
            if np.can_cast(a.dtype, spec.dtype, casting="same_kind"):
                a = a.astype(spec.dtype)
            else:
                raise DataError(f"--data {path}: {spec.name!r} has dtype {a.dtype}, the model expects {spec.dtype}")
        out[spec.name] = a
    if not n:
        raise DataError(f"--data {path}: no samples (leading axis is 0)")
    if labels is not None and len(labels) != n:
        raise DataError(f"--data {path}: 'labels' has {len(labels)} entries for {n} samples")
    return CalibrationData(out, f"file:{path}", labels=labels, extras=extras)


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


class FidelityChecker:
    """Runs the original once on the data (the select split); scores candidates against it with a
    metric (a name or a graphopt.metrics.Metric), passing labels and extras when the data has them.
    `reference_value`: the original's own score (1.0 for a similarity metric; its accuracy for a
    task metric), the base of --max-drop."""

    def __init__(self, base: "onnx.ModelProto", data: Dataset, metric="channel"):
        from .metrics import resolve_metric

        self.metric_obj = resolve_metric(metric)
        self.metric = self.metric_obj.name
        self.data = data
        self.output_names = [o.name for o in base.graph.output]
        try:
            self.reference = run_model(base, data)
        except Exception as e:  # the original itself fails on these inputs: the data's fault, not a candidate's
            from .errors import DataError

            text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:400]
            raise DataError(f"onnxruntime cannot run the original model on the {data.source} inputs ({text}); "
                            + ("synthetic inputs are random values of the declared types and shapes, which this "
                               "model does not accept: pass real inputs with --data" if data.synthetic else
                               "check that --data holds valid inputs for the model")) from None
        self._ref_stacked = stack_outputs(self.reference, self.output_names)
        self.labels = labels_of(data)
        self.extras = dict(getattr(data, "extras", {}) or {}, sample_ids=sample_ids(data))
        self.reference_value = self.metric_obj(self._ref_stacked, self._ref_stacked, self.labels, self.extras)[0]

    def score_outputs(self, outs: list[list[np.ndarray]]) -> Fidelity:
        value, per_output = self.metric_obj(self._ref_stacked, stack_outputs(outs, self.output_names),
                                            self.labels, self.extras)
        return Fidelity(value, self.metric, per_output)

    def score(self, candidate: "onnx.ModelProto") -> Fidelity:
        names = [o.name for o in candidate.graph.output]
        if names != self.output_names:
            raise ValueError(f"candidate outputs {names} differ from the original's {self.output_names}")
        return self.score_outputs(run_model(candidate, self.data))
