"""report.json (and best.onnx, the compiled artifact) from the run store's records."""

from __future__ import annotations

import logging
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EXIT_INFEASIBLE, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNREACHABLE
from .outputs import atomic_write_bytes, atomic_write_json
from .pareto import front_ids
from .plugin import Target

if TYPE_CHECKING:
    from .driver import Search
    from .store import Record

log = logging.getLogger("graphopt")

REPORT_VERSION = 1
# fidelities of exact rewrites differ by ~1e-13 (float noise): compare at this step on the front
FRONT_RESOLUTION = {"fidelity": 1e-9}


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
    return {"median_ms": lat["median_ms"], "spread": {k: lat[k] for k in ("min_ms", "max_ms", "mean_ms", "stdev_ms")},
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


def moves(search: "Search", rec: "Record") -> list[dict[str, Any]]:
    out = []
    for key, choice in rec.genotype.items():
        site = search.space.site(key) if key in search.space else None
        out.append({"site": key, "pass": site.pass_name if site else key.split(":", 1)[0], "choice": choice,
                    "nodes": list(site.nodes) if site else [], "note": site.note if site else "",
                    "result": rec.applied.get(key)})
    return out


def _device_check(records: list["Record"]) -> dict[str, Any]:
    """{"device_check": ...} when a target compared device outputs with onnxruntime (rpi4), else {}."""
    from graphopt.targets.device_check import summarize

    d = summarize(records)
    return {"device_check": d} if d else {}


def build_report(search: "Search", records: list["Record"], best: "Record | None") -> dict[str, Any]:
    cfg = search.cfg
    base = next((r for r in records if not r.genotype), None)
    best_lat = _latency_block(best)
    base_lat = _latency_block(base)
    methods = sorted({r.measurement["method"] for r in records if r.measurement})
    tuned = list({r.measurement["tuned"] for r in records if r.measurement})
    speedup = (base.latency_ms / best.latency_ms) if (best and base and base.latency_ms and best.latency_ms) else None
    statuses = {s: sum(1 for r in records if r.status == s) for s in ("ok", "infeasible", "failed")}
    if search.stopped_because.startswith("target unreachable"):
        status = "unreachable"
    elif best is None:
        status = "infeasible"
    elif search.stopped_because == "interrupted":
        status = "interrupted"
    else:
        status = "ok"
    target_desc = search.target.describe()
    return {
        "report_version": REPORT_VERSION,
        "status": status,
        "model": {"path": str(cfg.model), "sha256": search.base.sha256,
                  "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)} for s in search.base.inputs],
                  "outputs": search.base.output_names, "nodes": len(search.base.proto.graph.node),
                  "defaulted_dims": search.base.defaulted_dims, "load_notes": search.base.notes},
        "target": target_desc,
        "latency_method": methods[0] if len(methods) == 1 else (methods or None),
        "tuned": tuned[0] if len(tuned) == 1 else (None if not tuned else "mixed"),
        "baseline": ({"candidate_id": base.id, "status": base.status, "error": base.error, **(base_lat or {})}
                     if base else None),
        "best": ({"candidate_id": best.id, "is_original": not best.genotype, "genotype": dict(best.genotype),
                  "moves": moves(search, best), "fidelity": best.fidelity, **(best_lat or {})} if best else None),
        "speedup": speedup,
        "pareto_front": sorted(front_ids(records, resolution=FRONT_RESOLUTION)),
        "constraints": {"min_fidelity": search.min_required, "max_drop": cfg.max_drop,
                        "max_size_mb": cfg.max_size_mb, "max_latency_ms": cfg.max_latency_ms},
        "fidelity": {"metric": search.checker.metric, "min_required": search.min_required,
                     "definition": search.checker.metric_obj.description, "units": search.checker.metric_obj.units,
                     "basis": search.checker.metric_obj.basis(search.checker.labels),  # e.g. soft labels vs labels
                     "original": search.checker.reference_value, "max_drop": cfg.max_drop,
                     "best": best.fidelity if best else None,
                     "data": "synthetic" if search.data.synthetic else search.data.source.removeprefix("file:"),
                     "synthetic": search.data.synthetic, "samples": search.fidelity_data.num_samples,
                     "repair_fit_samples": search.fit_samples,
                     "how": ("onnxruntime outputs of each candidate vs the original on the select split"
                             + (" (disjoint from the fit split that moves are fit to)" if search.fit_samples else "")
                             + ("; inputs were SYNTHETIC (random, from the declared types and shapes): "
                                "pass --data for real calibration data" if search.data.synthetic else ""))},
        "search": {"strategy": cfg.strategy, "seed": cfg.seed, "budget": search.cfg.budget.describe(),
                   "passes": list(cfg.passes), "stopped_because": search.stopped_because,
                   "resumed": search.resumed,
                   "space": {"sites": len(search.space), "log10_genotypes": round(search.space.log10_size(), 3),
                             "sites_per_pass": {k: len(v) for k, v in search.space.by_pass().items()}},
                   "candidates": {"total_in_store": len(records), "tried_this_run": search.counts["new"]
                                  + search.counts["cached"], **search.counts, "by_status": statuses}},
        "tuning": tuning_summary(records),
        **_device_check(records),
        "wall_time_s": round(time.monotonic() - search.t_start, 3),
        "timings_s": {k: round(v, 3) for k, v in search.timings.items()},
        "versions": versions(),
        "outputs": {},
    }


def write_outputs(search: "Search", report: dict[str, Any], best: "Record | None") -> int:
    """best.onnx, the target's artifact and report.json, each written atomically."""
    from .materialize import materialize

    out = search.out
    outputs = report["outputs"]
    outputs["store"] = str(search.store.path)
    if best is not None:
        if not best.genotype and search.base.path is not None:
            data = search.base.path.read_bytes()  # the original file, byte for byte
        else:
            model, _ = materialize(search.base, search.space, best.genotype, search.passes, search.ctx)
            data = model.SerializeToString()
        outputs["best_onnx"] = str(atomic_write_bytes(out / "best.onnx", data))
        if type(search.target).export is not Target.export:
            try:
                outputs["artifact"] = [str(p) for p in _export_artifact(search, best)]
            except Exception as e:  # the report still says what was found
                outputs["artifact_error"] = f"{type(e).__name__}: {e}"
                log.warning("could not export the compiled artifact: %s", e)
    outputs["report"] = str(out / "report.json")
    outputs["html"] = str(out / "report.html")
    atomic_write_json(out / "report.json", report)
    write_html(out, report, search.store.records())
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


def _export_artifact(search: "Search", best: "Record") -> list[Path]:
    return search.target.export(search.artifact_for(best), search.out)
