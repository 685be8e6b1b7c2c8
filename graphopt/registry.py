"""One small registry per plugin kind. Built-ins by import path; third parties by entry point.

The registered name is the module name and the CLI spelling. Nothing is imported until a
name is looked up, so `graphopt --help` stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from .errors import UsageError


class Registry:
    def __init__(self, kind: str, group: str, builtins: dict[str, str], discover: str | None = None,
                 base: str | None = None):
        self.kind = kind  # "pass", "target", "strategy"
        self.group = group  # entry-point group
        self._base = base  # "module:Class" an entry point's class must derive from (None: any object)
        self._builtins = dict(builtins)
        self._extra: dict[str, Any] = {}
        self._discover = discover  # a package whose modules register themselves (see _discovered)
        self._found: dict[str, str] | None = None

    def _discovered(self) -> dict[str, str]:
        """A module `<package>/<name>.py` whose source sets `name = "<name>"` on a class registers
        that class by its file alone (read as text: nothing is imported until the name is used)."""
        if self._found is None:
            self._found = {}
            if self._discover:
                import importlib.util
                import re
                from pathlib import Path

                spec = importlib.util.find_spec(self._discover)
                for d in (spec.submodule_search_locations or []) if spec else []:
                    for f in sorted(Path(d).glob("[!_]*.py")):
                        if re.search(rf'^\s+name\s*(?::[^=]+)?=\s*["\']{re.escape(f.stem)}["\']',
                                     f.read_text(errors="replace"), re.M):
                            self._found[f.stem] = f"{self._discover}.{f.stem}"
        return {k: v for k, v in self._found.items() if k not in self._builtins}

    def _entry_points(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def register(self, name: str, obj: Any) -> None:
        """Register a class at run time (tests, notebooks)."""
        self._extra[name] = obj

    def unregister(self, name: str) -> None:
        self._extra.pop(name, None)

    def names(self) -> list[str]:
        return sorted(set(self._builtins) | set(self._discovered()) | set(self._entry_points()) | set(self._extra))

    def get(self, name: str) -> Any:
        if name in self._extra:
            return self._extra[name]
        if name in self._builtins:
            mod, _, attr = self._builtins[name].partition(":")
            return getattr(importlib.import_module(mod), attr)
        found = self._discovered()
        if name in found:
            return _class_named(importlib.import_module(found[name]), name, self.kind)
        eps = self._entry_points()
        if name in eps:
            try:
                obj = eps[name].load()
            except Exception as e:
                raise UsageError(f"{self.kind} {name!r} (entry point {eps[name].value}) failed to load: {e}") from None
            return self._checked(obj, name, f"{self.kind} {name!r} (entry point {eps[name].value})")
        raise UsageError(f"unknown {self.kind} {name!r}; valid {self.kind} names: {', '.join(self.names())}")

    def _checked(self, obj: Any, name: str, where: str) -> Any:
        """A third party's class: derived from the kind's base class, with `name` its registered name
        (the driver looks the plugin up by its class's name: a mismatch failed every candidate)."""
        if self._base is None:
            return obj
        mod, _, attr = self._base.partition(":")
        base = getattr(importlib.import_module(mod), attr)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise UsageError(f"{where} is {obj!r}, not a subclass of {mod}.{attr}: point the entry point at your "
                             f"{attr} class")
        if getattr(obj, "name", None) != name:
            raise UsageError(f"{where}: its class {obj.__name__} says name = {getattr(obj, 'name', None)!r}; the "
                             f"entry point's name and the class's `name` must be the same ({name!r})")
        return obj

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def describe_options(self, name: str) -> list[str]:
        """One line per declared option of `name` (none where it declares no OPTIONS table)."""
        try:
            return [o.describe() for o in getattr(self.get(name), "OPTIONS", None) or ()]
        except Exception:
            return []

    def describe(self) -> list[tuple[str, str]]:
        """(name, one-line description) for `graphopt list`."""
        out = []
        for name in self.names():
            try:
                obj = self.get(name)  # a plugin metric function: its docstring, as the report uses
                doc = obj.__doc__ if callable(obj) and not isinstance(obj, type) else ""
                desc = (getattr(obj, "description", "") or doc or "").strip().splitlines()[0:1]
                out.append((name, desc[0] if desc else ""))
            except Exception as e:  # a broken plugin must not hide the others
                out.append((name, f"(failed to load: {e})"))
        return out


def _class_named(module: Any, name: str, kind: str) -> Any:
    for obj in vars(module).values():
        if isinstance(obj, type) and obj.__module__ == module.__name__ and getattr(obj, "name", None) == name:
            return obj
    raise UsageError(f"{kind} module {module.__name__} defines no class with name = {name!r}")


# Passes: a file passes/<name>.py with a Pass subclass whose `name` is "<name>" is found by itself
# (e.g. passes/conv_mul.py); the table below names the older built-ins explicitly.
PASSES = Registry("pass", "graphopt.passes", {
    "attention": "graphopt.passes.attention:AttentionFusion",
    "conv_bn": "graphopt.passes.conv_bn:ConvBnFusion",
    "depth": "graphopt.passes.depth:DepthRemoval",
    "depthwise": "graphopt.passes.depthwise:DepthwiseSeparable",
    "int8": "graphopt.passes.int8:Int8Quantize",
    "kernel": "graphopt.passes.kernel:KernelResize",
    "resolution": "graphopt.passes.resolution:InputResolution",
    "trim_padding": "graphopt.passes.trim_padding:TrimPadding",
    "width": "graphopt.passes.width:WidthPrune",
}, discover="graphopt.passes", base="graphopt.plugin:Pass")
TARGETS = Registry("target", "graphopt.targets", {
    "cuda": "graphopt.targets.cuda:CudaTarget",
    "ort": "graphopt.targets.ort:OrtTarget",
    "rpi4": "graphopt.targets.rpi4:Rpi4Target",
    "x86": "graphopt.targets.x86:X86Target",
}, base="graphopt.plugin:Target")
STRATEGIES = Registry("strategy", "graphopt.strategies", {
    "evolutionary": "graphopt.search.evolutionary:EvolutionarySearch",
    "grid": "graphopt.search.grid:GridSearch",
    "random": "graphopt.search.random:RandomSearch",
    "sensitivity": "graphopt.search.sensitivity:SensitivitySearch",
}, base="graphopt.plugin:Strategy")

METRICS = Registry("metric", "graphopt.metrics", {  # graphopt/evaluation/metrics.py: how candidates are judged
    "agreement_top1": "graphopt.evaluation.metrics:agreement_top1",
    "channel": "graphopt.evaluation.metrics:CHANNEL",
    "cosine": "graphopt.evaluation.metrics:COSINE",
    "imagenet_top1": "graphopt.evaluation.metrics:imagenet_top1",
    "rel_l2": "graphopt.evaluation.metrics:REL_L2",
    "soft_top1": "graphopt.evaluation.metrics:soft_top1",
    "sts_spearman": "graphopt.evaluation.metrics:sts_spearman",
    "top1": "graphopt.evaluation.metrics:TOP1",
})

# pass options every run has, whichever passes it uses (the CLI's --no-repair sets repair=0)
def run_pass_options() -> tuple:
    from .plugin import Option

    return (Option("repair", bool, True, "least-squares repair of new weights on calibration data"),
            # read by recovery / --finetune (graphopt.recovery: recover_phase, finetune), whatever the passes
            Option("finetune_threads", int, None, "torch threads for --finetune / --recover-top", minimum=1),
            Option("recover_train_size", int, None, "recovery trains on random crops of this side", minimum=16),
            Option("recover_loss", str, "mse", "recovery's output loss (also --recover-loss)", choices=("mse", "kl")),
            Option("recover_temperature", float, 1.0, "softmax temperature of recover_loss=kl", minimum=0.0))


def option_table(cls: Any) -> dict[str, Any] | None:
    """name -> Option for a plugin class that declares OPTIONS (plus its constructor's keyword
    parameters not in the table, as undocumented options, so a new keyword is never refused);
    None when it declares none."""
    table = getattr(cls, "OPTIONS", None)
    if table is None:
        return None
    out = {o.name: o for o in table}
    import inspect

    from .plugin import Option

    for klass in getattr(cls, "__mro__", ()):  # **options forwarded to a base constructor
        if "__init__" in vars(klass) and klass is not object:
            try:
                params = inspect.signature(vars(klass)["__init__"]).parameters.values()
            except (TypeError, ValueError):
                continue
            for p in params:
                if p.kind == p.KEYWORD_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and p.name not in ("self", "space", "seed")):
                    out.setdefault(p.name, Option(p.name, object, None if p.default is p.empty else p.default))
    return out


