"""Search strategies (grid, random, evolutionary) on search spaces built in code."""

from __future__ import annotations

import math
import random
import statistics
from itertools import product

import pytest

from graphopt.genotype import Genotype, SearchSpace, Site
from graphopt.search.evolutionary import EvolutionarySearch
from graphopt.search.grid import GridSearch
from graphopt.search.random import RandomSearch

STRATEGIES = [RandomSearch, GridSearch, EvolutionarySearch]
SEEDED = [RandomSearch, EvolutionarySearch]  # grid ignores the seed by design


def make_space(n: int, exact_every: int = 0) -> SearchSpace:
    """n sites alternating conv_bn ("keep", "fuse") and width (1.0, 0.75, 0.5)."""
    sites = []
    for i in range(n):
        if i % 2 == 0:
            exact = "fuse" if exact_every and i % exact_every == 0 else None
            sites.append(Site(f"conv_bn:/n{i:03d}", "conv_bn", (f"/n{i:03d}",), ("keep", "fuse"),
                              exact_choice=exact, cost=float(i % 7)))
        else:
            sites.append(Site(f"width:/n{i:03d}", "width", (f"/n{i:03d}",), (1.0, 0.75, 0.5), cost=float(i % 5)))
    return SearchSpace(sites)


def tiny_space() -> SearchSpace:
    """3 sites, 2 * 3 * 2 = 12 genotypes, 11 besides the original."""
    return SearchSpace([
        Site("conv_bn:/a", "conv_bn", ("/a",), ("keep", "fuse"), exact_choice="fuse"),
        Site("width:/b", "width", ("/b",), (1.0, 0.75, 0.5)),
        Site("conv_bn:/c", "conv_bn", ("/c",), ("keep", "fuse"), exact_choice="fuse"),
    ])


def all_genotypes(space: SearchSpace) -> set[Genotype]:
    return {Genotype({s.key: c for s, c in zip(space.sites, combo) if c != s.keep})
            for combo in product(*(s.choices for s in space.sites))}


def hidden_objective(space: SearchSpace, seed: int = 123):
    """score = sum of per-site costs; each site has a hidden best choice costing 0."""
    rng = random.Random(seed)
    cost = {}
    for s in space.sites:
        best, w = rng.choice(s.choices), rng.uniform(0.5, 1.5)
        cost[s.key] = {c: 0.0 if c == best else w * rng.uniform(0.5, 1.0) for c in s.choices}
    return lambda g: sum(cost[s.key][g.get(s.key, s.keep)] for s in space.sites)


def drive(strategy, score, steps: int, batch: int = 1) -> list[tuple[Genotype, float]]:
    """The driver's loop: ask, score, tell, until `steps` proposals or exhaustion."""
    history = []
    while len(history) < steps:
        asked = strategy.ask(min(batch, steps - len(history)))
        if not asked:
            break
        scored = [(g, score(g)) for g in asked]
        strategy.tell(scored)
        history.extend(scored)
    return history


def some_score(g: Genotype) -> float:
    """A deterministic score with an infeasible region, so inf is exercised too."""
    if len(g) % 7 == 6:
        return math.inf
    return sum(sum(map(ord, k)) % 11 for k in g) / (1 + len(g)) + 0.01 * len(g)


# ------------------------------------------------------------------------------- all strategies
@pytest.mark.parametrize("cls", STRATEGIES)
def test_same_seed_same_sequence(cls):
    space = make_space(60, exact_every=4)
    a = drive(cls(space, seed=7), some_score, 80, batch=3)
    b = drive(cls(space, seed=7), some_score, 80, batch=3)
    assert [g for g, _ in a] == [g for g, _ in b]
    assert len(a) == 80 or cls is GridSearch


@pytest.mark.parametrize("cls", SEEDED)
def test_different_seed_different_sequence(cls):
    space = make_space(60, exact_every=4)
    a = [g for g, _ in drive(cls(space, seed=1), some_score, 40)]
    b = [g for g, _ in drive(cls(space, seed=2), some_score, 40)]
    assert a[0] == b[0] == space.exact_genotype()  # the prior: exact moves first, whatever the seed
    assert a != b


@pytest.mark.parametrize("cls,options", [(RandomSearch, {}), (GridSearch, {}), (GridSearch, {"knobs": "sites"}),
                                         (EvolutionarySearch, {})])
