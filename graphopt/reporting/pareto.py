"""The Pareto front of a run: candidates no other candidate beats on every objective.

By default a candidate is better when it is faster (latency_ms, lower), more faithful
(fidelity, higher) and smaller (size_bytes, lower). Only measured candidates take part:
status "ok" with a latency. A missing or NaN value of another objective counts as the worst
possible value, so such a record is on the front only if it wins on something else.
Candidates with identical objective vectors (duplicates of one graph, typically) are one
point: the one with the lowest id stands for them.

Plain Python, O(n^2): a few thousand records take well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

Objective = tuple[str, str]  # (attribute, "min" | "max")

DEFAULT_OBJECTIVES: tuple[Objective, ...] = (("latency_ms", "min"), ("fidelity", "max"), ("size_bytes", "min"))


def _get(point: Any, attr: str) -> Any:
    if isinstance(point, Mapping):
        return point.get(attr)
    return getattr(point, attr, None)


def _cost(value: Any, sense: str) -> float:
    """The objective as a quantity to minimise; missing or NaN is +inf (the worst)."""
    if value is None or isinstance(value, bool):
        return math.inf
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.inf
    if math.isnan(v):
        return math.inf
    return v if sense == "min" else -v


def _snap(v: float, step: float | None) -> float:
    if not step or step <= 0 or math.isinf(v):
        return v
    return round(v / step) * step


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """a is no worse than b everywhere and strictly better somewhere (all minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Iterable[Any], objectives: Sequence[Objective] = DEFAULT_OBJECTIVES, *,
                 resolution: Mapping[str, float] | None = None) -> list[Any]:
    """The non-dominated records among `points`, sorted by latency (then by id).

    `points`: Records (or mappings with the same keys). `objectives`: (attribute, "min"|"max")
    pairs. Only records with status "ok" and a latency_ms are considered. Of records with
    identical objective vectors only the one with the lowest id is kept (records without an
    id rank after those with one, in input order).

    `resolution` (optional) maps an attribute to a step below which its values count as equal:
    values are rounded to that grid before comparing, e.g. {"fidelity": 1e-9} so that float
    noise (cosine 0.9999999999994 vs 0.9999999999998) does not put every candidate on the
    front. Without it values are compared exactly.
    """
    objectives = tuple(objectives)
    if not objectives:
        raise ValueError("pareto_front needs at least one objective")
    for attr, sense in objectives:
        if sense not in ("min", "max"):
            raise ValueError(f"objective {attr!r}: sense must be 'min' or 'max', not {sense!r}")

    candidates = []
    for pos, p in enumerate(points):
        if _get(p, "status") != "ok" or _cost(_get(p, "latency_ms"), "min") == math.inf:
            continue  # not measured (or a latency that is not a number)
        rid = _get(p, "id")
        order = (0, rid, pos) if rid is not None else (1, 0, pos)
        vec = tuple(_snap(_cost(_get(p, attr), sense), (resolution or {}).get(attr)) for attr, sense in objectives)
        candidates.append((order, vec, p))

    # Ties: keep the lowest id of each objective vector.
    candidates.sort(key=lambda c: c[0])
    unique: dict[tuple[float, ...], tuple[Any, tuple[float, ...], Any]] = {}
    for c in candidates:
        unique.setdefault(c[1], c)
    kept = list(unique.values())

    front = [c for c in kept if not any(_dominates(o[1], c[1]) for o in kept if o is not c)]
    front.sort(key=lambda c: (float(_get(c[2], "latency_ms")), c[0]))
    return [c[2] for c in front]


def front_ids(points: Iterable[Any], objectives: Sequence[Objective] = DEFAULT_OBJECTIVES, *,
              resolution: Mapping[str, float] | None = None) -> set[int]:
    """The ids of pareto_front(...): what render_html takes as `front_ids`."""
    return {i for i in (_get(r, "id") for r in pareto_front(points, objectives, resolution=resolution))
            if i is not None}


__all__ = ["DEFAULT_OBJECTIVES", "Objective", "front_ids", "pareto_front"]
