"""Working with a finished run directory: list candidates, export one, re-render the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .store import Record, RunStore

SORT_KEYS = ("id", "latency", "fidelity", "size")


def open_store(out_dir: str | Path) -> RunStore:
    path = Path(out_dir) / RunStore.FILENAME
    if not Path(out_dir).is_dir():
        raise UsageError(f"{out_dir}: no such directory; pass the --out directory of a run")
    if not path.is_file():
        raise UsageError(f"{out_dir} holds no run store ({RunStore.FILENAME}); pass the --out directory of a run")
    return RunStore(path, readonly=True)  # listing, exporting and re-rendering never write the store


def list_runs(out_dir: str | Path, sort: str = "latency") -> list[Record]:
    if sort not in SORT_KEYS:
        raise UsageError(f"--sort {sort!r}: choose one of {', '.join(SORT_KEYS)}")
    store = open_store(out_dir)
    try:
        recs = store.records()
    finally:
        store.close()
    inf = float("inf")
    key = {"id": lambda r: r.id,
           "latency": lambda r: (r.latency_ms if r.latency_ms is not None else inf, r.id),
           "fidelity": lambda r: (-(r.fidelity if r.fidelity is not None else -inf), r.id),
           "size": lambda r: (r.size_bytes if r.size_bytes is not None else inf, r.id)}[sort]
    return sorted(recs, key=key)


def format_runs(records: list[Record], front: set[int]) -> str:
    head = f"{'id':>4}  {'status':<10} {'moves':>5} {'fidelity':>10} {'latency ms':>11} {'size MB':>8}  front"
    lines = [head, "-" * len(head)]
    for r in records:
        lat = f"{r.latency_ms:.3f}" if r.latency_ms is not None else "-"
        fid = f"{r.fidelity:.6f}" if r.fidelity is not None else "-"
        size = f"{r.size_bytes / 1e6:.2f}" if r.size_bytes else "-"
        lines.append(f"{r.id:>4}  {r.status:<10} {len(r.genotype):>5} {fid:>10} {lat:>11} {size:>8}  "
                     f"{'*' if r.id in front else ''}" + (f"  {r.error}" if r.error else ""))
    return "\n".join(lines)


def export_candidate(out_dir: str | Path, candidate: int, dest: str | Path) -> Path:
    """Materialize a stored candidate's genotype on the run's model and write it atomically."""
    from ..modelio.ir import load_model
    from ..materialize import materialize, move_context
    from .outputs import atomic_write_bytes
    from ..world import create_passes, guarded_sites, split_calibration

    store = open_store(out_dir)
    try:
        rec = store.by_id(candidate)
        cfg: dict[str, Any] | None = store.get_meta("config")
        ident = store.identity()
    finally:
        store.close()
    if rec is None:
        raise UsageError(f"no candidate {candidate} in {out_dir}; `graphopt runs {out_dir}` lists them")
    if cfg is None:
        raise UsageError(f"{out_dir} was written by an older graphopt without its run config; run it again")
    from .rundir import check_export_dest, is_run_output

    check_export_dest(dest, {"model": cfg["model"], "calibration data": cfg.get("data"),
                             "run store": Path(out_dir) / RunStore.FILENAME})
    if is_run_output(dest, out_dir):
        raise UsageError(f"-o {dest} is a file the run in {out_dir} wrote; choose a path outside its outputs")
    base = load_model(cfg["model"], {k: tuple(v) for k, v in cfg["shapes"].items()})
    if base.sha256 != ident.get("id.model"):
        raise UsageError(f"{cfg['model']} changed since the run (its hash differs); cannot rebuild candidate "
                         f"{candidate}: restore the model the run used, or run graphopt again")
    passes = create_passes(cfg["passes"])
    from ..exact import build_space

    # runs stored before search_exact existed searched exact moves per site; a store written by runs
    # with and without --search-exact holds genotypes of both spaces (the config is the last run's).
    # The run's sites: none on or into control flow (graphopt.world, as the run built them)
    sites = guarded_sites(base, passes)
    space = build_space(sites, bool(cfg.get("search_exact", True)))
    if not all(k in space for k in rec.genotype):
        space = build_space(sites, not cfg.get("search_exact", True))
    from ..evaluation.data import open_data
    from ..evaluation.evaluate import synthetic_data

    seed = int(cfg.get("seed") or 0)
    data = (open_data(cfg["data"], base.inputs) if cfg.get("data")
            else synthetic_data(base.inputs, base.proto, samples=int(cfg.get("synthetic_samples") or 8), seed=seed))
    eval_data = open_data(cfg["eval_data"], base.inputs, "--eval-data") if cfg.get("eval_data") else None
    options = cfg.get("pass_options") or {}
    steps = int(cfg.get("finetune_steps") or 0)
    _check_same_inputs(out_dir, candidate, cfg, ident, data, options, steps)
    # the same data and fit split the run used, so the rebuilt candidate is the one that was measured
    splits, _ = split_calibration(data, eval_data, passes, space, cfg)
    ctx = move_context(base, splits, options, steps, seed, run_dir=out_dir)  # run_dir: recovered weights
    model, _ = materialize(base, space, rec.genotype, passes, ctx)
    _check_same_graph(candidate, rec, model, cfg, steps)
    return atomic_write_bytes(Path(dest), model.SerializeToString())


def _check_same_inputs(out_dir: str | Path, candidate: int, cfg: dict[str, Any], ident: dict[str, str], data: Any,
                       options: dict[str, Any], steps: int) -> None:
    """Everything a materialization depends on is what the run keyed (the store's identity)."""
    from .._version import __version__

    old_fp = ident.get("id.data")
    if old_fp is not None and data.fingerprint() != old_fp:
        if cfg.get("data"):
            raise UsageError(f"--data {cfg['data']} changed since the run (its contents differ from the data "
                             f"candidate {candidate} was fit and measured with); restore that file, or run graphopt "
                             "again on the new data")
        ran = cfg.get("graphopt_version")
        raise UsageError(f"the synthetic inputs this graphopt ({__version__}) draws differ from those the run used "
                         f"({'graphopt ' + ran if ran and ran != __version__ else 'an earlier graphopt'}); export with "
                         "that graphopt, or run graphopt again")
    import json as _json

    old_opts = ident.get("id.move_options")
    now = _json.dumps({**options, "finetune_steps": steps}, sort_keys=True, default=str)
    if old_opts is not None and now != old_opts:
        raise UsageError(f"{out_dir}: the run config's pass options ({now}) differ from those the candidates were "
                         f"built with ({old_opts}); the run store was edited: run graphopt again")


def _check_same_graph(candidate: int, rec: Record, model: Any, cfg: dict[str, Any], steps: int) -> None:
    """The rebuilt graph is the one that was measured (its hash is in the store); where a newer graphopt
    builds a move differently, say so instead of writing another model."""
    import logging

    from .._version import __version__
    from ..modelio.ir import model_hash

    if rec.graph_hash is None or model_hash(model) == rec.graph_hash:
        return
    ran = cfg.get("graphopt_version")
    why = (f"the run used graphopt {ran}, this is {__version__}: export with {ran}, or run graphopt again"
           if ran and ran != __version__ else "the passes build it differently now: run graphopt again")
    if steps > 0:  # distillation on another machine/thread count may differ in the last bits
        logging.getLogger("graphopt").warning("candidate %d rebuilt with --finetune %d differs bitwise from the graph "
                                              "that was measured (%s)", candidate, steps, why)
        return
    raise UsageError(f"candidate {candidate} rebuilds as a different graph than the one measured (graph hash "
                     f"{model_hash(model)[:12]} vs {rec.graph_hash[:12]}); {why}")


def rerender(out_dir: str | Path) -> Path:
    """report.html again from report.json and the run store."""
    from ..reporting.report import write_html

    from .rundir import RunLock

    out = Path(out_dir)
    rep_path = out / "report.json"
    if not rep_path.is_file():
        raise UsageError(f"{out_dir} has no report.json; pass the --out directory of a run")
    try:
        rep = json.loads(rep_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{rep_path} is not valid JSON ({type(e).__name__}: {e}); run graphopt run again "
                         "to write it") from None
    if not isinstance(rep, dict) or "report_version" not in rep:
        raise UsageError(f"{rep_path} is not a graphopt report (no report_version); run graphopt run again "
                         "to write it")
    store = open_store(out)
    try:
        records = store.records()
    finally:
        store.close()
    with RunLock(out, "report"):  # not while a run writes this folder
        try:
            return write_html(out, rep, records)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise UsageError(f"{rep_path} does not have the layout graphopt writes ({type(e).__name__}: {e}); "
                             "run graphopt run again to write it") from None
