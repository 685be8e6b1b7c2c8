"""Grid search: the Cartesian product over knobs, in a stated, deterministic order.

A knob is a group of sites that always take the same choice.

- `knobs="passes"` (default): one knob per pass, so all conv_bn sites are kept or fused
  together, all width sites take 1.0, 0.75 or 0.5 together. Value 0 of every knob means
  "each site keeps". The other values are the non-keep choices common to all the pass's
  sites, in the order of its first site. When its sites have no non-keep choice in common,
  the values are the union of their non-keep choices (in order of first appearance), and a
  site that lacks a value keeps.
- `knobs="sites"`: every site is its own knob, with its own choices (for small spaces).

Knobs are ordered by (pass name, position of the first site in the space). Proposals:
the all-exact genotype first (when the space has exact moves), then the product in
lexicographic order of the knobs' choice indices (the last knob varies fastest), skipping
the original (every knob at 0) and every genotype already proposed or told. ask() returns
[] once the product is exhausted.
"""

from __future__ import annotations

from itertools import product
from typing import Any, Iterator, Sequence

from graphopt.genotype import Choice, Genotype, SearchSpace, Site
from graphopt.plugin import Option, Strategy

KNOB_MODES = ("passes", "sites")


class _Knob:
    """Sites that share one choice. values[0] is None: every site keeps."""

    def __init__(self, name: str, sites: list[Site], values: list[Choice]):
        self.name = name
        self.sites = sites
        self.values: list[Choice | None] = [None, *values]

    def genes(self, index: int) -> dict[str, Choice]:
        value = self.values[index]
        if value is None:
            return {}
        return {s.key: value for s in self.sites if value in s.choices[1:]}


def _pass_values(sites: list[Site]) -> list[Choice]:
    common = [c for c in sites[0].choices[1:] if all(c in s.choices[1:] for s in sites[1:])]
    if common:
        return common
    union: list[Choice] = []
    for s in sites:
        union.extend(c for c in s.choices[1:] if c not in union)
    return union


class GridSearch(Strategy):
    name = "grid"
    description = "Cartesian product over knobs (one per pass, or one per site), in a fixed order"
    OPTIONS = (Option("knobs", str, "passes", "one knob per pass, or one per site", choices=KNOB_MODES),)

    def __init__(self, space: SearchSpace, seed: int = 0, knobs: str = "passes", **options: Any) -> None:
        super().__init__(space, seed, **options)
        if knobs not in KNOB_MODES:
            raise ValueError(f"grid: knobs={knobs!r}; choose one of {', '.join(KNOB_MODES)}")
        self.knob_mode = knobs
        self.seen: set[Genotype] = {Genotype()}  # the original is the driver's baseline
        position = {s.key: i for i, s in enumerate(space.sites)}
        if knobs == "sites":
            ordered = sorted(space.sites, key=lambda s: (s.pass_name, position[s.key]))
            self.knobs = [_Knob(s.key, [s], list(s.choices[1:])) for s in ordered]
        else:
            self.knobs = [_Knob(name, sites, _pass_values(sites))
                          for name, sites in sorted(space.by_pass().items())]
        self._queue: list[Genotype] = []
        exact = space.exact_genotype()
        if len(exact):
            self._queue.append(exact)
        self._product: Iterator[tuple[int, ...]] = product(*(range(len(k.values)) for k in self.knobs))

    def size(self) -> int:
        """Number of points in the product, the original included."""
        n = 1
        for k in self.knobs:
            n *= len(k.values)
        return n

    def genotype_at(self, indices: Sequence[int]) -> Genotype:
        genes: dict[str, Choice] = {}
        for knob, i in zip(self.knobs, indices):
            genes.update(knob.genes(i))
        return Genotype(genes)

    def _next(self) -> Genotype | None:
        while self._queue:
            g = self._queue.pop(0)
            if g not in self.seen:
                return g
        if not self.knobs:
            return None
        for indices in self._product:
            g = self.genotype_at(indices)
            if g not in self.seen:
                return g
        return None

    def tell(self, scored: Sequence[tuple[Genotype, float]]) -> None:
        for g, _ in scored:
            self.seen.add(g)
