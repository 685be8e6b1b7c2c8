"""Checking a remote device's outputs against onnxruntime on this host (the rpi4 target's device check).

A cross-compiled artifact can load and run on a device and still compute the wrong thing (a
wrong -mcpu/NEON assumption, a miscompiled kernel): timing it says nothing about that. For each
candidate, the outputs of one run on the device are compared with onnxruntime's for the same
candidate graph and the same inputs, here. The record says what was compared and how close it
was (Measurement.extra["device_check"]); a mismatch is a RuntimeError, so the candidate fails and
the run goes on.

Importing this module does not import tvm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TOLERANCE = 1e-3       # max |device - onnxruntime| / max(1, max |onnxruntime|), float graphs
TOLERANCE_QDQ = 5e-2   # QDQ graphs: onnxruntime runs int8 kernels, TVM fake-quantizes in float
HOW = ("outputs of one run on the device vs onnxruntime (CPUExecutionProvider) on this host, same candidate graph "
       "and inputs: max |device - onnxruntime| / max(1, max |onnxruntime|) within the tolerance")


def emulated(cfg) -> str | None:
    """What the device says when it is an emulator (tests/emulated_pi.py registers
    `graphopt.emulated` on it), else None (a real device has no such function)."""
    from . import rpc

    def ask(sess):
        try:
            f = sess.get_function("graphopt.emulated")
        except Exception:  # noqa: BLE001 - a real device: no such function
            return None
        return str(f()) if f is not None else None

    return rpc.with_session(cfg, ask, "query")


def save_reference(model, workdir: Path) -> Path:
    """The candidate graph, kept for the check (the artifact alone cannot be run here)."""
    import onnx

    path = Path(workdir) / "reference.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _is_qdq(model) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def compare(artifact, inputs: Mapping[str, Any], device_outputs: Sequence[Any], tolerance: float | None,
            where: str, emulated: str | None = None) -> dict[str, Any]:
    """The check's record; raises RuntimeError when the device's outputs differ from onnxruntime's."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    path = artifact.info.get("reference_onnx")
    if not path or not Path(path).exists():
        raise RuntimeError("device check: the candidate's graph was not kept (reference_onnx); rerun it")
    model = onnx.load(str(path))
    tol = tolerance if tolerance is not None else (TOLERANCE_QDQ if _is_qdq(model) else TOLERANCE)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.asarray(inputs[i.name]) for i in sess.get_inputs()}
    want = sess.run(None, feed)
    got = list(device_outputs)
    if len(got) != len(want):
        raise RuntimeError(f"device check on {where}: the device returned {len(got)} outputs, onnxruntime "
                           f"{len(want)}")
    per_output = []
    worst = 0.0
    for o, g, w in zip(sess.get_outputs(), got, want):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape:
            raise RuntimeError(f"device check on {where}: output {o.name!r} has shape {list(g.shape)} on the device, "
                               f"{list(w.shape)} in onnxruntime")
        if np.issubdtype(w.dtype, np.floating) and not np.all(np.isfinite(g) == np.isfinite(w)):
            err = float("inf")
        else:
            fin = np.isfinite(w) if np.issubdtype(w.dtype, np.floating) else np.ones(w.shape, bool)
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))[fin]
            err = float(diff.max()) if diff.size else 0.0
        scale = max(1.0, float(np.abs(w.astype(np.float64)).max()) if w.size else 1.0)
        per_output.append({"name": o.name, "max_abs_err": err, "scale": scale})
        worst = max(worst, err / scale)
    rec = {"ok": worst <= tol, "max_scaled_err": worst, "tolerance": tol, "outputs": per_output, "device": where,
           "how": HOW}
    if emulated:
        rec["emulated"] = emulated
    if not rec["ok"]:
        name = max(per_output, key=lambda d: d["max_abs_err"] / d["scale"])["name"]
        raise RuntimeError(f"device check on {where}: the device's outputs differ from onnxruntime's (output {name!r}: "
                           f"max |device - onnxruntime| / scale = {worst:.3g} > {tol:g}): the aarch64 code computes "
                           f"something else; if the difference is expected, raise --target-opt check_tol=T or turn "
                           f"the check off with --target-opt check=0")
    return rec


def summarize(records) -> dict[str, Any] | None:
    """The run's device checks (report.json "device_check"): how many candidates' device outputs
    matched onnxruntime's, the worst scaled error, and how many failed the check. None if none ran."""
    checks = [r.measurement["extra"]["device_check"] for r in records
              if r.measurement and isinstance(r.measurement.get("extra", {}).get("device_check"), dict)]
    failed = [r.id for r in records if r.status == "failed" and "device check on" in (r.error or "")]
    if not checks and not failed:
        return None
    out = {"checked": len(checks) + len(failed), "matched": sum(1 for c in checks if c.get("ok")),
           "failed_candidates": failed, "worst_scaled_err": max((c["max_scaled_err"] for c in checks), default=None),
           "tolerance": max((c["tolerance"] for c in checks), default=None),
           "device": checks[0]["device"] if checks else None, "how": HOW}
    if any(c.get("emulated") for c in checks):
        out["emulated"] = next(c["emulated"] for c in checks if c.get("emulated"))
    return out


def summary_line(rep: dict[str, Any]) -> str | None:
    """One line for the CLI summary, from report.json's "device_check"."""
    d = rep.get("device_check")
    if not d:
        return None
    where = d.get("device") or "the device"
    if d["tolerance"] is None:  # every check failed
        return f"device check: the outputs of {d['checked']} candidates differed from onnxruntime's (see their errors)"
    emulated = " (emulated Cortex-A72)" if d.get("emulated") else ""
    failed = f", {len(d['failed_candidates'])} failed it" if d["failed_candidates"] else ""
    return (f"device check: {d['matched']} of {d['checked']} candidates' outputs on {where}{emulated} matched "
            f"onnxruntime's (worst scaled error {d['worst_scaled_err']:.2g}, tolerance {d['tolerance']:g}){failed}")
