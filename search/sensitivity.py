"""Sensitivity-guided search: measure each single move, then combine them greedily (NetAdapt).

mode="moves" (default), after NetAdapt (Yang et al., ECCV 2018), measured on the target:
  1. singles: every site's every non-keep choice alone, largest sites first (Site.cost). Each
     gives a latency gain g = baseline_ms - latency_ms on the target and a quality loss
     l = baseline_fidelity - fidelity on the selection data (Result, tell_results).
  2. greedy: the singles that were feasible and faster than the original, best g / l first (an
     exact move, l ~ 0, first of all), are added one at a time to the current genotype, and
     each combination is measured again on the target: moves interact (two fusions can share a
     kernel; a pruned layer makes the next one cheaper), so the sum of singles is not trusted.
     A combination is kept when it is feasible (meets --min-fidelity and the other
     constraints) and faster than the current one; otherwise the move is dropped and the next
     one is tried, until the list is exhausted: the constraint binds move by move.
     Option min_gain (a fraction, default 0): a single or a combination counts as faster only
     when it saves more than that fraction of the latency (a noise margin for loaded machines).
  3. then (option `then`, default "evolutionary"): with budget left, the rest is handed to the
     evolutionary strategy, told every result so far (the greedy result, best-scored, is in its
     population), so it mutates and crosses the greedy result instead of starting cold.
     then="none" ends the search after the greedy phase.

mode="int8", the semantics of NNCF's quantize_with_accuracy_control, measured, not assumed:
  1. every int8 layer site quantized (choice `quant`, "int8" = static QDQ by default,
     "dynamic" for dynamic int8 MatMuls), plus the space's exact moves;
  2. if that meets the constraint: done. Else, for each quantized layer, the candidate with that
     one layer back in float: its fidelity ranks the layers (most sensitive = the largest
     recovery when reverted);
  3. the most sensitive layers are returned to float cumulatively, top 1, top 2, ..., each
     combination measured, until one meets the constraint.
  Then, like mode "moves", the evolutionary strategy may go on from there.

Strategies see numbers, not graphs: latency and fidelity come through tell_results (plain
tell() carries only the score: latency when feasible, inf when not). Proposals are one at a
time and depend on the last result: the greedy phase asks nothing while one is in flight, and
the pipelined driver (--jobs > 1) ends a search when its strategy has nothing to ask; use
--jobs 1 (the default).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from graphopt.genotype import Choice, Genotype, SearchSpace, Site
from graphopt.plugin import Option, Result, Strategy

MODES = ("moves", "int8")
_EPS_LOSS = 1e-9  # quality loss of an exact move (float noise): ranked first, by latency gain


class SensitivitySearch(Strategy):
    name = "sensitivity"
    description = ("NetAdapt-style: measure each single move, add moves greedily by latency gained per quality "
                   "lost (re-measured); mode=int8: quantize all, return the most sensitive layers to float")
    OPTIONS = (
        Option("mode", str, "moves", "measure single moves, or start all-int8 and return layers", choices=MODES),
        Option("then", str, "evolutionary", "what searches after the greedy phase", choices=("evolutionary", "none")),
        Option("quant", str, "int8", "the quantization choice mode=int8 starts from"),
        Option("max_singles", int, None, "single moves measured, at most", minimum=1),
        Option("min_gain", float, 0.0, "fraction of latency a move must save to count", minimum=0),
    ) + tuple(Option("evolutionary_" + o.name, o.type, o.default, "then=evolutionary: " + o.help, minimum=o.minimum)
              for o in (
                  Option("population", int, 16, "genotypes alive at once", minimum=1),
                  Option("sample", int, 4, "tournament size", minimum=1),
                  Option("crossover", float, 0.3, "probability a child mixes two parents (0 to 1)", minimum=0),
                  Option("max_mutations", int, 3, "genes changed per child, at most", minimum=1),
                  Option("prior_genes", int, 4, "genes of the sparse prior's first proposals", minimum=1),
              ))

    def __init__(self, space: SearchSpace, seed: int = 0, mode: str = "moves", then: str = "evolutionary",
                 quant: str = "int8", max_singles: int | None = None, min_gain: float = 0.0,
                 **options: Any) -> None:
        super().__init__(space, seed, **options)
        if mode not in MODES:
            raise ValueError(f"sensitivity: mode={mode!r}; choose one of {', '.join(MODES)}")
        if then not in ("evolutionary", "none"):
            raise ValueError(f"sensitivity: then={then!r}; choose evolutionary or none")
        self.mode, self.then, self.quant = mode, then, quant
        self.min_gain = float(min_gain)  # fraction of the latency a move must save to count (noise margin)
        self.results: dict[Genotype, Result] = {}
        self.seen: set[Genotype] = {Genotype()}
        self.baseline_ms: float | None = None
        self.baseline_fidelity: float | None = None
        self.current = Genotype()  # the greedy phase's accepted genotype
        self.current_ms: float | None = None
        self.log: list[tuple[str, Genotype, str]] = []  # (phase, genotype, outcome), for tests and reports
        self._waiting: Genotype | None = None  # the proposal whose result decides the next one
        self._next_phase: Any = None
        self._evo: Strategy | None = None
        self._evo_options = {k[len("evolutionary_"):]: v for k, v in options.items() if k.startswith("evolutionary_")}
        if mode == "moves":
            self._singles = self._single_moves(max_singles)
            self._queue = list(self._singles)
            self._ranked: list[Genotype] | None = None
        else:
            self._int8_sites = [s for s in space.sites if s.pass_name == "int8" and quant in s.choices[1:]
                                and not s.key.endswith(":*")]
            if not self._int8_sites:
                raise ValueError(f"sensitivity: mode=int8 needs the int8 pass (per-layer sites with choice {quant!r})")
            base = {k: v for k, v in space.exact_genotype().items() if space.site(k).pass_name != "int8"}
            self._base = base
            self._all = Genotype({**base, **{s.key: quant for s in self._int8_sites}})
            self._queue = [self._all]
            self._stage = "all"
            self._ranking: list[str] | None = None
            self._reverted = 0

    # -------------------------------------------------------------------------------- helpers
    def _single_moves(self, limit: int | None) -> list[Genotype]:
        order = {s.key: i for i, s in enumerate(self.space.sites)}
        sites = sorted(self.space.sites, key=lambda s: (-s.cost, order[s.key]))
        out = [Genotype({s.key: c}) for s in sites for c in s.choices[1:]]
        return out[:limit] if limit else out

    def _gain_per_loss(self, r: Result) -> tuple[float, float] | None:
        """(latency gain in ms, quality loss) of a measured single move, None if it does not pay."""
        if r.status != "ok" or not math.isfinite(r.score) or r.latency_ms is None or self.baseline_ms is None:
            return None
        gain = self.baseline_ms - r.latency_ms
        if gain <= self.min_gain * self.baseline_ms:
            return None
        q0 = self.baseline_fidelity if self.baseline_fidelity is not None else 1.0
        loss = max((q0 - r.fidelity) if r.fidelity is not None else math.inf, 0.0)
        return gain, loss

    def _feasible(self, g: Genotype) -> bool:
        r = self.results.get(g)
        return r is not None and math.isfinite(r.score)

    # -------------------------------------------------------------------------------- ask/tell
    def ask(self, n: int = 1) -> list[Genotype]:
        out: list[Genotype] = []
        while len(out) < n:
            g = self._next()
            if g is None:
                break
            self.seen.add(g)
            out.append(g)
        return out

    def _next(self) -> Genotype | None:
        if self._evo is not None:
            return self._evo_next()
        if self._waiting is not None:
            return None  # the next proposal depends on this one's measurement
        g = self._plan()
        if g == "wait":
            return None
        if g is None:
            return self._handover()
        return g

    def _plan(self) -> "Genotype | str | None":
        """The next proposal of the current phase (advancing phases on results already known);
        "wait" while results still in flight decide what comes next; None when the phases are over."""
        while True:
            while self._queue:
                g = self._queue.pop(0)
                if g in self.results:  # measured already (a single that is also the first combination)
                    self._on_result(self.results[g])
                    continue
                if g in self.seen:
                    continue
                if self.mode == "int8" or self._ranked is not None:
                    self._waiting = g
                return g
            step = self._advance()
            if step != "more":
                return None if step == "done" else "wait"

    def _advance(self) -> str:
        """Fill the queue for the next phase: "more", "wait" (results in flight) or "done"."""
        if self.mode == "moves":
            if self._ranked is not None:
                return "done"
            if any(g not in self.results for g in self._singles):
                return "wait"  # singles still in flight (pipelined driver)
            scored = []
            for i, g in enumerate(self._singles):
                gl = self._gain_per_loss(self.results[g])
                if gl is not None:
                    gain, loss = gl
                    scored.append((-gain / max(loss, _EPS_LOSS), -gain, i, g))
            scored.sort(key=lambda t: t[:3])
            self._ranked = [g for *_, g in scored]
            self.current, self.current_ms = Genotype(), self.baseline_ms
            self._queue = [self._combine(g) for g in self._ranked[:1]]
            self._pending_moves = self._ranked[1:]
            return "more" if self._queue else "done"
        if self._stage == "rank" and self._rank_left > 0:
            return "wait"
        return "done"  # int8: each stage queues its successor in _on_result

    def _combine(self, single: Genotype) -> Genotype:
        return Genotype({**self.current, **single})

    def _handover(self) -> Genotype | None:
        if self.then != "evolutionary" or not self.space.sites:
            return None
        from graphopt.search.evolutionary import EvolutionarySearch

        self._evo = EvolutionarySearch(self.space, seed=self.seed, **self._evo_options)
        # worst first: aging keeps the last told, so the best (the greedy result) stay in its population
        known = sorted(self.results.values(), key=lambda r: -r.score if math.isfinite(r.score) else -math.inf)
        self._evo.tell([(r.genotype, r.score) for r in known])
        self._evo.seen |= self.seen
        return self._evo_next()

    def _evo_next(self) -> Genotype | None:
        out = self._evo.ask(1)
        return out[0] if out else None

    def tell_results(self, results: Sequence[Result]) -> None:
        for r in results:
            self.seen.add(r.genotype)
            if r.baseline_ms is not None:
                self.baseline_ms = r.baseline_ms
            if r.baseline_fidelity is not None:
                self.baseline_fidelity = r.baseline_fidelity
            self.results[r.genotype] = r
            if self.baseline_ms is not None and Genotype() not in self.results:  # the original, for int8 ranks
                q0 = self.baseline_fidelity if self.baseline_fidelity is not None else 1.0
                self.results[Genotype()] = Result(Genotype(), self.baseline_ms, "ok", self.baseline_ms, q0,
                                                  self.baseline_ms, r.min_fidelity, q0)
            if self._evo is not None:
                self._evo.tell([(r.genotype, r.score)])
                continue
            if r.genotype == self._waiting:
                self._waiting = None
                self._on_result(r)

    def tell(self, scored: Sequence[tuple[Genotype, float]]) -> None:
        """Scores alone (a caller without tell_results): latency = score when finite."""
        self.tell_results([Result(g, s, "ok" if math.isfinite(s) else "infeasible",
                                  s if math.isfinite(s) else None) for g, s in scored])

    # ------------------------------------------------------------------------------ decisions
    def _on_result(self, r: Result) -> None:
        if self.mode == "moves":
            self._on_combination(r)
        else:
            self._on_int8(r)

    def _on_combination(self, r: Result) -> None:
        if self._ranked is None:
            return  # a single: ranked when all are in
        g = r.genotype
        if g != self.current and self._feasible(g) and r.latency_ms is not None and \
                (self.current_ms is None or r.latency_ms < self.current_ms * (1.0 - self.min_gain)):
            self.current, self.current_ms = g, r.latency_ms
            self.log.append(("greedy", g, "kept"))
        else:
            self.log.append(("greedy", g, "dropped" + ("" if self._feasible(g) else " (infeasible)")))
        while self._pending_moves:
            nxt = self._combine(self._pending_moves.pop(0))
            if nxt == self.current or nxt == g:
                continue
            if nxt in self.results or nxt not in self.seen:  # measured before: decided at once by _plan
                self._queue.append(nxt)
                return

    def _on_int8(self, r: Result) -> None:
        g = r.genotype
        if self._stage == "all":
            self.log.append(("int8", g, "feasible" if self._feasible(g) else "infeasible: ranking layers"))
            if self._feasible(g):
                self._stage = "done"
                return
            self._stage = "rank"
            self._queue = [Genotype({k: v for k, v in self._all.items() if k != s.key}) for s in self._int8_sites]
            self._waiting = None
            self._rank_left = len(self._queue)
            return
        if self._stage == "rank":
            self._rank_left -= 1
            if self._rank_left > 0:
                return
            q = {s.key: self.results.get(Genotype({k: v for k, v in self._all.items() if k != s.key}))
                 for s in self._int8_sites}
            fid = {k: (x.fidelity if x is not None and x.fidelity is not None else -math.inf) for k, x in q.items()}
            order = {s.key: i for i, s in enumerate(self._int8_sites)}
            self._ranking = sorted(fid, key=lambda k: (-fid[k], order[k]))
            self.log.append(("int8", g, "ranked: " + ", ".join(self._ranking)))
            self._stage = "revert"
            self._reverted = 0
            self._revert_next()
            return
        if self._stage == "revert":
            if self._feasible(g):
                self.log.append(("int8", g, f"feasible with {self._reverted} layer(s) in float"))
                self.current = g
                self._stage = "done"
                return
            self._revert_next()

    def _revert_next(self) -> None:
        self._reverted += 1
        if self._reverted > len(self._ranking):
            self._stage = "done"
            return
        back = set(self._ranking[: self._reverted])
        g = Genotype({k: v for k, v in self._all.items() if k not in back})
        self._queue = [g]

    # ----------------------------------------------------------------------------------- views
    @property
    def ranking(self) -> list[str] | None:
        """int8 mode: the layer sites, most sensitive first (once ranked)."""
        return getattr(self, "_ranking", None)

    @property
    def order(self) -> list[Genotype] | None:
        """moves mode: the single moves that paid, best latency gained per quality lost first."""
        return getattr(self, "_ranked", None)
