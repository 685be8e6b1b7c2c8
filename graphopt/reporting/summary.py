"""The summary `graphopt run` prints (without --json): one line per fact of report.json."""

from __future__ import annotations

from typing import Any


def _untuned(block: dict[str, Any]) -> str:
    """The summary's tag for code not fully tuned: how much of it, when the build's tuning stats say."""
    t = (block.get("notes") or {}).get("tuning") or {}
    n, seen = t.get("workloads_untuned") or 0, t.get("workloads_seen") or 0
    if 0 < n < seen:
        return f", PARTLY UNTUNED ({n} of {seen} workloads on TVM's default schedules: {t.get('stopped_because', '')})"
    return ", UNTUNED"


def _tag(rep: dict[str, Any], block: dict[str, Any]) -> str:
    """How a line's latency was obtained: the method, and whether that build (original or best) was tuned."""
    tuned = block.get("tuned", rep.get("tuned"))
    tag = f"{rep.get('latency_method')}" + ("" if tuned is None else (
        ", tuned" if tuned is True else _untuned(block) if tuned is False else ", partly tuned"))
    return tag + (f", {rep['latency_over'].removeprefix('latency: ')}" if rep.get("latency_over") else "")


def summary(rep: dict[str, Any]) -> str:
    lines = [f"status: {rep['status']} ({rep['search']['stopped_because']})"]
    if rep.get("why"):  # exit 3: which constraint left nothing
        lines.append(f"why: {rep['why']}")
    base, best = rep.get("baseline"), rep.get("best")
    if base and base.get("median_ms") is not None:
        lines.append(f"original: {base['median_ms']:.3f} ms ({_tag(rep, base)}, spread {base['spread']['min_ms']:.3f}-"
                     f"{base['spread']['max_ms']:.3f} ms)")
    elif base:
        lines.append(f"original: {base['status']}: {base.get('error')}")
    if best:
        what = "the original model" if best["is_original"] else f"{len(best['moves'])} moves"
        speedup = f"speedup x{rep['speedup']:.3f}" if rep.get("speedup") is not None else \
            "speedup unknown (the original was not measured)"
        if rep.get("search_speedup") is not None:
            speedup += (f" (confirmed in {rep['confirmed']['rounds']} alternating rounds; "
                        f"the search's: x{rep['search_speedup']:.3f})")
        lines.append(f"best: {best['median_ms']:.3f} ms ({_tag(rep, best)}), {what}, {speedup}, "
                     f"fidelity {rep['fidelity']['metric']} {best['fidelity']:.6f}"
                     + (" (synthetic data)" if rep["fidelity"]["synthetic"] else ""))
    from ..evaluation.quality import summary_lines

    lines.extend(summary_lines(rep))
    conf = rep.get("confirmed")
    if conf:
        lines.append(f"confirm: original {conf['original_ms']:.3f} ms vs candidate {conf.get('candidate_id', '?')} "
                     f"{conf['best_ms']:.3f} ms over "
                     f"{conf['rounds']} {'fresh ' if conf.get('selection') else ''}alternating rounds "
                     f"(x{conf['speedup']:.3f}): {conf.get('verdict', '')}")
    from graphopt.targets.device_check import summary_line

    from .ort_reference import summary_line as reference_line

    lines.extend(line for line in (summary_line(rep), reference_line(rep)) if line)
    for r in rep.get("recovery") or []:  # graphopt.recovery.recover: quality before and after distillation
        after = r.get("fidelity_after")
        lines.append(f"recover: candidate {r['parent_id']} {rep['fidelity']['metric']} {r['fidelity_before']:.6f} -> "
                     + (f"{after:.6f} (candidate {r['candidate_id']}, {r.get('status_after')})" if after is not None
                        else r.get("error") or r.get("note", "-")))
    c = rep["search"]["candidates"]
    lines.append(f"candidates: {c['tried_this_run']} this run ({c['new']} new, {c['cached']} from the store), "
                 f"{c['failed']} failed, {c['infeasible']} below --min-fidelity; {c['total_in_store']} in the store")
    for k in ("best_onnx", "artifact", "report"):
        if rep["outputs"].get(k):
            lines.append(f"{k}: {rep['outputs'][k]}")
    return "\n".join(lines)
