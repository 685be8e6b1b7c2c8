"""Random search: seeded, reproducible, never proposes the same genotype twice.

Prior (so hundreds of sites are not sampled gene by gene into nonsense): the first proposal
is the genotype with every exact move applied (e.g. all conv-BN fusions), when the space has
exact moves. After that each proposal first draws how many genes to change, k uniform in
[1, number of sites], then which sites, uniformly, then a non-keep choice for each. Sparse
and dense genotypes are thus equally likely, instead of every sample changing half the sites.
"""

from __future__ import annotations

import math
import random as _random
from itertools import product
from typing import Any, Sequence

from graphopt.genotype import Genotype, SearchSpace
from graphopt.plugin import Strategy

_ENUMERATE_BELOW = 4096  # spaces this small are enumerated (shuffled) instead of sampled


class RandomSearch(Strategy):
    name = "random"
    description = "seeded random sampling without repeats; starts from the all-exact-moves genotype"
    OPTIONS = ()  # none: --seed is the run's

    def __init__(self, space: SearchSpace, seed: int = 0, **options: Any) -> None:
        super().__init__(space, seed, **options)
        self.rng = _random.Random(seed)
        self.seen: set[Genotype] = {Genotype()}  # the original is the driver's baseline
        self._queue: list[Genotype] = []
        exact = space.exact_genotype()
        if len(exact):
            self._queue.append(exact)
        self._pool: list[Genotype] | None = None
        if space.sites and space.log10_size() <= math.log10(_ENUMERATE_BELOW):
            pool = [Genotype({s.key: c for s, c in zip(space.sites, combo) if c != s.keep})
                    for combo in product(*(s.choices for s in space.sites))]
            self.rng.shuffle(pool)
            self._pool = pool

    def _draw(self) -> Genotype:
        sites = self.space.sites
        k = self.rng.randint(1, len(sites))
        chosen = self.rng.sample(sites, k)
        return Genotype({s.key: self.rng.choice(s.choices[1:]) for s in chosen})

    def _next(self) -> Genotype | None:
        while self._queue:
            g = self._queue.pop(0)
            if g not in self.seen:
                return g
        if not self.space.sites:
            return None
        if self._pool is not None:
            while self._pool:
                g = self._pool.pop()
                if g not in self.seen:
                    return g
            return None
        for _ in range(1000):
            g = self._draw()
            if g not in self.seen:
                return g
        return None  # the space is (practically) exhausted

    def tell(self, scored: Sequence[tuple[Genotype, float]]) -> None:
        for g, _ in scored:
            self.seen.add(g)
