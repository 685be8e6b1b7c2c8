"""report.json (and best.onnx, the compiled artifact) from the run store's records."""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import EXIT_INFEASIBLE, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREACHABLE
from ..runstore.outputs import atomic_write_bytes, atomic_write_json, atomic_write_model
from .pareto import front_ids

if TYPE_CHECKING:
    import onnx

    from ..genotype import SearchSpace
    from ..modelio.ir import LoadedModel
    from ..runstore.store import Record

log = logging.getLogger("graphopt")

REPORT_VERSION = 1
# fidelities of exact rewrites differ by ~1e-13 (float noise): compare at this step on the front
FRONT_RESOLUTION = {"fidelity": 1e-9}


@dataclass(frozen=True)
class RunSummary:
    """What report.json says about a run besides its records: plain values the search hands over
    at its end (graphopt.conclude), so the report never reads the Search itself."""

    config: Any  # the RunConfig (graphopt.config)
    base: "LoadedModel"
    space: "SearchSpace"
    target: dict[str, Any]  # Target.describe()
    stopped_because: str
    resumed: bool
    min_required: float
    metric: str  # the gate's metric: name, definition, units, the original's own value
    metric_description: str
    metric_units: str
    metric_basis: Any  # Metric.basis(labels): what the gate's metric measured on this data
    reference_value: float
    data_synthetic: bool
    data_source: str
    select_samples: int
    fit_samples: int
    counts: dict[str, int]
    timings: dict[str, float]
    wall_time_s: float
    latency_over: str | None = None  # graphopt.timing: which samples each latency was measured over
    not_applicable: dict[str, str] | None = None  # passes dropped for this target, and why


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in (("graphopt", "graphopt"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
                      ("onnx_graphsurgeon", "onnx-graphsurgeon"), ("tvm", "apache-tvm"), ("numpy", "numpy")):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    return out


def _latency_block(rec: "Record | None") -> dict[str, Any] | None:
    if rec is None or rec.measurement is None:
        return None
    m = rec.measurement
    lat = m["latency"]
    f = ((m.get("extra") or {}).get("paired") or {}).get("factor", 1.0)  # paired timing: in the original's window
    return {"median_ms": lat["median_ms"] * f,
            "spread": {k: lat[k] * f for k in ("min_ms", "max_ms", "mean_ms", "stdev_ms")},
            "repeats": lat["repeats"], "runs_per_repeat": lat["runs_per_repeat"], "method": m["method"],
            "tuned": m["tuned"], "threads": m.get("threads"), "device": m.get("device"),
            "notes": m.get("extra", {})}


def tuning_summary(records: list["Record"]) -> dict[str, Any] | None:
    """Per-run totals of the TVM targets' tuning stats (None when no candidate was tuned).

    Workload counts are summed over candidates: a workload shared by 10 candidates is seen 10
    times, tuned at most once, reused the other times.
    """
    stats = [r.measurement.get("extra", {}).get("tuning") for r in records if r.measurement]
    stats = [t for t in stats if t]
    if not stats:
        return None
    keys = ("workloads_seen", "workloads_reused", "workloads_tuned", "workloads_untuned", "trials")
    out: dict[str, Any] = {k: sum(int(t.get(k, 0)) for t in stats) for k in keys}
    out["tuning_s"] = round(sum(float(t.get("tuning_s", 0.0)) for t in stats), 3)
    out["candidates"] = len(stats)
    out["candidates_partly_untuned"] = sum(1 for t in stats if t.get("partly_untuned"))
    out["trials_per_workload"] = stats[-1].get("trials_per_task")
    out["db"] = stats[-1].get("db")
    seen = out["workloads_seen"]
    out["reuse_ratio"] = round(out["workloads_reused"] / seen, 4) if seen else None
    return out


def moves(space: "SearchSpace", rec: "Record") -> list[dict[str, Any]]:
    out = []
    for key, choice in rec.genotype.items():
        site = space.site(key) if key in space else None
        out.append({"site": key, "pass": site.pass_name if site else key.split(":", 1)[0], "choice": choice,
                    "nodes": list(site.nodes) if site else [], "note": site.note if site else "",
                    "result": rec.applied.get(key)})
    return out


def _device_check(records: list["Record"]) -> dict[str, Any]:
    """{"device_check": ...} when a target compared device outputs with onnxruntime (rpi4), else {}."""
    from graphopt.targets.device_check import summarize

    d = summarize(records)
    return {"device_check": d} if d else {}


def why_infeasible(run: RunSummary, records: list["Record"]) -> str:
    """Exit 3 in words: which constraint left no candidate, the original included."""
    cfg, n = run.config, len(records)
    why: dict[str, int] = {}
    for r in records:  # each candidate's first reason
        if r.status == "failed":
            k = "failed"
        elif r.status == "infeasible":
            k = "size" if (r.error or "").startswith("size") else "gate"
        elif r.fidelity is None or r.fidelity < run.min_required:
            k = "gate"
        elif cfg.max_latency_ms is not None and r.latency_ms is not None and r.latency_ms > cfg.max_latency_ms:
            k = "latency"
        else:
            k = "size"
        why[k] = why.get(k, 0) + 1
    ok = [r.latency_ms for r in records if r.status == "ok" and r.latency_ms is not None]
    sizes = [r.size_bytes for r in records if r.size_bytes is not None]
    base = next((r for r in records if not r.genotype), None)
    words = {
        "gate": f"below the gate {run.metric} >= {run.min_required:.6g}",
        "latency": f"over --max-latency-ms {cfg.max_latency_ms:g} (the fastest: {min(ok):.3f} ms)" if ok else "",
        "size": f"over --max-size-mb {cfg.max_size_mb:g} (the smallest: {min(sizes) / 1e6:.3f} MB)"
        if sizes and cfg.max_size_mb is not None else "over --max-size-mb",
        "failed": "failed to build or run" + (f" (the original: {base.error})" if base is not None
                                                and base.status == "failed" and base.error else ""),
    }
    fix = "loosen the constraint or pass other --passes" if set(why) - {"failed"} else \
        "each candidate's error is in report.html and `graphopt runs OUT_DIR`"
    return "no candidate met every constraint: " + "; ".join(f"{c} of {n} {words[k]}" for k, c in why.items()) \
        + f"; {fix}"


def build_report(run: RunSummary, records: list["Record"], best: "Record | None") -> dict[str, Any]:
    cfg = run.config
    base = next((r for r in records if not r.genotype), None)
    best_lat = _latency_block(best)
    base_lat = _latency_block(base)
    methods = sorted({r.measurement["method"] for r in records if r.measurement})
    tuned = list({r.measurement["tuned"] for r in records if r.measurement})
    speedup = (base.latency_ms / best.latency_ms) if (best and base and base.latency_ms and best.latency_ms) else None
    statuses = {s: sum(1 for r in records if r.status == s) for s in ("ok", "infeasible", "failed")}
    if run.stopped_because.startswith("target unreachable"):
        status = "unreachable"
    elif best is None:
        status = "infeasible"
    elif run.stopped_because == "interrupted":
        status = "interrupted"
    else:
        status = "ok"
    return {
        "report_version": REPORT_VERSION,
        "status": status,
        **({"why": why_infeasible(run, records)} if status == "infeasible" else {}),
        "model": {"path": str(cfg.model), "sha256": run.base.sha256,
                  "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)} for s in run.base.inputs],
                  "outputs": run.base.output_names, "nodes": len(run.base.proto.graph.node),
                  "defaulted_dims": run.base.defaulted_dims, "load_notes": run.base.notes},
        "target": run.target,
        "latency_method": methods[0] if len(methods) == 1 else (methods or None),
        "latency_over": run.latency_over,  # graphopt.timing: which samples were timed
        "not_applicable": run.not_applicable or {},  # passes dropped for this target, and why
        "tuned": tuned[0] if len(tuned) == 1 else (None if not tuned else "mixed"),
        "baseline": ({"candidate_id": base.id, "status": base.status, "error": base.error, **(base_lat or {})}
                     if base else None),
        "best": ({"candidate_id": best.id, "is_original": not best.genotype, "genotype": dict(best.genotype),
                  "moves": moves(run.space, best), "fidelity": best.fidelity, **(best_lat or {})} if best else None),
        "speedup": speedup,
        "pareto_front": sorted(front_ids(records, resolution=FRONT_RESOLUTION)),
        "constraints": {"min_fidelity": run.min_required, "max_drop": cfg.max_drop,
                        "max_size_mb": cfg.max_size_mb, "max_latency_ms": cfg.max_latency_ms},
        "fidelity": {"metric": run.metric, "min_required": run.min_required,
                     "definition": run.metric_description, "units": run.metric_units,
                     "basis": run.metric_basis,  # e.g. soft labels vs labels
                     "original": run.reference_value, "max_drop": cfg.max_drop,
                     "best": best.fidelity if best else None,
                     "data": "synthetic" if run.data_synthetic else run.data_source.removeprefix("file:"),
                     "synthetic": run.data_synthetic, "samples": run.select_samples,
                     "repair_fit_samples": run.fit_samples,
                     "how": ("onnxruntime outputs of each candidate vs the original on the select split"
                             + (" (disjoint from the fit split that moves are fit to)" if run.fit_samples else "")
                             + ("; inputs were SYNTHETIC (random, from the declared types and shapes): "
                                "pass --data for real calibration data" if run.data_synthetic else ""))},
        "search": {"strategy": cfg.strategy, "seed": cfg.seed, "budget": cfg.budget.describe(),
                   "passes": list(cfg.passes), "stopped_because": run.stopped_because,
                   "resumed": run.resumed,
                   "space": {"sites": len(run.space), "log10_genotypes": round(run.space.log10_size(), 3),
                             "sites_per_pass": {k: len(v) for k, v in run.space.by_pass().items()}},
                   "candidates": {"total_in_store": len(records), "tried_this_run": run.counts["new"]
                                  + run.counts["cached"], **run.counts, "by_status": statuses}},
        "tuning": tuning_summary(records),
        **_device_check(records),
        "wall_time_s": run.wall_time_s,
        "timings_s": {k: round(v, 3) for k, v in run.timings.items()},
        "versions": versions(),
        "outputs": {},
    }


def write_outputs(out: Path, report: dict[str, Any], best: "Record | None", records: list["Record"], *,
                  store_path: Path, best_onnx: "bytes | onnx.ModelProto | None",
                  export_artifact: Callable[[], list[Path]] | None = None) -> int:
    """best.onnx (`best_onnx`: the file's bytes, or a ModelProto written self-contained, or past
    protobuf's 2 GB limit with its weights in best.onnx.data next to it), the target's artifact
    (`export_artifact`: writes it, None when the target exports nothing) and report.json, each
    written atomically."""
    outputs = report["outputs"]
    outputs["store"] = str(store_path)
    if best is not None:
        if isinstance(best_onnx, bytes):
            outputs["best_onnx"] = str(atomic_write_bytes(out / "best.onnx", best_onnx))
        else:
            path, data = atomic_write_model(out / "best.onnx", best_onnx)
            outputs["best_onnx"] = str(path)
            if data is not None:
                outputs["best_onnx_data"] = str(data)
        if export_artifact is not None:
            try:
                outputs["artifact"] = [str(p) for p in export_artifact()]
            except Exception as e:  # the report still says what was found
                outputs["artifact_error"] = f"{type(e).__name__}: {e}"
                log.warning("could not export the compiled artifact: %s", e)
    outputs["report"] = str(out / "report.json")
    outputs["html"] = str(out / "report.html")
    atomic_write_json(out / "report.json", report)
    write_html(out, report, records)
    if report["status"] == "unreachable":
        return EXIT_UNREACHABLE
    if best is None:
        return EXIT_INFEASIBLE
    if report["status"] == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_OK


def write_html(out: Path, report: dict[str, Any], records: list["Record"]) -> Path:
    from .html_report import render_html

    page = render_html(report, records, set(report.get("pareto_front") or []))
    return atomic_write_bytes(out / "report.html", page.encode("utf-8"))
