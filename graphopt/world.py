"""Building a run's world: the loaded model, the passes, the search space, the data and its
fit / select / held-out split, and what the run store keys them on.

One place for what `graphopt run` (graphopt.driver.Search.setup), `graphopt export` and
`graphopt runs` (graphopt.runstore.runs) need to rebuild candidates identically; the move context that
moves read is graphopt.materialize.move_context.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .genotype import SearchSpace
from .plugin import Pass, Site
from .registry import PASSES

if TYPE_CHECKING:
    from .config import RunConfig
    from .evaluation.data import Dataset, Splits
    from .modelio.ir import LoadedModel

log = logging.getLogger("graphopt")


@dataclass
class World:
    """What a run searches over (set by open_world)."""

    base: LoadedModel = None  # type: ignore[assignment]
    passes: dict[str, Pass] = None  # type: ignore[assignment]
    space: SearchSpace = None  # type: ignore[assignment]
    data: Dataset = None  # type: ignore[assignment]
    splits: Splits = None  # type: ignore[assignment]
    data_moves: list[str] = None  # type: ignore[assignment]
    trust_warning: str | None = None
    not_applicable: dict[str, str] | None = None  # pass -> why it has no sites on this target (graphopt.timing)


def create_passes(names: Iterable[str]) -> dict[str, Pass]:
    return {name: PASSES.create(name) for name in names}


def guarded_sites(base: LoadedModel, passes: Mapping[str, Pass]) -> dict[str, list[Site]]:
    """Each pass's sites on the base graph, without moves on or into control flow (graphopt.modelio.controlflow)."""
    from .modelio.controlflow import guard_sites

    graph = base.graph()
    return {name: guard_sites(graph, p.sites(graph))[0] for name, p in passes.items()}


def search_space(base: LoadedModel, passes: Mapping[str, Pass], search_exact: bool) -> SearchSpace:
    """The run's search space: exact moves are one gene per pass unless --search-exact (graphopt.exact)."""
    from .exact import build_space

    return build_space(guarded_sites(base, passes), search_exact)


def open_world(cfg: "RunConfig") -> World:
    """Load the model, build the passes and the search space, open the data and split it."""
    from .modelio.ir import load_model
    from .runstore import rundir

    w = World()
    w.base = load_model(cfg.model, cfg.shapes)
    if cfg.data is None:  # the memory a --shape implies, before allocating it
        rundir.check_synthetic_memory(w.base.inputs, cfg.synthetic_samples, w.base.proto, cfg.shapes)
    w.passes = create_passes(cfg.passes)
    for p in w.passes.values():  # pass options: checked once, before any candidate is built
        check = getattr(p, "check_options", None)
        if check is not None:
            check(cfg.pass_options)
    from .registry import TARGETS
    from .timing import static_shape_conflicts  # value-dependent shapes on a static-shape target: no sites

    w.not_applicable = static_shape_conflicts(w.passes, TARGETS.get(cfg.target))
    for why in w.not_applicable.values():
        log.warning("%s", why)
    w.space = search_space(w.base, {n: p for n, p in w.passes.items() if n not in w.not_applicable},
                           cfg.search_exact)
    for d in w.base.defaulted_dims:
        log.info("input %s: symbolic batch dimension %r set to 1 (--shape %s=... to choose)",
                 d["input"], d["dim"], d["input"])
    # data: --data (or synthetic, refused when moves fit to data) split into fit / select / held-out
    from .evaluation.quality import open_run_data, run_moves

    w.data, eval_data, w.trust_warning = open_run_data(cfg, w.base, run_moves(w.passes, w.space, cfg))
    w.splits, w.data_moves = split_calibration(w.data, eval_data, w.passes, w.space, cfg)
    if getattr(w.data, "arrays", None) is not None:  # in-memory data: every value; else what is held
        rundir.check_finite(w.data.arrays, f"--data {cfg.data}")
    rundir.check_finite(w.splits.calibration, f"--data {cfg.data} (calibration samples)")
    return w


def split_calibration(data: Dataset, eval_data: Dataset | None, passes: Mapping[str, Pass], space: SearchSpace,
                      config: Any) -> tuple[Splits, list[str]]:
    """(fit / select / held-out splits, data-dependent moves) of a run (graphopt.evaluation.data.split_data):
    moves are fit on `fit`, candidates judged on `select`, and `held-out` is only reported.
    `config`: the RunConfig, or the stored run config (`graphopt export` rebuilds candidates on
    the same fit samples)."""
    from .evaluation.quality import make_splits, run_moves, split_sizes

    moves = run_moves(passes, space, config)
    return make_splits(data, eval_data, moves, split_sizes(config)), moves


def run_identity(cfg: "RunConfig", world: World, target_desc: Mapping[str, Any]) -> dict[str, Any]:
    """What the run store is keyed on: a store of another model, target, data, split or move options is refused."""
    return {
        "model": world.base.sha256, "target": cfg.target,
        "target_config": _stable(target_desc.get("config", {k: v for k, v in target_desc.items()
                                                          if k in ("compiler", "device", "threads", "target")})),
        "data": world.data.fingerprint(), "metric": str(cfg.metric),
        "split": _stable(world.splits.sizes()),
        # how moves are built (repair on/off, pass options, finetune): same genotype, other graph
        "move_options": _stable({**cfg.pass_options, "finetune_steps": cfg.finetune_steps}),
    }


def run_config_meta(cfg: "RunConfig") -> dict[str, Any]:
    """The run config as stored (`graphopt export` rebuilds candidates from it)."""
    return {"model": str(Path(cfg.model).resolve()), "target": cfg.target,
            "passes": list(cfg.passes), "shapes": {k: list(v) for k, v in cfg.shapes.items()},
            "metric": str(cfg.metric), "min_fidelity": cfg.min_fidelity,
            "max_drop": cfg.max_drop, "allow_synthetic": cfg.allow_synthetic,
            "data": _spec_str(cfg.data), "eval_data": _spec_str(cfg.eval_data),
            "select_samples": cfg.select_samples, "eval_samples": cfg.eval_samples,
            "calib_samples": cfg.calib_samples,
            "pass_options": cfg.pass_options, "finetune_steps": cfg.finetune_steps,
            "seed": cfg.seed, "synthetic_samples": cfg.synthetic_samples,
            "graphopt_version": _graphopt_version(), "search_exact": cfg.search_exact,
            "recover_top": cfg.recover_top}


def _graphopt_version() -> str:
    from ._version import __version__

    return __version__


def _spec_str(spec: Any) -> str | None:
    """A --data / --eval-data spec as stored: a path resolved, a module:function as given."""
    if spec is None:
        return None
    text = str(spec)
    return str(Path(text).resolve()) if Path(text).exists() else text


def _spec_path(spec: Any) -> Path | None:
    """The file or folder a --data spec names (a loader's .py file), None for a module:function."""
    if spec is None:
        return None
    text = str(spec)
    if Path(text).exists():
        return Path(text)
    head = text.rpartition(":")[0]
    return Path(head) if head.endswith(".py") and Path(head).exists() else None


def _stable(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


__all__ = ["World", "create_passes", "guarded_sites", "open_world", "run_config_meta", "run_identity", "search_space",
           "split_calibration"]
