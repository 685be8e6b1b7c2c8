"""--compile-workers M: candidates compiled in M worker processes while devices measure.

The search process keeps everything cheap and data-bound (materialize, fidelity, the run store,
the strategy); only `Target.compile` runs here, in processes started with the *spawn* method
(never fork: TVM and onnxruntime run threads, and a forked copy of a process with threads can
deadlock). Each worker builds its own Target once, in the pool's initializer, from the target's
class path ("module:Class", registered under the run's target name) and options.

A job is a path, not a graph: the search writes the candidate's ONNX file into the candidate's
folder and the worker loads it. The target's cheap-first inputs (`deadline`, `incumbent_ms`,
see Search._inform_target) travel with each job; a deadline is sent as wall-clock time and
turned back into the worker's time.monotonic(). The worker returns `Target.portable(artifact)`:
an Artifact without an in-process handle, whose files the search process loads with
`Target.load_portable`. `info["compiled_in"]` says which worker compiled it and when.

A compile that raises comes back as `WorkerCompileError` (a GraphoptError, so the driver
records "compile: <Type>: <message>" exactly as for an in-process compile), except
TargetUnreachable, which keeps its class and stops the run. Workers
ignore SIGINT: Ctrl-C reaches the search process, which ends the pool (`close(kill=True)`).
Importing this module does not import onnx or tvm.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import GraphoptError, TargetUnreachable, UsageError, first_line

log = logging.getLogger("graphopt")

_TARGET: Any = None  # the worker's own Target, built by _init


class WorkerCompileError(GraphoptError):
    """A compile that raised in a worker: one line "<Type>: <message>", plus the worker's traceback."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return type(self), (str(self), self.remote_traceback)


def class_path(cls: type) -> str:
    """'module:QualName' of a class a spawned worker can import; UsageError when it cannot
    (a class defined inside a function)."""
    qual = getattr(cls, "__qualname__", cls.__name__)
    if "<locals>" in qual:
        raise UsageError(f"--compile-workers: target class {qual} is defined inside a function, so worker processes "
                         "cannot import it; define it at module level (or use --compile-workers 1)")
    return f"{cls.__module__}:{qual}"


def _import_class(path: str) -> type:
    mod, _, qual = path.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _init(target_name: str, target_class: str, target_options: dict[str, Any], log_level: int) -> None:
    """Pool initializer: build this worker's Target once."""
    global _TARGET
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the search process's to handle
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"graphopt[compile worker {os.getpid()}]: %(message)s"))
    root = logging.getLogger("graphopt")
    root.handlers[:] = [handler]
    root.setLevel(log_level)
    root.propagate = False
    from ..registry import TARGETS

    TARGETS.register(target_name, _import_class(target_class))
    _TARGET = TARGETS.create(target_name, **target_options)


def _compile(model_path: str, workdir: str, knobs: dict[str, Any]) -> Any:
    """Worker: load the candidate, set the target's cheap-first inputs, compile, make it portable."""
    started = time.time()
    t0 = time.monotonic()
    try:
        import onnx

        model = onnx.load(model_path)
        from dataclasses import replace

        from ..plugin import TargetContext, current_context, inform_target

        knobs = dict(knobs)
        if "deadline_wall" in knobs:
            wall = knobs.pop("deadline_wall")
            knobs["deadline"] = None if wall is None else time.monotonic() + (wall - time.time())
        fields = TargetContext.__dataclass_fields__  # a knob it does not know is ignored; one not sent keeps its value
        inform_target(_TARGET, replace(current_context(_TARGET), **{k: v for k, v in knobs.items() if k in fields}))
        artifact = _TARGET.compile(model, Path(workdir))
        compile_s = time.monotonic() - t0
        portable = _TARGET.portable(artifact, Path(workdir))
    except TargetUnreachable:  # stops the run, as from an in-process compile
        raise
    except BaseException as e:  # noqa: BLE001 - every failure goes back as a picklable value
        text = first_line(e, 500)
        msg = text if isinstance(e, GraphoptError) else f"{type(e).__name__}: {text}"
        raise WorkerCompileError(msg, traceback.format_exc()) from None
    portable.info["compiled_in"] = {"pid": os.getpid(), "started": started, "ended": time.time(),
                                    "compile_s": compile_s, "total_s": time.monotonic() - t0}
    return portable


class CompilePool:
    """M spawned worker processes, each with its own instance of the run's target."""

    def __init__(self, workers: int, target_name: str, target_class: str, target_options: dict[str, Any]) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self._args = (target_name, target_class, dict(target_options), logging.getLogger("graphopt").getEffectiveLevel())
        self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init, initargs=self._args)

    def submit(self, model_path: Path, workdir: Path, knobs: dict[str, Any]):
        return self._executor.submit(_compile, str(model_path), str(workdir), dict(knobs))

    def restart(self) -> None:
        """A fresh set of workers after one died (the old executor is broken for good)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.close(kill=True)
        self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init, initargs=self._args)

    def pids(self) -> list[int]:
        return [p.pid for p in (getattr(self._executor, "_processes", None) or {}).values()]

    def close(self, kill: bool = False) -> None:
        """Shut the pool down. kill=True (Ctrl-C, an error): cancel queued jobs and end running
        compiles now (a tuning compile can take minutes) instead of waiting for them."""
        ex = self._executor
        if ex is None:
            return
        self._executor = None
        if not kill:
            ex.shutdown(wait=True)
            return
        procs = list((getattr(ex, "_processes", None) or {}).values())  # no public handle before Python 3.14
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        end = time.monotonic() + 5
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
