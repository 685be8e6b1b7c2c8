"""Building a candidate: the base graph plus a genotype's moves, in stage order (materialize),
and the context the moves read (move_context: the original model, calibration samples, options).

Used by the search (graphopt.driver), the recovery phase, the report's held-out check, and
`graphopt export` / `graphopt runs` (graphopt.runstore.runs), which rebuild a stored candidate.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .genotype import Genotype, SearchSpace
from .plugin import MoveContext, Pass

if TYPE_CHECKING:
    from .modelio.ir import LoadedModel


def materialize(base: LoadedModel, space: SearchSpace, genotype: Genotype, passes: Mapping[str, Pass],
                ctx: MoveContext, finalize: bool = True):
    """Clone the base graph, apply the genotype's moves in stage order, finalize once.

    Returns (model, applied) where applied maps site key -> "applied" | "did not apply".
    A recovered record's genotype (a `recover` gene, graphopt.recovery.recover) is its parent's moves plus
    the recovered weights stored in the run directory. finalize=False: before whole-model
    steps (int8), the float model recovery trains.
    The empty genotype is the original: the loaded model itself, never re-exported (a model
    graphopt could not export, e.g. an already-int8 one, is still measured as it is).
    """
    if not genotype:
        model = type(base.proto)()
        model.CopyFrom(base.proto)
        return model, {}
    from .exact import expand
    from .modelio.ir import export_graph
    from .recovery.recover_files import split_genotype

    genotype, recovered = split_genotype(genotype)
    graph = base.graph()  # a fresh import is a private clone
    # a group gene (one for a pass's exact moves, graphopt.exact) expands to its sites' moves
    genes = sorted(expand(space, genotype), key=lambda m: passes[m[0].pass_name].stage)  # stable: space order
    applied = {}
    moves: dict[str, list] = {}  # pass name -> its applied (site, choice) pairs, for Pass.finalize
    for site, choice, key in genes:
        ok = passes[site.pass_name].apply(graph, site, choice, ctx)
        applied[key] = "applied" if ok or applied.get(key) == "applied" else "did not apply"
        if ok:
            moves.setdefault(site.pass_name, []).append((site, choice))
    model = export_graph(graph)
    steps = int(ctx.options.get("finetune_steps", 0) or 0)
    if recovered:  # the recovered weights (graphopt.recovery.recover), before int8 finalize
        from .recovery.recover_files import apply_recovered

        model = apply_recovered(model, ctx, recovered)
        applied["recover"] = "applied"
    elif steps > 0 and moves:  # distil the float weights toward the original, before int8 finalize
        from .recovery.finetune import finetune_in_context

        model = finetune_in_context(model, ctx, steps)
    for name in sorted(moves, key=lambda n: passes[n].stage) if finalize else ():  # whole-model steps (int8)
        model = passes[name].finalize(model, moves[name], ctx)
    return model, applied


def move_context(base: LoadedModel, splits: Any, pass_options: Mapping[str, Any],
                 finetune_steps: int = 0, seed: int = 0, run_dir: str | Path | None = None) -> MoveContext:
    """`splits`: the run's Splits (its in-memory calibration subset of fit), or a CalibrationData /
    {input: [samples, ...]} used whole (benches that build candidates without a run)."""
    from .evaluation.data import Splits

    calib = splits.calibration if isinstance(splits, Splits) else getattr(splits, "arrays", splits)
    return MoveContext(base_model=base.proto, calibration=calib,
                       options=dict(pass_options, **({"finetune_steps": finetune_steps, "seed": seed}
                                                     if finetune_steps else {}),
                                    **({"run_dir": str(run_dir)} if run_dir is not None else {})))


__all__ = ["materialize", "move_context"]
