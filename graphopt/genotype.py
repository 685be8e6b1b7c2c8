"""Sites, genotypes and the search space: the only things strategies ever see."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

Choice = Any  # a JSON scalar: str, int, float or bool


@dataclass(frozen=True)
class Site:
    """One place a pass can act, keyed by node names of the *base* model.

    `choices[0]` always means "keep" (leave the graph as it is). `exact_choice`, when set,
    names the choice that is a numerically exact rewrite (e.g. conv-BN fusion): strategies use
    it as a prior. `nodes` are the base-model node names the move touches; `cost` is a rough
    size of the site (FLOPs), used by strategies and reports to rank sites.
    """

    key: str
    pass_name: str
    nodes: tuple[str, ...]
    choices: tuple[Choice, ...]
    exact_choice: Choice | None = None
    cost: float = 0.0
    note: str = ""

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"site {self.key}: needs 'keep' plus at least one choice")
        if self.exact_choice is not None and self.exact_choice not in self.choices[1:]:
            raise ValueError(f"site {self.key}: exact_choice {self.exact_choice!r} not in choices")

    @property
    def keep(self) -> Choice:
        return self.choices[0]


class Genotype(Mapping[str, Choice]):
    """Frozen, sorted mapping site_key -> choice holding only non-keep genes.

    Hashable and JSON-serialisable; the run store keys candidates on `to_json()`.
    The empty genotype is the original model.
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, genes: Mapping[str, Choice] | Iterable[tuple[str, Choice]] = ()):
        items = dict(genes)
        self._items: tuple[tuple[str, Choice], ...] = tuple(sorted(items.items()))
        self._hash = hash(self._items)

    def __getitem__(self, key: str) -> Choice:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Genotype) and self._items == other._items

    def __repr__(self) -> str:
        return f"Genotype({dict(self._items)!r})"

    def to_json(self) -> str:
        return json.dumps(dict(self._items), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Genotype":
        return cls(json.loads(text))

    def describe(self, limit: int = 4) -> str:
        """Short human form for logs: 'original' or 'conv_bn:/bn1=fuse, ... (+3 more)'."""
        if not self._items:
            return "original"
        parts = [f"{k}={v}" for k, v in self._items[:limit]]
        more = len(self._items) - limit
        return ", ".join(parts) + (f" (+{more} more)" if more > 0 else "")


@dataclass
class SearchSpace:
    """All sites of all enabled passes on the base model; computed once per run."""

    sites: list[Site] = field(default_factory=list)
    # group gene key -> its members' (per-site Site, choice): one gene for a pass's exact moves
    # (graphopt.exact; materialize expands it)
    groups: dict[str, tuple[tuple[Site, Choice], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_key = {}
        for s in self.sites:
            if s.key in self._by_key:
                raise ValueError(f"duplicate site key {s.key!r}")
            self._by_key[s.key] = s

    def __len__(self) -> int:
        return len(self.sites)

    def site(self, key: str) -> Site:
        return self._by_key[key]

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def genotype(self, genes: Mapping[str, Choice]) -> Genotype:
        """Validated genotype: unknown sites or choices raise ValueError; keep genes dropped."""
        out = {}
        for k, v in genes.items():
            if k not in self._by_key:
                raise ValueError(f"unknown site {k!r}")
            site = self._by_key[k]
            if v not in site.choices:
                raise ValueError(f"site {k!r}: choice {v!r} not in {site.choices}")
            if v != site.keep:
                out[k] = v
        return Genotype(out)

    def exact_genotype(self) -> Genotype:
        """Every exact move applied: the natural first candidate after the original."""
        return Genotype({s.key: s.exact_choice for s in self.sites if s.exact_choice is not None})

    def log10_size(self) -> float:
        return sum(math.log10(len(s.choices)) for s in self.sites)

    def by_pass(self) -> dict[str, list[Site]]:
        out: dict[str, list[Site]] = {}
        for s in self.sites:
            out.setdefault(s.pass_name, []).append(s)
        return out
