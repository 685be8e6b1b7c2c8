"""Regularized (aging) evolution, Real et al. 2019 ("Regularized Evolution for Image
Classifier Architecture Search"), over sparse genotypes.

Population: the last P scored genotypes, in the order they were told; when it exceeds P the
oldest member is removed (aging), whatever its score. A proposal is a child of tournament
winners: sample S members, the lowest score wins (an infeasible score, inf, loses to every
finite one). With probability `crossover` the child is a uniform crossover of two winners
(each gene of the union of both parents' genes comes from either parent, a parent lacking
the gene contributing keep); otherwise it is a copy of one winner. The child is then mutated:
1 to 3 genes, each set to a different choice of its site, keep included, so a move can be
undone. A child already proposed or told is mutated again; if that keeps colliding, a fresh
sparse random genotype is proposed instead; [] once the space is exhausted.

Prior (spaces may have hundreds of sites, so genotypes are never sampled densely): the
initial population is the `start` genotypes when given (option start=[{site: choice}, ...],
e.g. `--strategy-opt 'start=[{"depth:/blk/Add": "remove"}]'` or a sensitivity run's result), then
the all-exact genotype (when the space has exact moves), then
single-gene mutants of the original (largest sites first), then sparse random genotypes of
1 to 4 genes. Proposals come from the prior while the population plus the proposals still
unscored hold fewer than P genotypes.

State is a function of what was told: tell() appends to the population, and each evolved
proposal draws from a generator seeded by (seed, number told, proposals since the last
tell). A resumed run that replays the store through tell() in id order therefore rebuilds
the same population and goes on proposing what the uninterrupted run would have.
"""

from __future__ import annotations

import math
import random as _random
from collections import deque
from itertools import product
from typing import Any, Sequence

from graphopt.genotype import Choice, Genotype, SearchSpace
from graphopt.plugin import Option, Strategy

_MUTATION_TRIES = 32  # mutations of one parent before falling back to a fresh sparse genotype
_FRESH_TRIES = 256  # fresh sparse genotypes before concluding the space is (nearly) exhausted
_ENUMERATE_BELOW = 200_000  # spaces this small are enumerated to find what is left


