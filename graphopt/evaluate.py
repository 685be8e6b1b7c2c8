"""Calibration data and fidelity: how closely a candidate computes what the original computes.

Fidelity is measured with onnxruntime on calibration inputs (cheap, done before any compile).
Metrics, all "higher is better", 1.0 = identical:
  cosine  mean over samples of the cosine similarity of each flattened output with the
          original's; the minimum over outputs.
  top1    fraction of samples whose argmax over the last axis agrees with the original's
          (classifier logits); the minimum over outputs.
  rel_l2  1 - ||candidate - original|| / ||original|| per sample, averaged; the minimum over
          outputs (clipped at 0).
Integer or boolean outputs are compared for exact equality (fraction of equal elements).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError, ModelError
from .ir import InputSpec

if TYPE_CHECKING:
    import onnx

METRICS = ("cosine", "top1", "rel_l2")


@dataclass
class CalibrationData:
    """Input name -> array of shape [samples, *input_shape]."""

    arrays: dict[str, np.ndarray]
    source: str  # "file:<path>" or "synthetic"

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic"

    @property
    def num_samples(self) -> int:
        return next(iter(self.arrays.values())).shape[0] if self.arrays else 0

    def sample(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i, ...] for k, v in self.arrays.items()}  # [i, ...]: a 0-d array for a scalar input, not a numpy scalar

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.arrays):
            a = np.ascontiguousarray(self.arrays[k])
            h.update(k.encode())
            h.update(str(a.dtype).encode())
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()


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
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise DataError(f"--data {path}: keys {sorted(arrays)} do not match the model's inputs {names}"
                        + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else ""))
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
    return CalibrationData(out, f"file:{path}")


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


def run_model(model: "onnx.ModelProto", data: CalibrationData) -> list[list[np.ndarray]]:
    """Outputs per sample: result[i][j] = output j of sample i."""
    sess = _session(model)
    return [sess.run(None, data.sample(i)) for i in range(data.num_samples)]


@dataclass
class Fidelity:
    value: float
    metric: str
    per_output: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"value": self.value, "metric": self.metric, "per_output": self.per_output}


def compare(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]], names: list[str],
            metric: str) -> Fidelity:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    per_output = {}
    for j, name in enumerate(names):
        refs = [r[j] for r in reference]
        cands = [c[j] for c in candidate]
        per_output[name] = _score_output(refs, cands, metric)
    return Fidelity(min(per_output.values()) if per_output else 1.0, metric, per_output)


def _score_output(refs: list[np.ndarray], cands: list[np.ndarray], metric: str) -> float:
    vals = []
    for r, c in zip(refs, cands):
        r = np.asarray(r)
        c = np.asarray(c)
        if r.shape != c.shape:
            return 0.0
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
    """Runs the original once on the calibration data; scores candidates against it."""

    def __init__(self, base: "onnx.ModelProto", data: CalibrationData, metric: str = "cosine"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}")
        self.metric = metric
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

    def score(self, candidate: "onnx.ModelProto") -> Fidelity:
        outs = run_model(candidate, self.data)
        names = [o.name for o in candidate.graph.output]
        if names != self.output_names:
            raise ValueError(f"candidate outputs {names} differ from the original's {self.output_names}")
        return compare(self.reference, outs, self.output_names, self.metric)
