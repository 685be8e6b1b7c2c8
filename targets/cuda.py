"""cuda: an NVIDIA GPU through Apache TVM Relax: dlight default schedules, MetaSchedule when asked.

Compile flow (works on a CPU-only build host: nothing here needs a GPU until measure()):
    fold_constants -> import_onnx
    -> untuned: relax "zero" pipeline, then dlight ApplyDefaultSchedule(gpu.Matmul, gpu.GEMV,
       gpu.Reduction, gpu.GeneralReduction, gpu.Fallback), then the CUDA lowering passes
    -> tuned (--target-opt trials=N > 0 and a GPU reachable, locally or through an RPC tracker):
       targets.tuning.tune_and_build (MetaSchedule; dlight schedules what it did not tune)
    -> Artifact(handle=Executable); export() writes model.so.

TVM 0.27 embeds the kernels as CUDA *source* in the library (module format "cuda") and compiles
them when the library is loaded on the GPU host (CUDAModuleNode::JitCompileFromSource, through
tvm.support.nvcc's tvm_callback_cuda_compile): the machine that *measures* needs NVRTC
(pip install cuda-bindings) or nvcc (then TVM_CUDA_COMPILE_MODE=nvcc, which this target sets
for its own process); the build host needs neither. The same holds for an RPC server's host.

The GPU architecture comes from `--target-opt arch=sm_90`, else from the local GPU, else from
the RPC device. Measuring: on the local GPU (method "measured"), else on the RPC device
(method "rpc", see targets/rpc.py), else TargetUnreachable. Importing this module does not
import tvm.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphopt.errors import CompileError, TargetUnreachable, UsageError
from graphopt.plugin import Artifact, LatencyStats, Measurement, Option, Target

from . import rpc as rpc_mod
from . import tvm_common as tc
from .cuda_lower import _guarded, bn_to_affine, default_pipeline  # noqa: F401 - split for size; re-exported
from .tune_budget import DEFAULT_WARM, budget_plan

NO_DEVICE = (
    "no CUDA device here: run on a machine with an NVIDIA GPU or give "
    "--target-opt tracker=HOST:PORT --target-opt key=NAME"
)
ARCH_HELP = ("e.g. --target-opt arch=sm_90 (H100), sm_80 (A100), sm_86 (RTX 30xx), sm_89 (RTX 40xx, L4), "
             "sm_87 (Jetson Orin)")
OWN_OPTIONS = ("arch", "number", "repeat", "warmup", "trials", "max_new_tasks", "tuning_db", "compiler",
               "tune_trials", "tune_time")
_ARCH_RE = re.compile(r"^(?:sm_?)?(\d{2,3})([a-z]?)$")
# Per-block limits every NVIDIA GPU since Maxwell shares (TVM's own nvidia/* tags carry the same
# values). A target built from {"kind": "cuda", "arch": ...} lacks them, and MetaSchedule's CUDA
# schedule rules then fail with "missing attribute `max_threads_per_block` in the target" (seen on
# an H200, 2026-11-26). Added to the TVM target only: target_json() stays the user-facing identity.
CUDA_BLOCK_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
                     "registers_per_block": 65536}


def _budget_text(b) -> str:
    parts = ([f"{b.budget_trials} trials"] if b.budget_trials is not None else []) + (
        [f"{b.budget_s:g} s"] if b.budget_s is not None else [])
    return " and ".join(parts)


def parse_arch(value: Any) -> str:
    """'sm_90', 'sm90', '90', 90, 'sm_90a' -> 'sm_90' / 'sm_90a'; UsageError otherwise."""
    m = _ARCH_RE.match(str(value).strip().lower())
    if not m or int(m.group(1)) < 30:
        raise UsageError(f"cuda target: arch={value!r} is not an NVIDIA GPU architecture; {ARCH_HELP}")
    return f"sm_{m.group(1)}{m.group(2)}"


@functools.lru_cache(maxsize=1)
def local_gpu() -> dict[str, Any] | None:
    """{"arch": "sm_90", "name": ..., "compute_version": "9.0"} for CUDA device 0, or None.

    None when this TVM has no CUDA device API enabled or no device is present (never raises).
    """
    try:
        tvm = tc.load_tvm()
        dev = tvm.cuda(0)
        if not dev.exist:
            return None
        cv = str(dev.compute_version)
        name = str(dev.device_name)
    except Exception:  # noqa: BLE001 - "Device API cuda is not enabled" on a host without CUDA
        return None
    major, _, minor = cv.partition(".")
    return {"arch": f"sm_{int(major)}{int(minor or 0)}", "name": name, "compute_version": cv}


def has_nvrtc() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("cuda.bindings") is not None
    except (ImportError, ValueError):
        return False


def has_nvcc() -> bool:
    homes = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")
    return bool(shutil.which("nvcc")) or any((Path(h) / "bin" / "nvcc").exists() for h in homes if h)


def cuda_compiler() -> str | None:
    """How TVM can compile kernels here: "nvrtc" (cuda-bindings installed), "nvcc", or None."""
    return "nvrtc" if has_nvrtc() else ("nvcc" if has_nvcc() else None)


def _remote_gpu(cfg) -> dict[str, Any]:
    """What the RPC device's CUDA device 0 says about itself."""

    def work(sess):
        dev = sess.device("cuda", 0)
        if not dev.exist:
            raise TargetUnreachable(f"the RPC device at {cfg.where()} has no CUDA GPU (its TVM runtime sees none)")
        cv = str(dev.compute_version)
        major, _, minor = cv.partition(".")
        return {"arch": f"sm_{int(major)}{int(minor or 0)}", "name": str(dev.device_name), "compute_version": cv}

    return rpc_mod.with_session(cfg, work, "GPU query")


