"""The run's data and quality bookkeeping, kept out of the driver: which data feeds which step,
the gate's threshold, the held-out task metric of the original and the best, and their report
blocks (report.json, the terminal summary, report.html).

Rule: held-out data feeds no choice. It is read once, after the search, for the original and
the chosen candidate only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .data import Dataset, Splits, data_dependent_moves, open_data, require_real_data, split_data

if TYPE_CHECKING:
    from ..driver import RunConfig, Search
    from ..modelio.ir import LoadedModel
    from ..runstore.store import Record

log = logging.getLogger("graphopt")


def open_run_data(cfg: "RunConfig", base: "LoadedModel", moves: list[str]) -> tuple[Dataset, Dataset | None, str | None]:
    """(data, eval data, trust warning). Without --data: stop when moves need data (exit 2),
    unless --allow-synthetic (then the warning the report carries)."""
    from .evaluate import synthetic_data

    warning = None
    if cfg.data is None:
        warning = require_real_data(moves, bool(getattr(cfg, "allow_synthetic", False)))
        data: Dataset = synthetic_data(base.inputs, base.proto, samples=cfg.synthetic_samples, seed=cfg.seed)
    else:
        data = open_data(cfg.data, base.inputs, "--data")
    eval_spec = getattr(cfg, "eval_data", None)
    eval_data = open_data(eval_spec, base.inputs, "--eval-data") if eval_spec is not None else None
    return data, eval_data, warning


def make_splits(data: Dataset, eval_data: Dataset | None, moves: list[str], sizes: dict[str, int]) -> Splits:
    kw = {k: int(v) for k, v in sizes.items() if v is not None}
    return split_data(data, eval_data, needs_fit=bool(moves), **kw)


def split_sizes(cfg: Any) -> dict[str, int]:
    """The split caps of a RunConfig (or of a stored run config dict)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    out = {}
    for key, name in (("select_samples", "select_max"), ("eval_samples", "held_out_max"),
                      ("calib_samples", "calib_max")):
        if get(key) is not None:
            out[name] = int(get(key))
    return out


def run_moves(passes, space, cfg: Any) -> list[str]:
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    moves = data_dependent_moves(passes, space.by_pass(), get("pass_options") or {},
                                 int(get("finetune_steps") or 0))
    if int(get("recover_top") or 0) > 0:
        moves.append(f"--recover-top {int(get('recover_top'))}: distillation on the fit split")
    return moves


# ------------------------------------------------------------------------------ held-out
def held_out(search: "Search", best: "Record | None") -> dict[str, Any]:
    """The task metric (and the gate's metric) of the original and the best on the held-out split."""
    from .evaluate import run_model
    from .fidelity import FidelityChecker
    from .metrics import resolve_metric

    cfg = search.cfg
    splits: Splits = search.splits
    task = resolve_metric(getattr(cfg, "task_metric", None) or cfg.metric)
    gate = resolve_metric(cfg.metric)
    ds = splits.held_out
    out: dict[str, Any] = {"samples": ds.num_samples, "data": splits.sources.get("held_out"),
                           "synthetic": ds.synthetic, "metric": task.to_dict(), "original": None, "best": None,
                           "best_candidate_id": best.id if best is not None else None,
                           "how": "onnxruntime outputs on the held-out split, computed once after the search for "
                                  "the original and the chosen candidate; used for no choice"}
    if not ds.num_samples:
        out["error"] = "no held-out samples"
        return out
    try:
        checker = FidelityChecker(search.base.proto, ds, task)
        out["metric"] = task.describe(checker.labels)  # + basis: top-1 on labels, or estimated without them
        out["original"] = checker.reference_value
        if best is None:
            return out
        if not best.genotype:
            outs = checker.reference
        else:
            outs = run_model(search.model_for(best), ds)  # materialized once for the run's end
        out["best"] = checker.score_outputs(outs).value
        out["drop"] = out["original"] - out["best"]
        if gate.name != task.name:
            g = FidelityChecker.__new__(FidelityChecker)  # same reference outputs, the gate's metric
            g.metric_obj, g.metric, g.output_names = gate, gate.name, checker.output_names
            g._ref_stacked, g.labels, g.extras = checker._ref_stacked, checker.labels, checker.extras
            out["gate_metric"] = {"name": gate.name, "original": gate(g._ref_stacked, g._ref_stacked, g.labels,
                                                                      g.extras)[0],
                                  "best": g.score_outputs(outs).value, "basis": gate.basis(g.labels)}
    except Exception as e:  # noqa: BLE001 - the report stands without it
        out["error"] = f"{type(e).__name__}: {e}"
        log.warning("held-out evaluation failed: %s", out["error"])
    return out


def _short(text: str, limit: int = 90) -> str:
    """`text` cut at a word boundary before `limit` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def report_blocks(search: "Search", best: "Record | None") -> dict[str, Any]:
    """report.json's `data`, `held_out` and `trust` blocks."""
    splits: Splits = search.splits
    data = dict(splits.to_dict(), synthetic=search.data.synthetic, data_moves=list(search.data_moves))
    warning = search.trust_warning
    return {"data": data, "held_out": held_out(search, best),
            "trust": {"trusted": warning is None, "warning": warning}}


# ------------------------------------------------------------------------------ presentation
def _fmt(v: Any, units: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.2f}{'%' if units == '%' else ''}" if units else f"{v:.6f}"


def summary_lines(rep: dict[str, Any]) -> list[str]:
    lines = []
    d = rep.get("data")
    if d:
        s = d["sizes"]
        lines.append(f"data: fit {s['fit']} (calibration {s['calibration']}), select {s['select']}, held-out "
                     f"{s['held_out']} samples" + (" (SYNTHETIC)" if d.get("synthetic") else "")
                     + "".join(f"; {n}" for n in d.get("notes") or []))
    f = rep.get("fidelity") or {}
    if f.get("basis"):  # the gate's metric depends on the data: say what it measured on the select split
        lines.append(f"gate: {f['metric']} on {f.get('samples')} select samples = {f['basis']}: original "
                     f"{_fmt(f.get('original'), f.get('units', ''))}, required >= {_fmt(f.get('min_required'), f.get('units', ''))}")
    h = rep.get("held_out")
    if h and h.get("original") is not None:
        m = h["metric"]
        lines.append(f"held-out {m['name']}: original {_fmt(h['original'], m['units'])}, best "
                     f"{_fmt(h.get('best'), m['units'])} on {h['samples']} samples ({m.get('basis') or _short(m['definition'])})")
    t = rep.get("trust")
    if t and not t.get("trusted", True):
        lines.append(f"WARNING: {t['warning']}")
    return lines


__all__ = ["held_out", "make_splits", "open_run_data", "report_blocks", "run_moves", "split_sizes",
           "summary_lines"]