def test_no_repeats_never_original_all_valid(cls, options):
    space = make_space(300, exact_every=6)
    st = cls(space, seed=3, **options)
    history = drive(st, some_score, 400, batch=4)
    asked = [g for g, _ in history]
    assert Genotype() not in asked
    assert len(set(asked)) == len(asked)
    for g in asked:
        assert space.genotype(dict(g)) == g
    if cls is not GridSearch or options:
        assert len(asked) == 400


@pytest.mark.parametrize("cls,options", [(RandomSearch, {}), (GridSearch, {"knobs": "sites"}),
                                         (EvolutionarySearch, {}), (EvolutionarySearch, {"population": 4})])
@pytest.mark.parametrize("batch", [1, 5])
def test_exhaustion_proposes_each_genotype_once(cls, options, batch):
    space = tiny_space()
    st = cls(space, seed=0, **options)
    asked = [g for g, _ in drive(st, some_score, 100, batch=batch)]
    assert len(asked) == len(set(asked)) == 11
    assert set(asked) == all_genotypes(space) - {Genotype()}
    assert st.ask(3) == []
    assert st.ask(1) == []


@pytest.mark.parametrize("cls", [RandomSearch, EvolutionarySearch])
def test_exhaustion_without_any_tell(cls):
    space = tiny_space()
    st = cls(space, seed=5)
    asked = st.ask(50)
    assert len(asked) == 11 and set(asked) == all_genotypes(space) - {Genotype()}
    assert st.ask(1) == []


@pytest.mark.parametrize("cls", STRATEGIES)
def test_empty_space_is_done_at_once(cls):
    assert cls(SearchSpace([]), seed=0).ask(4) == []


@pytest.mark.parametrize("cls", STRATEGIES)
def test_resume_never_repeats_replayed(cls):
    space = make_space(40, exact_every=4)
    first = drive(cls(space, seed=11), some_score, 30)
    resumed = cls(space, seed=11)
    resumed.tell(first)
    more = [g for g, _ in drive(resumed, some_score, 50)]
    assert not set(more) & {g for g, _ in first}
    assert len(set(more)) == len(more)


# ------------------------------------------------------------------------------------------ grid
def test_grid_pass_knobs_order():
    space = SearchSpace([
        Site("conv_bn:/a", "conv_bn", ("/a",), ("keep", "fuse"), exact_choice="fuse"),
        Site("width:/c", "width", ("/c",), (1.0, 0.75, 0.5)),
        Site("conv_bn:/b", "conv_bn", ("/b",), ("keep", "fuse"), exact_choice="fuse"),
        Site("width:/d", "width", ("/d",), (1.0, 0.5, 0.75)),
        Site("int8:/e", "int8", ("/e",), ("keep", "int8")),
    ])
    st = GridSearch(space)
    assert [k.name for k in st.knobs] == ["conv_bn", "int8", "width"]  # by pass name
    assert st.knobs[2].values == [None, 0.75, 0.5]  # common choices, in the first site's order
    fuse = {"conv_bn:/a": "fuse", "conv_bn:/b": "fuse"}
    w75, w50 = {"width:/c": 0.75, "width:/d": 0.75}, {"width:/c": 0.5, "width:/d": 0.5}
    q = {"int8:/e": "int8"}
    expected = [fuse,  # all-exact first
                w75, w50, q, {**q, **w75}, {**q, **w50},  # conv_bn keep
                {**fuse, **w75}, {**fuse, **w50}, {**fuse, **q}, {**fuse, **q, **w75}, {**fuse, **q, **w50}]
    asked = []
    while batch := st.ask(4):
        asked.extend(batch)
    assert asked == [Genotype(g) for g in expected]
    assert st.size() == 12 and st.ask(1) == []


def test_grid_pass_knob_without_common_choice_uses_union_and_keeps_the_rest():
    space = SearchSpace([
        Site("kernel:/a", "kernel", ("/a",), ("keep", "k3")),
        Site("kernel:/b", "kernel", ("/b",), ("keep", "k5", "k3")),
        Site("kernel:/c", "kernel", ("/c",), ("keep", "k5")),
    ])
    st = GridSearch(space)
    assert st.knobs[0].values == [None, "k3", "k5"]
    assert st.ask(5) == [Genotype({"kernel:/a": "k3", "kernel:/b": "k3"}),
                         Genotype({"kernel:/b": "k5", "kernel:/c": "k5"})]


