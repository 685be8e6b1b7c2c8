"""Working with a finished run directory: list candidates, export one, re-render the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UsageError
from .store import Record, RunStore

SORT_KEYS = ("id", "latency", "fidelity", "size")


def open_store(out_dir: str | Path) -> RunStore:
    path = Path(out_dir) / RunStore.FILENAME
    if not path.is_file():
        raise UsageError(f"{out_dir} holds no run store ({RunStore.FILENAME}); pass the --out directory of a run")
    return RunStore(path)


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
    from .driver import materialize
    from .genotype import SearchSpace
    from .ir import load_model
    from .outputs import atomic_write_bytes
    from .registry import PASSES

    store = open_store(out_dir)
    try:
        rec = store.by_id(candidate)
        cfg: dict[str, Any] | None = store.get_meta("config")
        model_sha = dict(store.db.execute("SELECT key, value FROM meta WHERE key = 'id.model'").fetchall())
    finally:
        store.close()
    if rec is None:
        raise UsageError(f"no candidate {candidate} in {out_dir}; `graphopt runs {out_dir}` lists them")
    if cfg is None:
        raise UsageError(f"{out_dir} was written by an older graphopt without its run config; run it again")
    base = load_model(cfg["model"], {k: tuple(v) for k, v in cfg["shapes"].items()})
    if base.sha256 != model_sha.get("id.model"):
        raise UsageError(f"{cfg['model']} changed since the run (hash differs); cannot rebuild candidate {candidate}")
    passes = {n: PASSES.create(n) for n in cfg["passes"]}
    graph = base.graph()
    space = SearchSpace([s for p in passes.values() for s in p.sites(graph)])
    from .driver import move_context, split_calibration
    from .evaluate import load_data, synthetic_data

    seed = int(cfg.get("seed") or 0)
    data = (load_data(cfg["data"], base.inputs) if cfg.get("data")
            else synthetic_data(base.inputs, base.proto, samples=int(cfg.get("synthetic_samples") or 8), seed=seed))
    options = cfg.get("pass_options") or {}
    steps = int(cfg.get("finetune_steps") or 0)
    # the same data and fit half the run used, so the rebuilt candidate is the one that was measured
    fit, _ = split_calibration(data, passes, options, steps)
    ctx = move_context(base, fit, options, steps, seed)
    model, _ = materialize(base, space, rec.genotype, passes, ctx)
    return atomic_write_bytes(Path(dest), model.SerializeToString())


def rerender(out_dir: str | Path) -> Path:
    """report.html again from report.json and the run store."""
    from .report import write_html

    out = Path(out_dir)
    rep_path = out / "report.json"
    if not rep_path.is_file():
        raise UsageError(f"{out_dir} has no report.json; pass the --out directory of a run")
    store = open_store(out)
    try:
        records = store.records()
    finally:
        store.close()
    return write_html(out, json.loads(rep_path.read_text()), records)