class EvolutionarySearch(Strategy):
    name = "evolutionary"
    description = "regularized (aging) evolution: tournament, mutation of 1-3 genes, crossover; sparse prior"
    OPTIONS = (
        Option("population", int, 16, "genotypes alive at once", minimum=1),
        Option("sample", int, 4, "tournament size", minimum=1),
        Option("crossover", float, 0.3, "probability a child mixes two parents (0 to 1)", minimum=0),
        Option("max_mutations", int, 3, "genes changed per child, at most", minimum=1),
        Option("prior_genes", int, 4, "genes of the sparse prior's first proposals", minimum=1),
    )

    def __init__(self, space: SearchSpace, seed: int = 0, population: int = 16, sample: int = 4,
                 crossover: float = 0.3, max_mutations: int = 3, prior_genes: int = 4,
                 start: Sequence[Any] | None = None, **options: Any) -> None:
        super().__init__(space, seed, **options)
        if population < 1 or sample < 1:
            raise ValueError("evolutionary: population and sample must be at least 1")
        if not 0.0 <= crossover <= 1.0:
            raise ValueError("evolutionary: crossover is a probability in [0, 1]")
        self.population_size = int(population)
        self.sample_size = min(int(sample), self.population_size)
        self.crossover_p = float(crossover)
        self.max_mutations = max(1, int(max_mutations))
        self.prior_genes = max(1, int(prior_genes))
        self._start = [self._parse_start(g) for g in (start or [])]
        self.population: deque[tuple[Genotype, float]] = deque()
        self.seen: set[Genotype] = {Genotype()}  # the original is the driver's baseline
        self.pending: set[Genotype] = set()  # proposed, not yet scored
        self.told = 0
        self._since_tell = 0
        self._sites = list(space.sites)
        self._total = math.prod(len(s.choices) for s in self._sites)  # the original included
        self._prior = self._build_prior()

    # ----------------------------------------------------------------------------- prior
    def _build_prior(self) -> list[Genotype]:
        rng = _random.Random(f"evolutionary/prior/{self.seed}")
        out: list[Genotype] = list(self._start)  # option start: e.g. the sensitivity strategy's result
        exact = self.space.exact_genotype()
        if len(exact):
            out.append(exact)
        if not self._sites:
            return out
        sites = list(self._sites)
        rng.shuffle(sites)  # ties in cost in a seeded order
        sites.sort(key=lambda s: -s.cost)
        for s in sites[: max(1, self.population_size // 2)]:
            out.append(Genotype({s.key: rng.choice(s.choices[1:])}))
        for _ in range(4 * self.population_size):
            if len(out) >= self.population_size:
                break
            out.append(self._sparse(rng))
        uniq: list[Genotype] = []
        for g in out:
            if g not in uniq and len(g):
                uniq.append(g)
        return uniq

    def _parse_start(self, g: Any) -> Genotype:
        """A start genotype: a Genotype, a {site: choice} dict or its JSON text; checked against the space."""
        import json

        if isinstance(g, str):
            g = json.loads(g)
        try:
            return self.space.genotype(dict(g))
        except (ValueError, TypeError) as e:
            raise ValueError(f"evolutionary: start genotype {g!r}: {e}") from None

    def _sparse(self, rng: _random.Random) -> Genotype:
        k = rng.randint(1, min(self.prior_genes, len(self._sites)))
        return Genotype({s.key: rng.choice(s.choices[1:]) for s in rng.sample(self._sites, k)})

    # ------------------------------------------------------------------------- operators
    def _tournament(self, rng: _random.Random) -> Genotype:
        members = list(self.population)
        picks = rng.sample(members, min(self.sample_size, len(members)))
        return min(picks, key=lambda m: m[1])[0]  # inf loses to every finite score; ties: first drawn

    def _crossover(self, a: Genotype, b: Genotype, rng: _random.Random) -> Genotype:
        genes: dict[str, Choice] = {}
        for key in sorted(set(a) | set(b)):
            parent = a if rng.random() < 0.5 else b
            if key in parent:
                genes[key] = parent[key]
        return Genotype(genes)

    def _mutate(self, g: Genotype, rng: _random.Random) -> Genotype:
        genes = dict(g)
        k = rng.randint(1, min(self.max_mutations, len(self._sites)))
        for site in rng.sample(self._sites, k):
            current = genes.get(site.key, site.keep)
            new = rng.choice([c for c in site.choices if c != current])
            if new == site.keep:
                genes.pop(site.key, None)
            else:
                genes[site.key] = new
        return Genotype(genes)

    def _evolve(self, rng: _random.Random) -> Genotype | None:
        parent = self._tournament(rng)
        if rng.random() < self.crossover_p and len(self.population) > 1:
            child = self._crossover(parent, self._tournament(rng), rng)
            if child not in self.seen:
                return child
        else:
            child = parent
        for _ in range(_MUTATION_TRIES):
            mutant = self._mutate(child, rng)
            if mutant not in self.seen:
                return mutant
        return None

    def _fresh(self, rng: _random.Random) -> Genotype | None:
        for _ in range(_FRESH_TRIES):
            g = self._sparse(rng)
            if g not in self.seen:
                return g
        if self._total <= _ENUMERATE_BELOW:  # small space: find what is left, if anything
            left = [g for g in (Genotype({s.key: c for s, c in zip(self._sites, combo) if c != s.keep})
                                for combo in product(*(s.choices for s in self._sites)))
                    if g not in self.seen]
            return rng.choice(left) if left else None
        return None  # (practically) exhausted

    # --------------------------------------------------------------------------- ask/tell
    def _valid(self, g: Genotype) -> bool:
        try:
            return self.space.genotype(dict(g)) == g
        except ValueError:
            return False

    def ask(self, n: int = 1) -> list[Genotype]:
        out: list[Genotype] = []
        while len(out) < n:
            g = self._next()
            if g is None:
                break
            self.seen.add(g)
            self.pending.add(g)
            self._since_tell += 1
            out.append(g)
        return out

    def _next(self) -> Genotype | None:
        if not self._sites:
            return None
        if len(self.population) + len(self.pending) < self.population_size:
            for g in self._prior:
                if g not in self.seen:
                    return g
        rng = _random.Random(f"evolutionary/{self.seed}/{self.told}/{self._since_tell}")
        if self.population:
            g = self._evolve(rng)
            if g is not None:
                return g
        return self._fresh(rng)

    def tell(self, scored: Sequence[tuple[Genotype, float]]) -> None:
        for g, score in scored:
            score = float(score)
            if math.isnan(score):
                score = math.inf
            self.seen.add(g)
            self.pending.discard(g)
            if not self._valid(g):  # a genotype from another space (a store of another run)
                continue
            self.population.append((g, score))
            while len(self.population) > self.population_size:
                self.population.popleft()
            self.told += 1
        if scored:
            self._since_tell = 0
