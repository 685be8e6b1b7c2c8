"""Exact moves are not a search dimension: one gene per pass instead of one per site.

An exact move (a site's `exact_choice`: conv-BN fusion, attention fusion) computes the same
function wherever it is applied, so searching it per site (conv_bn over EfficientNet-Lite0's 49
sites: 2^49 genotypes) spends the budget on candidates that differ only in latency noise. By
default (`group_exact`) each pass's exact choices become ONE site, `<pass>:*exact`, with choices
("keep", <the exact choice>): on, the exact move is applied at every site of that pass that has
no gene of its own; off, nowhere. The search still finds out whether the fusion pays on the
target (DESIGN: on some compilers it does not), with one candidate instead of 2^n.

A site whose other choices are approximate (attention: "fused" exact; prune_k / window_W /
linear approximate) keeps a per-site gene with its approximate choices; its exact choice moves to
the pass's group gene. A site with nothing but keep and the exact choice has no gene of its own.

`--search-exact` (RunConfig.search_exact) keeps the per-site genes (the behaviour before).

materialize() expands a group gene into its members' (site, choice) moves (SearchSpace.groups),
so passes only ever see their own sites.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .genotype import Choice, Genotype, SearchSpace, Site

GROUP_SUFFIX = ":*exact"


def group_key(pass_name: str) -> str:
    return f"{pass_name}{GROUP_SUFFIX}"


def build_space(sites_by_pass: Mapping[str, Iterable[Site]], search_exact: bool = False) -> SearchSpace:
    """The run's search space from each pass's sites: per-site exact genes (search_exact) or one
    group gene per pass that has exact sites (default)."""
    if search_exact:
        return SearchSpace([s for sites in sites_by_pass.values() for s in sites])
    out: list[Site] = []
    groups: dict[str, tuple[tuple[Site, Choice], ...]] = {}
    for name, sites in sites_by_pass.items():
        sites = list(sites)
        members = [(s, s.exact_choice) for s in sites if s.exact_choice is not None]
        if not members:
            out.extend(sites)
            continue
        kinds = sorted({str(c) for _, c in members})
        choice = members[0][1] if len(kinds) == 1 else "exact"
        key = group_key(name)
        out.append(Site(key=key, pass_name=name, nodes=tuple(n for s, _ in members for n in s.nodes),
                        choices=("keep", choice), exact_choice=choice, cost=sum(s.cost for s, _ in members),
                        note=f"the exact move ({', '.join(kinds)}) at all {len(members)} {name} sites as one gene "
                             "(--search-exact: one gene per site)"))
        groups[key] = tuple(members)
        for s in sites:
            if s.exact_choice is None:
                out.append(s)
                continue
            rest = tuple(c for c in s.choices[1:] if c != s.exact_choice)
            if rest:  # approximate choices stay a per-site gene, overriding the group's exact move there
                out.append(Site(key=s.key, pass_name=s.pass_name, nodes=s.nodes, choices=(s.keep,) + rest,
                                exact_choice=None, cost=s.cost, note=s.note))
    return SearchSpace(out, groups=groups)


def expand(space: SearchSpace, genotype: Genotype) -> list[tuple[Site, Choice, str]]:
    """The genotype's moves as (site, choice, gene key) on per-site sites, in space order; a group
    gene expands to its members that have no gene of their own in the genotype."""
    groups = space.groups
    order = {s.key: i for i, s in enumerate(space.sites)}
    out: list[tuple[float, Site, Choice, str]] = []
    for key, choice in genotype.items():
        if key in groups:
            for j, (member, mchoice) in enumerate(groups[key]):
                if member.key not in genotype:
                    out.append((order[key] + j / (len(groups[key]) + 1), member, mchoice, key))
        else:
            out.append((order[key], space.site(key), choice, key))
    out.sort(key=lambda t: t[0])
    return [(s, c, k) for _, s, c, k in out]
