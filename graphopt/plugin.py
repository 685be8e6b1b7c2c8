"""The three plugin interfaces: Pass, Target, Strategy. Read this file to write a plugin.

A plugin is one class registered by name, built-in (graphopt/registry.py) or through an entry
point in the third party's own package:

    [project.entry-points."graphopt.passes"]     my_pass = "my_pkg.passes:MyPass"
    [project.entry-points."graphopt.targets"]    jetson  = "my_pkg.jetson:Jetson"
    [project.entry-points."graphopt.strategies"] bayes   = "my_pkg.bayes:Bayes"

House rules: passes never measure, targets never choose moves, strategies see only genotypes
and numbers (a float score; through tell_results also the latency and fidelity behind it). Failure is a value: raise (or return False from Pass.apply) and the driver
records the message against the candidate.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from .genotype import Choice, Genotype, SearchSpace, Site

if TYPE_CHECKING:  # heavy imports stay out of the CLI's import path
    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs


# -------------------------------------------------------------------------------------- options
_BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off", "")


@dataclass(frozen=True)
class Option:
    """One option of a plugin, declared in its class's `OPTIONS` table:

        OPTIONS = (Option("repeat", int, 5, "timed repeats (median reported)", minimum=1), ...)

    `type` is int, float, bool, str or list; `choices` limits a str option; `minimum` an int or
    float one. The registry checks --pass-opt / --target-opt / --strategy-opt values against the
    table before anything runs (graphopt.registry.check_options); `graphopt list` shows it. A value
    reaches the plugin as typed and only when given: read ctx.options.get(name, default)."""

    name: str
    type: Any = str
    default: Any = None
    help: str = ""
    choices: tuple = ()
    minimum: float | None = None

    def problem(self, value: Any) -> str | None:
        """None if `value` fits this option, else what it expects (a few words)."""
        if value is None:
            return None
        t = self.type
        if t is object:  # undocumented (a constructor keyword not in the table): the plugin checks it
            return None
        if t is bool:
            return None if isinstance(value, bool) or str(value).strip().lower() in _BOOL_WORDS else "expected 1 or 0"
        if t in (int, float):
            try:
                v = None if isinstance(value, bool) else t(value)
                v = None if t is int and float(value) != v else v
            except (TypeError, ValueError):
                v = None
            if v is None:
                return "expected an integer" if t is int else "expected a number"
            return f"expected a number >= {self.minimum:g}" if self.minimum is not None and v < self.minimum else None
        if t is list:
            return None if isinstance(value, (list, tuple, str)) else "expected a list"
        if isinstance(value, (dict, list)):
            return "expected a single value"
        if self.choices and str(value) not in self.choices:
            return f"expected one of {', '.join(map(str, self.choices))}"
        return None

    def describe(self) -> str:
        kind = "|".join(map(str, self.choices)) if self.choices else getattr(self.type, "__name__", str(self.type))
        default = "" if self.default is None else f", default {self.default}"
        return f"{self.name} ({kind}{default}): {self.help}" if self.help else f"{self.name} ({kind}{default})"


# --------------------------------------------------------------------------------------- passes
@dataclass
class MoveContext:
    """What a move may read besides the graph it edits.

    `base_model`: the original (shape-inferred) ModelProto, never to be edited.
    `calibration`: input name -> array with a leading sample axis (for data-driven repair).
    `options`: per-run pass options from the CLI/API (e.g. {"repair": True}).
    `cache`: shared by all moves of a run, for expensive read-only facts about the base model.
    """

    base_model: "onnx.ModelProto"
    calibration: Mapping[str, "np.ndarray"] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)  # per-run memo (e.g. original activations)


class Match:
    """What a pass's match(graph, node) found: the nodes the rewrite touches (base-graph order;
    their names become the site's `nodes`) and, by keyword, whatever rewrite() needs.

        return Match(conv, mul, scale=s, note=f"Conv {conv.name} -> Mul {mul.name}")

    `choices` (None: the pass's `choices`), `exact_choice` (None: the pass's), `cost` (rough
    FLOPs) and `note` (shown by `graphopt inspect`) become the Site's fields.
    """

    def __init__(self, *nodes: "gs.Node", choices: tuple | None = None, exact_choice: Any = None,
                 cost: float = 0.0, note: str = "", **named: Any) -> None:
        if not nodes:
            raise ValueError("Match needs at least one node")
        self.nodes = tuple(nodes)
        self.choices, self.exact_choice, self.cost, self.note = choices, exact_choice, float(cost), note
        self.__dict__.update(named)

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)


@dataclass
class Fail:
    """Why a node is not a site (onnxscript's MatchResult.fail): `reason` in a few words, and the
    node it is about (default: the node match() was called on). Falsy, so `if not m: return m`."""

    reason: str
    node: Any = None

    def __bool__(self) -> bool:
        return False


class Pass:
    """A rewrite that acts at sites of the base graph.

    The short way (a pattern + check + rewrite pass; passes/conv_mul.py is a whole example):
    set `anchor_ops` (the op types a site starts from), `choices` (keep first), `exact_choice`; define
        match(graph, node) -> Match | Fail | None   read-only: the pattern and the conditions
                                                    (None: not this pass's pattern, say nothing)
        rewrite(graph, match, choice, ctx)         edit the graph (graphopt/rewrite.py helpers)
    The base class derives sites() (key "<name>:<anchor node name>"), rejections() (each Fail) and
    apply() (check_choice(), then a re-match of the anchor on the graph being edited: False when the
    site went stale). Passes whose sites are not one per node (width, depth, ...) take the long way:

    `sites(graph)` is read-only and returns the places the pass can act on the *base* graph.
    `apply(graph, site, choice, ctx)` edits `graph` (a private clone) in place for one non-keep
    choice and returns True, or returns False when the move no longer applies (an earlier move
    removed its nodes). Do not call cleanup()/toposort(): materialize finalizes once.
    `stage` orders passes inside one candidate (lower first): exact fusions, architecture moves, int8.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    stage: ClassVar[int] = 50
    # True when apply() fits weights to ctx.calibration: the driver then holds half of the
    # calibration samples out of the fit and measures fidelity on them.
    uses_calibration: ClassVar[bool] = False
    # "exact" when every choice computes the same function as the original; otherwise how the
    # approximate choices change outputs, in a few words (tests/test_pass_contract.py checks it).
    fidelity: ClassVar[str] = ""
    # the pass options it reads from ctx.options (--pass-opt); None: not declared (not checked)
    OPTIONS: ClassVar[tuple[Option, ...] | None] = None
    # for match()-based passes (see above)
    anchor_ops: ClassVar[tuple[str, ...]] = ()
    choices: ClassVar[tuple[Choice, ...]] = ("keep", "apply")
    exact_choice: ClassVar[Choice | None] = None

    match: ClassVar[Any] = None  # def match(self, graph, node) -> Match | Fail | None

    def rewrite(self, graph: "gs.Graph", match: Match, choice: Choice, ctx: MoveContext) -> bool | None:
        """Edit `graph` for one non-keep choice at a match; return False to say it did not apply."""
        raise NotImplementedError

    def check_choice(self, site: Site, choice: Choice) -> None:
        """ValueError for a choice apply() never takes at `site` (default: not one of its choices)."""
        if choice not in site.choices[1:]:
            raise ValueError(f"{self.name}: unknown choice {choice!r} for site {site.key}")

    def _matches(self, graph: "gs.Graph"):
        if self.match is None:
            raise NotImplementedError(f"pass {self.name!r} defines neither match() nor sites()")
        for node in list(graph.nodes):
            if not self.anchor_ops or node.op in self.anchor_ops:
                yield node, self.match(graph, node)

    def site_key(self, node: "gs.Node") -> str:
        return f"{self.name}:{node.name}"

    def sites(self, graph: "gs.Graph") -> list[Site]:
        out = []
        for node, m in self._matches(graph):
            if isinstance(m, Match):
                exact = m.exact_choice if m.exact_choice is not None else (
                    self.exact_choice if m.choices is None else None)
                out.append(Site(key=self.site_key(node), pass_name=self.name, nodes=m.node_names,
                                choices=tuple(m.choices or self.choices), exact_choice=exact,
                                cost=m.cost, note=m.note))
        return out

    def apply(self, graph: "gs.Graph", site: Site, choice: Choice, ctx: MoveContext) -> bool:
        if self.match is None:
            raise NotImplementedError(f"pass {self.name!r} defines neither match() nor apply()")
        self.check_choice(site, choice)
        from .rewrite import node_by_name

        node = node_by_name(graph, site.key.split(":", 1)[1])
        m = self.match(graph, node) if node is not None and (
            not self.anchor_ops or node.op in self.anchor_ops) else None
        if not isinstance(m, Match) or m.node_names != tuple(site.nodes):
            return False  # stale: an earlier move removed or changed the site's nodes
        return self.rewrite(graph, m, choice, ctx) is not False

    def finalize(self, model: "onnx.ModelProto", moves: list[tuple[Site, Choice]],
                 ctx: MoveContext) -> "onnx.ModelProto":
        """A whole-model step after every pass's apply() and the export (onnx.checker passed):
        `moves` are this pass's applied (site, choice) pairs; called only when there is one.
        For rewrites that work on whole models (int8 quantize_static). Return a checked model.
        Default: the model unchanged."""
        return model

    def rejections(self, graph: "gs.Graph") -> list[tuple[str, str]]:
        """(node name, why it is not a site) for near misses; shown by `graphopt inspect`.
        Default: each Fail that match() returns (none for a pass without match())."""
        return [] if self.match is None else [
            ((m.node or node).name, m.reason) for node, m in self._matches(graph) if isinstance(m, Fail)]

    def data_moves(self, sites: list[Site], options: Mapping[str, Any]) -> str | None:
        """What this pass's moves at `sites` fit to data with these options (calibration ranges,
        repaired weights, data-driven choices), in a few words; None when they need no data.
        Without --data, a run whose passes name something here stops (exit 2) unless the user
        passes --allow-synthetic (graphopt.evaluation.data). Default: from `uses_calibration`."""
        return "fits to calibration data" if self.uses_calibration else None

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise UsageError (one line: the option, the value, the fix) for a pass option this pass
        cannot use; called once at the start of a run (graphopt.world.open_world), before any candidate is built."""


# -------------------------------------------------------------------------------------- targets
LATENCY_METHODS = ("measured", "rpc", "estimated")


@dataclass
class LatencyStats:
    """Latency of one candidate in milliseconds, from repeated timed runs after warm-up."""

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    stdev_ms: float
    repeats: int
    runs_per_repeat: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], runs_per_repeat: int = 1) -> "LatencyStats":
        s = [float(x) for x in samples_ms]
        if not s:
            raise ValueError("no latency samples")
        return cls(
            median_ms=statistics.median(s),
            mean_ms=statistics.fmean(s),
            min_ms=min(s),
            max_ms=max(s),
            stdev_ms=statistics.stdev(s) if len(s) > 1 else 0.0,
            repeats=len(s),
            runs_per_repeat=runs_per_repeat,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Measurement:
    """How fast one compiled candidate ran, and how that number was obtained.

    `method` is one of "measured" (timed on this machine), "rpc" (timed on a remote device
    through TVM RPC) or "estimated" (a cost model; no device ran it). `tuned` says whether the
    code was tuned for the target (untuned TVM CPU code is 40-110x slower than tuned); None
    where the runtime has no tuning step (onnxruntime).
    """

    latency: LatencyStats
    method: str
    tuned: bool | None  # None: the runtime has no tuning step (onnxruntime)
    threads: int | None = None
    device: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in LATENCY_METHODS:
            raise ValueError(f"method must be one of {LATENCY_METHODS}, not {self.method!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency"] = self.latency.to_dict()
        return d


@dataclass
class Artifact:
    """A compiled candidate: whatever the target needs to measure it, plus files it wrote."""

    target: str
    files: list[Path] = field(default_factory=list)
    handle: Any = None  # in-process object (an ORT session, a TVM executable)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetContext:
    """What the driver tells a target (Target.inform) before each compile, in the search's process or a
    compile worker's: `deadline` (time.monotonic() when the run's budget ends; None: no budget), by when
    a tuning target stops tuning; `incumbent_ms` (the best latency so far; None: none yet), which a tuned
    candidate must beat; `profile_layers`: whether it wants per-layer latency (Measurement.extra["layers"])
    with the measurements that follow (on for one more measurement of the best at the end of a run)."""

    deadline: float | None = None
    incumbent_ms: float | None = None
    profile_layers: bool = False


def inform_target(target: Any, context: TargetContext) -> None:
    """Tell a target the run's context: Target.inform(), or for an object that does not derive from
    Target, set its `deadline` / `incumbent_ms` attributes where it has them."""
    if hasattr(target, "inform"):
        return target.inform(context)
    for name in (n for n in asdict(context) if hasattr(target, n)):
        setattr(target, name, getattr(context, name))


def current_context(target: Any) -> TargetContext:
    """The context a target was last told (a field never told: as the target's attribute has it)."""
    ctx = getattr(target, "context", None) or TargetContext()
    return replace(ctx, **{f: getattr(target, f) for f in asdict(ctx) if hasattr(target, f)})


def wants_context(target: Any) -> bool:
    """Whether a target reads the TargetContext (it overrides inform, or has the attributes)."""
    inform = getattr(type(target), "inform", None)
    return (inform is not None and inform is not Target.inform) or any(
        hasattr(target, n) for n in ("deadline", "incumbent_ms"))


class Target:
    """A compiler plus a device. compile() and measure() are separate steps.

    compile(model, workdir) builds the candidate (in the search's thread, one at a time, or with
    --compile-workers M in M worker processes, each with its own instance of the target: see
    portable()); measure(artifact, inputs) times it on the device (one at a time, unless
    concurrent_measure: then up to --jobs at once, in worker threads, while the next candidates
    compile); export(artifact, out_dir) writes the deployable files for the best candidate and
    returns their paths.
    `describe()` returns the facts a report needs (compiler, device, threads, tuned or not).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # its --target-opt options (constructor keywords); None: not declared (the constructor checks)
    OPTIONS: ClassVar[tuple[Option, ...] | None] = None

    def __init__(self, **options: Any) -> None:
        self.options = options

    # the run's context, as last told by inform()
    context: TargetContext = TargetContext()

    def check(self) -> None:
        """Raise TargetUnreachable / UsageError before the search if the target cannot work."""

    def inform(self, context: TargetContext) -> None:
        """Called before each compile with the run's TargetContext (deadline, best latency so far,
        whether to profile per layer).
        Default: keep it as `self.context`; a target with `deadline` / `incumbent_ms` attributes
        (x86, rpi4: the older way) gets them set as well."""
        self.context = context
        for name, value in asdict(context).items():
            if hasattr(self, name):
                setattr(self, name, value)

    @property
    def concurrent_measure(self) -> bool:
        """True when measure() may run in several threads at once without the measurements
        disturbing each other (separate remote devices); enables `--jobs N`."""
        return False

    @property
    def portable_artifacts(self) -> bool:
        """True when portable()/load_portable() carry this target's artifacts from a compile
        worker process to the search's process; enables `--compile-workers M > 1`."""
        return False

    def compile(self, model: "onnx.ModelProto", workdir: Path) -> Artifact:
        raise NotImplementedError

    def portable(self, artifact: Artifact, workdir: Path) -> Artifact:
        """Worker side of --compile-workers: an Artifact that can be pickled to the search's
        process (handle=None; what measure/export need written to files under `workdir`, named
        in `files`/`info`). Default: the artifact itself when it has no in-process handle."""
        if artifact.handle is not None:
            raise NotImplementedError(f"target {self.name!r} cannot move a compiled artifact between processes")
        return artifact

    def load_portable(self, artifact: Artifact) -> Artifact:
        """Search-process side of --compile-workers: turn what portable() returned into an Artifact
        that measure() and export() accept (e.g. load the library). Default: as it is."""
        return artifact

    def measure(self, artifact: Artifact, inputs: Mapping[str, "np.ndarray"]) -> Measurement:
        raise NotImplementedError

    def export(self, artifact: Artifact, out_dir: Path) -> list[Path]:
        return []

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def close(self) -> None:
        """Release devices, sessions, worker processes."""


# ----------------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Result:
    """What the driver tells a strategy about one candidate (Strategy.tell_results): its score,
    and the latency and fidelity behind it, so a strategy can weigh speed against quality.
    Still no graphs and no devices: numbers only.

    `status`: "ok" (measured), "infeasible" (failed a constraint; a candidate below
    --min-fidelity is never compiled, so its latency is None) or "failed" (an error).
    `fidelity`: the quality the constraint judges (the run's metric vs the original on the
    selection data; 1.0 = identical outputs), None when the candidate failed before it.
    `baseline_ms`: the original's latency on the target in this run (None until measured).
    `baseline_fidelity`: the original's own score on the same metric (1.0 for output similarity;
    its task score for a task metric), so quality lost = baseline_fidelity - fidelity.
    """

    genotype: Genotype
    score: float
    status: str = "ok"
    latency_ms: float | None = None
    fidelity: float | None = None
    baseline_ms: float | None = None
    min_fidelity: float | None = None
    baseline_fidelity: float | None = None


class Strategy:
    """Ask/tell search over genotypes. Lower score is better (latency in ms; inf = infeasible).

    ask(n) returns up to n genotypes never asked before (an empty list means the strategy is
    done); tell(scored) reports results, possibly for genotypes asked in an earlier process
    (a resumed run replays the store through tell before asking).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # its --strategy-opt options (constructor keywords); None: not declared (the constructor checks)
    OPTIONS: ClassVar[tuple[Option, ...] | None] = None

    def __init__(self, space: SearchSpace, seed: int = 0, **options: Any) -> None:
        self.space = space
        self.seed = seed
        self.options = options

    def ask(self, n: int = 1) -> list[Genotype]:
        """Default: up to n proposals from `_next()` (None = exhausted), never one in `seen`."""
        seen = self.__dict__.setdefault("seen", {Genotype()})
        out: list[Genotype] = []
        while len(out) < n:
            g = self._next()
            if g is None:
                break
            seen.add(g)
            out.append(g)
        return out

    def _next(self) -> Genotype | None:
        raise NotImplementedError

    def tell(self, scored: Sequence[tuple[Genotype, float]]) -> None:
        pass

    def tell_results(self, results: Sequence[Result]) -> None:
        """The driver's entry point: results with latency and fidelity apart. Default: tell() the
        (genotype, score) pairs, so a strategy that only wants scores overrides tell() alone."""
        self.tell([(r.genotype, r.score) for r in results])


def tell_strategy(strategy: Any, results: Sequence[Result]) -> None:
    """Tell a strategy its results: tell_results() where it has one, else tell() (a strategy that
    does not derive from Strategy)."""
    if hasattr(strategy, "tell_results"):
        strategy.tell_results(results)
    else:
        strategy.tell([(r.genotype, r.score) for r in results])