def check_options(registry: Registry, names: list[str], options: dict[str, Any], flag: str,
                  common: tuple = ()) -> None:
    """Check `options` against the OPTIONS tables of the plugins `names` (one target or strategy;
    the run's passes, whose options are shared) before anything runs. Unknown name or a value of
    the wrong type: UsageError, one line. Skipped where a plugin declares no table."""
    if not options:
        return
    tables = [option_table(registry.get(n)) for n in names] + [{o.name: o for o in common}]
    if any(t is None for t in tables):
        known: dict[str, Any] = {k: o for t in tables if t for k, o in t.items()}
        check_names = False
    else:
        known = {k: o for t in tables for k, o in t.items()}
        check_names = True
    owner = f"{registry.kind} {names[0]!r}" if len(names) == 1 else f"passes {', '.join(names)}"
    for key, value in options.items():
        opt = known.get(key)
        if opt is None:
            if check_names:
                raise UsageError(f"{flag} {key}={value!r}: unknown option of {owner}; valid: "
                                 f"{', '.join(sorted(known)) or '(none)'}")
            continue
        why = opt.problem(value)
        if why:
            raise UsageError(f"{flag} {key}={value!r}: {why} ({owner})")


REGISTRIES = {"passes": PASSES, "targets": TARGETS, "strategies": STRATEGIES, "metrics": METRICS}


def parse_names(registry: Registry, text: str | list[str] | None) -> list[str]:
    """'conv_bn,width' -> ['conv_bn', 'width'], each checked against the registry."""
    if text is None:
        return []
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    valid = registry.names()
    for n in names:
        if n not in valid:
            raise UsageError(f"unknown {registry.kind} {n!r}; valid {registry.kind} names: {', '.join(valid)}")
    return names
