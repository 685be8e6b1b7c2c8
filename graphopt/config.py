"""What a run is asked to do: its budget (Budget) and its configuration (RunConfig, validated
before anything runs). graphopt.api and the CLI build a RunConfig; graphopt.driver runs it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError
from .registry import PASSES, STRATEGIES, TARGETS, parse_names


# ------------------------------------------------------------------------------------ budget
@dataclass(frozen=True)
class Budget:
    """A number of candidates (besides the original) and/or a wall-clock limit in seconds."""

    trials: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str | int | float | None) -> "Budget":
        if text is None:
            return cls(trials=20)
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*", str(text))
        if not m:
            raise UsageError(f"--budget {text!r}: expected a number of candidates (20) or a time (90s, 5m, 1h)")
        value, unit = float(m.group(1)), m.group(2)
        if value <= 0:
            raise UsageError(f"--budget {text!r}: must be positive (e.g. --budget 20 or --budget 5m)")
        if unit is None:
            if value != int(value):
                raise UsageError(f"--budget {text!r}: a number of candidates must be a whole number")
            return cls(trials=int(value))
        scale = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]
        return cls(seconds=value * scale)

    def describe(self) -> str:
        parts = []
        if self.trials is not None:
            parts.append(f"{self.trials} candidates")
        if self.seconds is not None:
            parts.append(f"{self.seconds:g} s")
        return " or ".join(parts) or "unbounded"


# ------------------------------------------------------------------------------------ config
@dataclass
class RunConfig:
    model: str | Path
    target: str = "ort"
    passes: list[str] = field(default_factory=lambda: ["conv_bn"])
    strategy: str = "random"
    budget: Budget = field(default_factory=Budget)
    data: str | Path | None = None
    metric: str = "channel"  # the gate's metric (graphopt.evaluation.metrics): a name, module:function, or a Metric
    min_fidelity: float | None = None  # absolute floor (None and no max_drop: 0.99 for a similarity metric)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    out: str | Path = "graphopt-out"
    target_options: dict[str, Any] = field(default_factory=dict)
    pass_options: dict[str, Any] = field(default_factory=dict)
    synthetic_samples: int = 8
    confirm_rounds: int = 3
    paired_timing: bool = True  # time the original again right after each candidate (graphopt.timing)
    ort_reference: bool = True  # time onnxruntime next to a target that times on this CPU (graphopt.reporting.ort_reference)
    max_size_mb: float | None = None
    max_latency_ms: float | None = None
    progress: bool = True  # a progress bar on stderr when it is a terminal
    finetune_steps: int = 0  # > 0: distil each candidate toward the original (graphopt.recovery.finetune; needs torch)
    jobs: int = 1  # candidates measured at once (> 1: remote devices only; see Search._run_pipelined)
    compile_workers: int = 1  # > 1: compiles in that many worker processes (graphopt.parallel.compile_pool)
    search_exact: bool = False  # True: one gene per exact site (conv_bn, fused attention); else one per pass
    strategy_options: dict[str, Any] = field(default_factory=dict)  # --strategy-opt: the strategy's keyword options
    recover_top: int = 0  # > 0: distil the K most promising candidates after the search (graphopt.recovery.recover)
    recover_seconds: float | None = None  # time for that phase (None: a share of a time budget)
    recover_train: str = "changed"  # what recovery trains: changed | all
    cluster: str | None = None  # Ray address: compiles as Ray tasks on its workers (graphopt.parallel.cluster_pool)
    # data and quality (graphopt.evaluation.data, graphopt.evaluation.metrics, graphopt.evaluation.quality)
    eval_data: str | Path | None = None  # held-out source; default: a split of `data`
    allow_synthetic: bool = False  # let data-dependent moves fit to synthetic inputs (report: not trusted)
    max_drop: float | None = None  # gate: metric >= original's - max_drop (points of a task metric)
    task_metric: str | None = None  # the held-out number reported (default: the gate's metric)
    select_samples: int | None = None  # caps (graphopt.evaluation.data defaults: 256 select, 5000 held-out, 64 calib)
    eval_samples: int | None = None
    calib_samples: int | None = None

    def validate(self) -> None:
        for flag, v in (("the model path", self.model), ("--out", self.out), ("--data", self.data),
                        ("--eval-data", self.eval_data)):
            if isinstance(v, str) and not v.strip():  # `--out "$OUT"` with OUT unset: not the current folder
                raise UsageError(f"{flag}: an empty path (an unset shell variable?); give a path"
                                 + ("" if flag == "the model path" else " or leave the flag out"))
        _check_held_out_apart(self.data, self.eval_data)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"--seed {self.seed}: must be a whole number >= 0")
        from .evaluation.metrics import resolve_metric

        gate = resolve_metric(self.metric)
        if self.task_metric is not None:
            resolve_metric(self.task_metric)
        if self.min_fidelity is not None and (not math.isfinite(self.min_fidelity) or (
                gate.similarity and not 0.0 <= self.min_fidelity <= 1.0)):
            raise UsageError(f"--min-fidelity {self.min_fidelity}: must be between 0 and 1"
                             + ("" if gate.similarity else " (or a finite value of the metric)"))
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise UsageError(f"--max-drop {self.max_drop}: must be a number >= 0 (points of the metric)")
        if self.max_drop is not None and (gate.similarity or not gate.units) and self.max_drop >= 1.0:
            raise UsageError(f"--max-drop {self.max_drop}: the gate's metric {self.metric} runs from 0 to 1, so this "
                             "leaves no gate; give a drop in its units (e.g. 0.01), or a task metric in points "
                             "(--metric imagenet_top1 --max-drop 1.0)")
        for flag, v in (("--select-samples", self.select_samples), ("--eval-samples", self.eval_samples),
                        ("--calib-samples", self.calib_samples)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UsageError(f"{flag} {v}: must be a positive number of samples")
        for flag, v in (("--max-size-mb", self.max_size_mb), ("--max-latency-ms", self.max_latency_ms)):
            if v is not None and not v > 0:
                raise UsageError(f"{flag} {v}: must be a positive number")
        parse_names(PASSES, self.passes)
        parse_names(TARGETS, [self.target])
        parse_names(STRATEGIES, [self.strategy])
        from .registry import check_options, run_pass_options  # each plugin's declared OPTIONS table

        check_options(TARGETS, [self.target], self.target_options, "--target-opt")
        check_options(STRATEGIES, [self.strategy], self.strategy_options, "--strategy-opt")
        check_options(PASSES, list(self.passes), self.pass_options, "--pass-opt", common=run_pass_options())
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise UsageError(f"--jobs {self.jobs}: must be a positive number of candidates measured at once")
        if isinstance(self.compile_workers, bool) or not isinstance(self.compile_workers, int) \
                or self.compile_workers < 1:
            raise UsageError(f"--compile-workers {self.compile_workers}: must be a positive number of worker "
                             "processes (1 = compile in the search's own process)")
        if isinstance(self.confirm_rounds, bool) or not isinstance(self.confirm_rounds, int) or self.confirm_rounds < 0:
            raise UsageError(f"--confirm-rounds {self.confirm_rounds}: must be a whole number >= 0 (0: no "
                             "confirmation; the report's speedup is then the search's)")
        if self.finetune_steps < 0:
            raise UsageError(f"--finetune {self.finetune_steps}: must be 0 or a positive number of steps")
        if self.finetune_steps > 0:
            from .recovery.finetune import check_available

            check_available()
        if self.recover_top:
            from .recovery.recover import check_config

            check_config(self)


def _check_held_out_apart(data: Any, eval_data: Any) -> None:
    """--eval-data must not be --data itself (the same path, link, copy or loader): the held-out split
    would then be data that fed the choices, while the report calls it held out."""
    if data is None or eval_data is None or not all(isinstance(v, (str, Path)) for v in (data, eval_data)):
        return
    a, b = Path(data), Path(eval_data)
    same = str(data) == str(eval_data)
    if not same and a.is_file() and b.is_file():
        same = a.samefile(b) or (a.stat().st_size == b.stat().st_size and _digest(a) == _digest(b))
    elif not same and a.is_dir() and b.is_dir():
        same = a.samefile(b)
    if same:
        raise UsageError(f"--eval-data {eval_data} is the same data as --data {data}: held-out data must feed no "
                         "choice; give a separate held-out set, or leave --eval-data out (--data is then split "
                         "into fit, select and held-out)")


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["Budget", "RunConfig"]