def test_grid_site_knobs_order_and_skips_told():
    space = tiny_space()
    st = GridSearch(space, knobs="sites")
    assert [k.name for k in st.knobs] == ["conv_bn:/a", "conv_bn:/c", "width:/b"]
    st.tell([(Genotype({"width:/b": 0.5}), 1.0)])
    asked = st.ask(100)
    exact = Genotype({"conv_bn:/a": "fuse", "conv_bn:/c": "fuse"})
    order = [Genotype({k: v for k, v in zip(("conv_bn:/a", "conv_bn:/c", "width:/b"), combo)
                       if v not in ("keep", 1.0)})
             for combo in product(("keep", "fuse"), ("keep", "fuse"), (1.0, 0.75, 0.5))]
    assert asked == [exact] + [g for g in order if g not in (Genotype(), exact, Genotype({"width:/b": 0.5}))]


def test_grid_rejects_unknown_knobs():
    with pytest.raises(ValueError, match="knobs"):
        GridSearch(tiny_space(), knobs="layers")


# ---------------------------------------------------------------------------------- evolutionary
def test_evolution_prior_is_sparse():
    space = make_space(300, exact_every=4)
    st = EvolutionarySearch(space, seed=0, population=16)
    first = st.ask(16)
    assert first[0] == space.exact_genotype()
    assert all(len(g) == 1 for g in first[1:9])  # single-gene mutants of the original
    costs = [space.site(next(iter(g))).cost for g in first[1:9]]
    assert costs == sorted(costs, reverse=True)  # largest sites first
    assert all(1 <= len(g) <= 4 for g in first[1:])
    later = [g for g, _ in drive(st, some_score, 200)]
    assert max(len(g) for g in later) < 60  # grows by mutation, never sampled densely


def test_evolution_population_ages_out_oldest():
    space = make_space(50)
    st = EvolutionarySearch(space, seed=0, population=5)
    history = drive(st, some_score, 23)
    assert list(st.population) == history[-5:]


def test_evolution_infeasible_loses_every_tournament():
    space = make_space(100)
    st = EvolutionarySearch(space, seed=0, population=8, sample=8, crossover=0.0)
    good = Genotype({"conv_bn:/n000": "fuse"})
    far = [Genotype({s.key: s.choices[-1] for s in space.sites[10 * i + 10:10 * i + 20]}) for i in range(7)]
    st.tell([(g, math.inf) for g in far[:4]] + [(good, 5.0)] + [(g, math.inf) for g in far[4:]])
    for child in st.ask(40):
        diff = set(child) ^ set(good) | {k for k in set(child) & set(good) if child[k] != good[k]}
        assert 1 <= len(diff) <= 3  # a mutant of the only finite member


def test_evolution_crossover_mixes_parents():
    space = make_space(40)
    st = EvolutionarySearch(space, seed=0, population=2, sample=1, crossover=1.0)
    a = Genotype({s.key: s.choices[1] for s in space.sites[:20]})
    b = Genotype({s.key: s.choices[1] for s in space.sites[20:]})
    st.tell([(a, 1.0), (b, 1.0)])
    children = st.ask(20)
    mixed = [c for c in children if set(c) & set(a) and set(c) & set(b)]
    assert mixed and all(set(c) <= set(a) | set(b) for c in mixed)


@pytest.mark.parametrize("k", [5, 16, 40, 90])
def test_evolution_resume_rebuilds_population_and_continues(k):
    space = make_space(80, exact_every=4)
    score = hidden_objective(space)
    whole = EvolutionarySearch(space, seed=4)
    history = drive(whole, score, k)
    population_at_k = list(whole.population)
    rest = [g for g, _ in drive(whole, score, 40)]

    resumed = EvolutionarySearch(space, seed=4)
    resumed.tell(history)  # the driver replays the store in id order
    assert list(resumed.population) == population_at_k
    more = [g for g, _ in drive(resumed, score, 40)]
    assert not set(more) & {g for g, _ in history}
    assert more == rest  # and goes on exactly as the uninterrupted run did


def test_evolution_beats_random_at_equal_budget(capsys):
    space = make_space(100)
    score = hidden_objective(space)

    def best(cls, seed):
        return min(s for _, s in drive(cls(space, seed=seed), score, 150))

    evo = [best(EvolutionarySearch, s) for s in range(5)]
    rnd = [best(RandomSearch, s) for s in range(5)]
    with capsys.disabled():
        print(f"\n  original {score(Genotype()):.2f}; best of 150, mean over 5 seeds: "
              f"evolutionary {statistics.mean(evo):.2f}, random {statistics.mean(rnd):.2f}")
    assert statistics.mean(evo) < statistics.mean(rnd)
