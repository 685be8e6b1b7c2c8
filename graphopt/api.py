"""`optimize()`: the Python form of `graphopt run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .driver import Budget, RunConfig, SearchResult, run_search


def optimize(model: str | Path, target: str = "ort", *, passes: Sequence[str] | str = ("conv_bn",),
             strategy: str = "random", budget: int | str | Budget | None = 20, data: str | Path | None = None,
             metric: Any = "channel", min_fidelity: float | None = None,
             shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0, out: str | Path = "graphopt-out",
             target_options: Mapping[str, Any] | None = None,
             pass_options: Mapping[str, Any] | None = None, max_size_mb: float | None = None,
             max_latency_ms: float | None = None, progress: bool = False, finetune_steps: int = 0,
             jobs: int = 1, compile_workers: int = 1, search_exact: bool = False,
             strategy_options: Mapping[str, Any] | None = None, recover_top: int = 0,
             recover_time: str | float | None = None, recover_train: str = "changed",
             cluster: str | None = None,
             eval_data: Any = None, allow_synthetic: bool = False,
             max_drop: float | None = None, task_metric: Any = None, select_samples: int | None = None,
             eval_samples: int | None = None, calib_samples: int | None = None,
             ort_reference: bool = True, confirm_rounds: int = 3, paired_timing: bool = True) -> SearchResult:
    """Search for the fastest graph that stays within `min_fidelity` of `model` on `target`.

    Writes best.onnx, report.json and runs.sqlite to `out` and returns a SearchResult whose
    `.report` is the report dict and `.exit_code` the code `graphopt run` would exit with.
    Raises graphopt.errors.GraphoptError subclasses for bad input (each has `.exit_code`).
    `finetune_steps` > 0 distils each candidate toward the original (`--finetune`; needs torch).
    `jobs` > 1 measures that many candidates at once (`--jobs`; targets with concurrent_measure).
    `compile_workers` > 1 compiles that many candidates at once in worker processes
    (`--compile-workers`; targets with concurrent_measure and portable_artifacts).
    `cluster` (a Ray address: auto, HOST:PORT, ray://HOST:PORT) compiles and tunes candidates as Ray
    tasks on that cluster's workers (`--cluster`, graphopt.parallel.cluster_pool; needs graphopt[cluster]).
    `search_exact` searches each exact move per site (`--search-exact`); default one gene per pass.
    `strategy_options` are keyword options of the strategy's constructor (`--strategy-opt K=V`).
    `recover_top` > 0 distils that many promising candidates after the search (`--recover-top`,
    graphopt.recovery.recover), for `recover_time` (90, "90s", "5m"; default: half a time budget).
    Data and quality (graphopt.evaluation.data, graphopt.evaluation.metrics): `data` / `eval_data`
    take what --data takes (or a graphopt.evaluation.data.Dataset); `metric` / `task_metric` a name,
    module:function or a function;
    `ort_reference` (a target timed on this CPU, x86: onnxruntime timed next to the kept graph at the
    end, report["ort_reference"], graphopt.reporting.ort_reference; `--no-ort-reference` turns it off).
    `paired_timing` (`--no-paired-timing`: off): each candidate is ranked by its ratio to the original
    timed again right after it (graphopt.timing).
    `confirm_rounds` (`--confirm-rounds`, 3; 0: off): the end of the run re-measures the best graphs
    alternately with the original; the report's speedup is the confirmed one.
    `min_fidelity` (absolute; default 0.99 for a similarity metric) and/or `max_drop` (relative to
    the original's score); `allow_synthetic` lets data-dependent moves fit to random inputs.
    """
    from .recovery.recover import parse_seconds

    if isinstance(passes, str):
        passes = [p for p in passes.split(",") if p]
    cfg = RunConfig(
        model=model, target=target, passes=list(passes), strategy=strategy,
        budget=budget if isinstance(budget, Budget) else Budget.parse(budget),
        data=data, metric=metric, min_fidelity=None if min_fidelity is None else float(min_fidelity),
        shapes={k: tuple(int(d) for d in v) for k, v in (shapes or {}).items()}, seed=int(seed), out=out,
        target_options=dict(target_options or {}), pass_options=dict(pass_options or {}),
        max_size_mb=max_size_mb, max_latency_ms=max_latency_ms, progress=progress,
        finetune_steps=int(finetune_steps), jobs=jobs,
        compile_workers=compile_workers, search_exact=bool(search_exact),
        strategy_options=dict(strategy_options or {}), recover_top=int(recover_top),
        recover_seconds=parse_seconds(recover_time), recover_train=recover_train,
        cluster=cluster,
        eval_data=eval_data, allow_synthetic=allow_synthetic, max_drop=max_drop,
        task_metric=task_metric, select_samples=select_samples, eval_samples=eval_samples,
        calib_samples=calib_samples, ort_reference=bool(ort_reference),
        confirm_rounds=confirm_rounds, paired_timing=bool(paired_timing))
    return run_search(cfg)
