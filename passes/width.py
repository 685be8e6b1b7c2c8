"""Prune channels: drop output channels of convs / Gemm / MatMul units and the matching inputs of every consumer.

An architecture move. Channels are coupled: a residual Add makes its two producers' channels
one set, a depthwise conv, BN, activation, Pad or pooling carries its input's channels to its
output, an SE block's Mul joins the excite conv's channels to the block's, a Concat lays its
inputs side by side. `_Analysis` walks the graph once and gives every tensor a channel layout:
its channel axis and the list of channel spaces along it (a space is the output channels of
one producer; a Concat output holds several). Spaces that must be pruned together are joined
in a networkx graph; each connected component with a prunable producer everywhere is one site.

Choices per site: ("keep", 0.75, 0.5): keep ceil(ratio * C) channels of the group (ratios that
keep every channel, or none, are left out). Which channels stay is decided once per run on the
base model (ctx.options["width_importance"]), so a site always drops the same channels:
- "ls" (the default when there is calibration data and repair is on): the channel selection of
  He et al. 2017 / ThiNet. Greedy backward elimination of the channels whose removal least
  increases the least-squares error of reconstructing every consumer's original output from its
  remaining inputs, on the original activations. Needs every consumer to be a 1x1 conv / Gemm /
  MatMul; otherwise the group falls back to "l1".
- "l1" (default otherwise) / "l2": the norm of each producer's output filter (times
  |gamma|/sigma of a BN that follows it), normalised per producer, summed over the group.

A move removes the group's channels everywhere at once: producers' output filters and biases,
BN / depthwise / elementwise-constant parameters, Reshape targets, the input channels of every
consumer (Conv group=1, Gemm, MatMul) at the right offset inside a Concat. Never emitted: a
group touching a graph input or output, a tensor whose channel axis a Reshape/Flatten mixes
with other axes, an op the analysis does not know, grouped convs; rejections() says why.

Repair (ctx.options["repair"], on by default, needs ctx.calibration): each consumer of the
pruned channels is refit by least squares so that, fed the original activations of the kept
channels, it reproduces the original model's output (He et al. 2017 / ThiNet reconstruction;
graphopt.recovery.repair.refit_conv / refit_linear), bias included (it absorbs the mean of what the
pruned channels contributed), ridge toward the pruned weights, stronger where there are few rows
per weight (late layers, the classifier). Stage 40: after kernel/depthwise, whose own repairs
read the original channel counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from graphopt.errors import UsageError
from graphopt.genotype import Choice, Site
from graphopt.plugin import MoveContext, Option, Pass

from ._graph import _static_size
# the analysis, channel choice and refit live in three modules (split for size); re-exported here
from ._width_analysis import _Analysis
from ._width_layout import (BINARY, ELIMINATION_CHUNK, MAX_ROWS, NORMS, POOLS, PREFETCH_BYTES,  # noqa: F401
                            RATIOS, RESHAPES, RIDGE, RIDGE_PER_DOF, SELECT_ROWS, UNARY, _shape)
from ._width_refit import _importance, _keep, _ls_importance, _prune, _ratios, _repair

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs


# ------------------------------------------------------------------------------------- the pass
class WidthPrune(Pass):
    """Remove a coupled group of channels (keep ratio 0.75 or 0.5; least-squares or filter-norm selection).

    With calibration data and repair on (the default), the layers reading the pruned channels
    are then refit by least squares to the original model's outputs (graphopt.recovery.repair).

    Keeps its own sites / rejections / apply, not match(): a site is a coupled channel group
    found by one analysis of the whole graph (_Analysis), not a node."""

    name = "width"
    description = "prune coupled channel groups of convs / Gemm / MatMul (keep 75% or 50%), LS-repaired"
    fidelity = "approximate: pruned channels, least-squares repaired on calibration data"
    OPTIONS = (
        Option("width_importance", str, "auto", "how channels are ranked", choices=("auto", "l1", "l2", "ls")),
        Option("repair", bool, True, "least-squares repair of new weights on calibration data (--no-repair: 0)"),
    )
    stage = 40  # after kernel/depthwise (stage 30): their repairs read original channel counts
    uses_calibration = True

    def data_moves(self, sites, options) -> str | None:
        norm = str(options.get("width_importance", "auto"))
        repair = bool(options.get("repair", True))
        words = (["least-squares repair"] if repair else []) + (
            ["data-driven channel choice"] if norm == "ls" or (norm == "auto" and repair) else [])
        return " and ".join(words) or None

    def check_options(self, options) -> None:
        norm = str(options.get("width_importance", "auto"))
        if norm not in IMPORTANCE:
            raise UsageError(f"pass option width_importance={norm!r}: use one of {', '.join(IMPORTANCE)}")

    def sites(self, graph: gs.Graph) -> list[Site]:
        out = []
        for g in _Analysis(graph).groups():
            if g.why_not is not None or not _ratios(g.length):
                continue
            names = tuple(p.name for p in g.producers)
            extra = f" (+{len(names) - 1} coupled)" if len(names) > 1 else ""
            out.append(Site(key=f"width:{names[0]}", pass_name=self.name, nodes=names,
                            choices=("keep", *_ratios(g.length)), cost=g.cost,
                            note=f"{g.length} channels of {g.producers[0].op} '{names[0]}'{extra}"))
        return out

    def apply(self, graph: gs.Graph, site: Site, choice: Choice, ctx: MoveContext) -> bool:
        if isinstance(choice, bool) or not isinstance(choice, (int, float)) or not 0 < choice < 1:
            raise ValueError(f"width: choice {choice!r} for site {site.key} is not a keep ratio in (0, 1)")
        base = _base_info(ctx)
        length = base.length(site.key)
        if length is None:
            return False
        an = _Analysis(graph)
        groups = an.groups()
        g = next((g for g in groups if g.producers[0].name == site.nodes[0]), None)
        if (g is None or g.why_not is not None or g.length != length
                or tuple(p.name for p in g.producers) != tuple(site.nodes)):
            return False  # an earlier move changed this group's channels or structure
        keep = _keep(base.score(site.key), float(choice))
        _prune(graph, an, g, keep)
        if ctx.options.get("repair", True):
            _repair(graph, ctx, an, g, keep, base)
        return True

    def rejections(self, graph: gs.Graph) -> list[tuple[str, str]]:
        out = []
        for g in _Analysis(graph).groups():
            why = g.why_not
            if why is None and not _ratios(g.length):
                why = f"{g.length} channels: no keep ratio in {RATIOS} removes any"
            if why is not None:
                out.append((g.producers[0].name, why))
        return out


class _Base:
    """The base model's width groups and their channel importance (computed on first use, then
    reused by every candidate of the run: the same site always drops the same channels)."""

    def __init__(self, ctx: MoveContext, norm: str):
        from graphopt.modelio.ir import import_graph

        self.ctx, self.norm = ctx, norm
        self.an = _Analysis(import_graph(ctx.base_model))
        self.groups = {f"width:{g.producers[0].name}": g for g in self.an.groups() if g.why_not is None}
        self.scores: dict[str, np.ndarray] = {}
        self.prefetch = self._prefetch_names() if ctx.calibration else []

    def length(self, key: str) -> int | None:
        g = self.groups.get(key)
        return None if g is None else g.length

    def score(self, key: str) -> np.ndarray:
        if key not in self.scores:
            g = self.groups[key]
            s = _ls_importance(self.ctx, self.an, g, self.prefetch) if self.norm == "ls" else None
            self.scores[key] = s if s is not None else _importance(self.an, g, "l2" if self.norm == "l2" else "l1")
        return self.scores[key]

    def _prefetch_names(self) -> list[str]:
        spaces = set().union(*(g.spaces for g in self.groups.values())) if self.groups else set()
        samples = next(iter(self.ctx.calibration.values())).shape[0]
        names, budget = [], PREFETCH_BYTES
        for c in self.an.consumers:
            if c.inp.spaces() & spaces:
                for t in (c.node.inputs[0], c.node.outputs[0]):
                    size = 4 * samples * (_static_size(_shape(t)) or 0)
                    if t.name not in names and 0 < size <= budget:
                        names.append(t.name)
                        budget -= size
        return names


IMPORTANCE = ("auto", "l1", "l2", "ls")  # ctx.options["width_importance"], checked at run start (check_options)


def _base_info(ctx: MoveContext) -> _Base:
    """The run's _Base for the importance measure ctx.options["width_importance"]: "l1", "l2", or
    "ls" (data-driven selection; the default when there is calibration data and repair is on)."""
    norm = str(ctx.options.get("width_importance", "auto"))
    if norm == "auto":
        norm = "ls" if ctx.calibration and ctx.options.get("repair", True) else "l1"
    if norm not in ("l1", "l2", "ls"):
        raise ValueError(f"width_importance {norm!r}: use 'l1', 'l2' or 'ls'")
    key = f"width:base:{norm}"
    if key not in ctx.cache:
        ctx.cache[key] = _Base(ctx, norm)
    return ctx.cache[key]