class CudaTarget(Target):
    name = "cuda"
    tunable = True
    static_shapes = True  # graphopt.timing: TVM compiles static shapes; value-dependent shapes are not applicable
    description = ("An NVIDIA GPU via Apache TVM Relax + CUDA (dlight default schedules; MetaSchedule with "
                   "trials=N), timed locally or over RPC.")
    OPTIONS = (
        Option("arch", str, None, "CUDA arch, e.g. sm_90 or 90 (default: the GPU's)"),
        Option("number", int, None, "runs per timed repeat", minimum=1),
        Option("repeat", int, 5, "timed repeats (median reported)", minimum=1),
        Option("warmup", int, 3, "untimed runs first", minimum=0),
        Option("trials", int, 0, "MetaSchedule trials (0: dlight default schedules)", minimum=0),
        Option("max_new_tasks", int, None, "tune at most this many new tasks per candidate", minimum=1),
        Option("tuning_db", str, None, "tuning database directory"),
        Option("compiler", str, None, "CUDA compiler", choices=("nvrtc", "nvcc")),
        Option("tune_trials", int, None, "per-model tuning budget in trials, spent where the latency is "
               "(trials is then each new workload's warm-up, default 8)", minimum=0),
        Option("tune_time", str, None, "per-model tuning budget in time (seconds, or 90s / 20m / 1h)"),
    ) + rpc_mod.rpc_options()

    def __init__(
        self,
        arch: str | int | None = None,
        number: int | None = None,
        repeat: int = 5,
        warmup: int = 3,
        trials: int = 0,
        max_new_tasks: int | None = None,
        tuning_db: str | None = None,
        compiler: str | None = None,
        tune_trials: int | None = None,
        tune_time: Any = None,
        **options: Any,
    ) -> None:
        unknown = sorted(k for k in options if k not in rpc_mod.OPTION_NAMES)
        if unknown:
            raise UsageError(f"unknown cuda target option(s) {unknown}; valid: "
                             f"{', '.join(OWN_OPTIONS + rpc_mod.OPTION_NAMES)}")
        super().__init__(arch=arch, number=number, repeat=repeat, warmup=warmup, trials=trials,
                         max_new_tasks=max_new_tasks, tuning_db=tuning_db, compiler=compiler,
                         tune_trials=tune_trials, tune_time=tune_time, **options)
        self._arch = parse_arch(arch) if arch is not None else None
        for key, v, lo in (("number", number, 1), ("repeat", repeat, 1), ("warmup", warmup, 0),
                           ("trials", trials, 0), ("max_new_tasks", max_new_tasks, 1)):
            if v is None:
                continue
            try:
                ok = int(v) == float(v) and int(v) >= lo
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UsageError(f"cuda target: {key}={v!r} must be an integer >= {lo}")
        self.number = None if number is None else int(number)
        self.repeat, self.warmup, self.trials = int(repeat), int(warmup), int(trials)
        self.max_new_tasks = None if max_new_tasks is None else int(max_new_tasks)
        self.tuning_db = tuning_db
        # tune_trials / tune_time: a per-model MetaSchedule budget spent where the latency is
        # (tune_budget.py, as x86); `trials` is then each new workload's warm-up (DEFAULT_WARM when 0)
        if (tune_trials is not None or tune_time is not None) and self.trials == 0:
            self.trials = DEFAULT_WARM
        self.budget = budget_plan(self.name, tune_trials, tune_time, self.trials)
        if compiler is not None and str(compiler) not in ("nvrtc", "nvcc"):
            raise UsageError(f"cuda target: compiler={compiler!r}: expected nvrtc or nvcc")
        self.compiler = None if compiler is None else str(compiler)
        self.rpc = rpc_mod.RpcConfig.from_options(options)
        self._gpu: dict[str, Any] | None = None  # the measuring device's facts, once known
        self._target = None

    # ----------------------------------------------------------------------- target facts
    def gpu(self) -> dict[str, Any] | None:
        """The GPU measurements run on (local first, else the RPC device), or None."""
        if self._gpu is None:
            g, where = local_gpu(), "local"
            if g is None and self.rpc is not None:
                g, where = _remote_gpu(self.rpc), "rpc"
            if g is not None:
                self._gpu = dict(g, where=where)
        return self._gpu

    @property
    def arch(self) -> str:
        if self._arch is None:
            g = local_gpu()
            if g is None and self.rpc is not None:
                g = self.gpu()
            if g is None:
                raise UsageError(f"cuda target: no GPU architecture given and no local NVIDIA GPU to detect it from: "
                                 f"add --target-opt arch=sm_XX, {ARCH_HELP}")
            self._arch = g["arch"]
        return self._arch

    def target_json(self) -> dict[str, Any]:
        return {"kind": "cuda", "arch": self.arch}

    @property
    def target(self):
        if self._target is None:
            tvm = tc.load_tvm()
            try:
                self._target = tvm.target.Target({**self.target_json(), **CUDA_BLOCK_LIMITS})
            except Exception as e:  # noqa: BLE001
                raise UsageError(f"invalid TVM cuda target {self.target_json()}: {tc._first_line(e)}") from None
        return self._target

    def _where(self) -> str:
        """'local', 'rpc', or '' (no device to measure on)."""
        if local_gpu() is not None:
            return "local"
        return "rpc" if self.rpc is not None else ""

    def _setup_compiler(self) -> str:
        comp = (self.compiler or os.environ.get("TVM_CUDA_COMPILE_MODE") or cuda_compiler() or "").lower()
        if not comp:
            raise UsageError("cuda target: no CUDA kernel compiler here: pip install cuda-bindings (NVRTC) or "
                             "install the CUDA toolkit so that nvcc is on PATH (or set CUDA_HOME)")
        if comp == "nvrtc" and not has_nvrtc():
            raise UsageError("cuda target: compiler=nvrtc needs cuda-bindings: pip install cuda-bindings, "
                             "or use --target-opt compiler=nvcc with the CUDA toolkit installed")
        if comp == "nvcc" and not has_nvcc():
            raise UsageError("cuda target: compiler=nvcc but nvcc is not on PATH: install the CUDA toolkit "
                             "(or set CUDA_HOME), or pip install cuda-bindings and use compiler=nvrtc")
        # read by tvm.support.nvcc's tvm_callback_cuda_compile (registered by `import tvm`) each time a library
        # is loaded; inherited by MetaSchedule's runner workers. Its default, nvrtc, fails without cuda-bindings.
        os.environ["TVM_CUDA_COMPILE_MODE"] = comp
        return comp

    def check(self) -> None:
        tc.require_tvm(self.name)
        if local_gpu() is not None:
            self._setup_compiler()
        elif self.rpc is not None:
            rpc_mod.check_reachable(self.rpc)
        else:
            raise TargetUnreachable(NO_DEVICE)
        _ = self.arch  # UsageError now, not after the first candidate

    def describe(self) -> dict[str, Any]:
        where = self._where()
        if where == "local":
            device = local_gpu()["name"]
        elif where == "rpc":  # named by key, not the tracker's address: a resumed run may reach it elsewhere
            c = self.rpc
            device = f"TVM RPC device {c.key!r} (cuda)" if c.tracker else f"TVM RPC {c.where()} (cuda)"
        else:
            device = "no GPU here"
        d: dict[str, Any] = {
            "name": self.name,
            "compiler": f"tvm relax {tc.tvm_version()} (cuda)",
            "target": self.target_json(),
            "device": device,
            "threads": None,
            "tuned": self.trials > 0,
            "schedules": ("dlight default GPU schedules (untuned)" if self.trials <= 0 else
                          f"MetaSchedule, {self.trials} trials per task, dlight for the rest" if self.budget is None else
                          f"MetaSchedule, a per-model budget ({_budget_text(self.budget)}; {self.trials} warm-up "
                          "trials per new workload), dlight for the rest"),
            "measured": {"local": "on the local GPU", "rpc": "over RPC", "": "nowhere (no GPU)"}[where],
        }
        if self.rpc is not None:
            d["rpc"] = self.rpc.to_dict()
        return d

    # ---------------------------------------------------------------------------- compile
    def compile(self, model, workdir: Path) -> Artifact:
        tc.load_tvm()
        workdir = Path(workdir)
        specs = tc.input_specs(model)
        t0 = time.perf_counter()
        folded = bn_to_affine(tc.fold_constants(model))
        mod = tc.import_onnx(folded, fold=False)
        t1 = time.perf_counter()
        ex, lower_info = self._lower(mod, workdir)
        t2 = time.perf_counter()
        info: dict[str, Any] = {"import_s": t1 - t0, "build_s": t2 - t1,
                                "inputs": [(n, list(s), d) for n, s, d in specs],
                                "target": self.target_json(), "tuned": False}
        info.update(lower_info)
        files: list[Path] = []
        if self.rpc is not None and local_gpu() is None:  # the device needs the library file
            t3 = time.perf_counter()
            lib = tc.export_library(ex, workdir / "model.so")
            files.append(lib)
            info["lib"] = str(lib)
            info["export_s"] = time.perf_counter() - t3
        return Artifact(target=self.name, files=files, handle=ex, info=info)

    def _lower(self, mod, workdir: Path) -> tuple[Any, dict[str, Any]]:
        if self.trials > 0:
            return self._tuned(mod, workdir)
        return self._build(mod)

    def _build(self, mod, db=None) -> tuple[Any, dict[str, Any]]:
        """Build with default_pipeline; with `db` (a MetaSchedule database) its records are applied first."""
        import contextlib

        tvm = tc.load_tvm()
        target = self.target
        skipped: list[str] = []
        try:
            with target, (db if db is not None else contextlib.nullcontext()), tvm.transform.PassContext(opt_level=3):
                ex = tvm.compile(mod, target=target,
                                 relax_pipeline=default_pipeline(target, skipped, decompose=db is not None))
        except Exception as e:
            raise CompileError(f"TVM {tc.tvm_version()} cuda build ({self.arch}) failed: "
                               f"{type(e).__name__}: {tc._first_line(e)}") from e
        info: dict[str, Any] = {"tuned": False}
        if skipped:
            info["dlight_rule_failures"] = skipped[:20]
        return ex, info

    def _tuned(self, mod, workdir: Path) -> tuple[Any, dict[str, Any]]:
        """MetaSchedule through targets.tuning; with no GPU reachable, only the records the
        database already has are applied (no new trials) and dlight schedules the rest."""
        from . import tuning

        where = self._where()
        if where == "local":
            self._setup_compiler()
        runner = rpc_mod.ms_runner(self.rpc) if where == "rpc" else None
        trials = self.trials if where else 0
        db_dir = tuning.db_dir_for(self.target_json(), self.tuning_db)
        with self.target:
            try:
                ex, stats = tuning.tune_and_build(mod, self.target, db_dir=db_dir, trials_per_task=trials,
                                                  work_dir=workdir, max_new_tasks=self.max_new_tasks, runner=runner,
                                                  budget=self.budget if trials else None)
                info: dict[str, Any] = {}
            except CompileError as e:
                # compile_relax's dlight step has no guard: a rule that raises (gpu.Matmul on a conv fused with
                # the next layer's pad: "cache-write stage ... not properly inlined") fails the whole build.
                # The tasks are tuned and in the database by now: build again with the guarded pipeline.
                if "tuning failed" in str(e) or "extraction failed" in str(e):
                    raise
                ex, info = self._build(mod, db=tuning.open_db(db_dir))
                info["tuned_build_fallback"] = f"compile_relax failed ({e}); rebuilt with the guarded dlight pipeline"
                return ex, dict(info, tuned=trials > 0, tuning={"db": str(db_dir), "trials_per_task": trials})
        info.update({"tuned": stats.workloads_seen > 0 and not stats.partly_untuned, "tuning": stats.to_dict()})
        if not where:
            info["tuning_note"] = "no GPU reachable at compile time: applied the tuning database only, no new trials"
        return ex, info

    # ---------------------------------------------------------------------------- running
    def _ordered_inputs(self, artifact: Artifact, inputs: Mapping[str, Any]) -> list:
        return tc.ordered_inputs(artifact.info["inputs"], inputs, "cuda")

    def _lib(self, artifact: Artifact) -> Path:
        lib = artifact.info.get("lib")
        if lib and Path(lib).exists():
            return Path(lib)
        import tempfile

        path = tc.export_library(artifact.handle, Path(tempfile.mkdtemp(prefix="graphopt-cuda-")) / "model.so")
        artifact.info["lib"] = str(path)
        artifact.files.append(path)
        return path

    def run_once(self, artifact: Artifact, inputs: Mapping[str, Any]) -> list:
        """Run the compiled module once on the GPU; outputs as numpy arrays in graph output order."""
        args = self._ordered_inputs(artifact, inputs)
        where = self._where()
        if where == "local":
            tvm = tc.load_tvm()
            self._setup_compiler()
            return tc.run_vm(artifact.handle, tvm.cuda(0), args)
        if where == "rpc":
            return rpc_mod.run_remote(self.rpc, self._lib(artifact), args, device="cuda")
        raise TargetUnreachable(NO_DEVICE)

    def measure(self, artifact: Artifact, inputs: Mapping[str, Any]) -> Measurement:
        args = self._ordered_inputs(artifact, inputs)
        where = self._where()
        if where == "local":
            tvm = tc.load_tvm()
            self._setup_compiler()  # the kernels are compiled when the module is first loaded
            samples, number = tc.time_vm(artifact.handle, tvm.cuda(0), args, number=self.number,
                                         repeat=self.repeat, warmup=self.warmup)
            method = "measured"
        elif where == "rpc":
            samples, number = rpc_mod.measure_remote(self.rpc, self._lib(artifact), args, number=self.number,
                                                     repeat=self.repeat, warmup=self.warmup, device="cuda")
            method = "rpc"
        else:
            raise TargetUnreachable(NO_DEVICE)
        tuned = bool(artifact.info.get("tuned", False))
        g = self.gpu() or {}
        extra: dict[str, Any] = {"arch": self.arch, "compiler": f"tvm relax {tc.tvm_version()} (cuda)",
                                 "schedules": "MetaSchedule + dlight" if tuned else "dlight default schedules"}
        if "tuning" in artifact.info:
            extra["tuning"] = artifact.info["tuning"]
        if self.rpc is not None and method == "rpc":
            extra["rpc"] = self.rpc.where()
        return Measurement(latency=LatencyStats.from_samples(samples, runs_per_repeat=number), method=method,
                           tuned=tuned, threads=None, device=f"{g.get('name', 'NVIDIA GPU')} ({self.arch})",
                           extra=extra)

    def export(self, artifact: Artifact, out_dir: Path) -> list[Path]:
        return [tc.export_library(artifact.handle, Path(out_dir) / "model.so")]

    def close(self) -> None:
        self._target = None
