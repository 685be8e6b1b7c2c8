"""The shared base of the LLVM/TVM CPU targets (x86: this machine; rpi4: a cross-compiled Raspberry Pi 4).

`LlvmCpuTarget` holds what both use: the option table, the checks, the LLVM target (mcpu, mattr,
threads), compile (MetaSchedule tuning with the persistent database), in-process and RPC timing,
portable artifacts and export. A subclass names itself, describes itself and says where it
measures (`_rpc_config`); rpi4 adds cross-compilation and its own options.

Compile flow: fold_constants -> import_onnx (QDQ lowered to integer ops) -> _lower: MetaSchedule
tuning of the workloads the persistent database lacks (targets/tuning.py), then the build with
the database (tuning_ms.build_with_db; the VM's form by `vm_exec`); with trials=0, TVM's default (untuned) pipeline -> Artifact(handle=Executable).
Importing this module does not import tvm.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from graphopt.errors import CompileError, UsageError
from graphopt.plugin import Artifact, LatencyStats, Measurement, Target

from . import rpc
from . import tvm_common as tc
from .llvm_cpu_options import OPTIONS
from .tune_budget import budget_plan

TRIALS_ENV = "GRAPHOPT_TUNE_TRIALS"
DEFAULT_TRIALS = 8  # MetaSchedule trials per new workload
VM_EXEC = ("compiled", "bytecode")  # the Relax VM's forms (tuning_ms.build_with_db); x86's option vm_exec

UNTUNED_NOTE = (
    "untuned TVM CPU code (default Relax pipeline, no schedules: naive single-threaded loops) "
    "is 40-110x slower than tuned code and onnxruntime; do not read it as TVM's speed"
)


def _on(value: Any) -> bool:
    """A bool target option's value (True, 1, "1", "true", "yes", "on"; the registry has checked it)."""
    return str(value).strip().lower() in ("1", "true", "yes", "on")


class LlvmCpuTarget(Target):
    """Base of the TVM LLVM CPU targets (x86, rpi4); not registered itself."""

    tunable = True
    vm_exec = "bytecode"  # rpi4: interpreted (x86: its option vm_exec, compiled by default)
    static_shapes = True  # graphopt.timing: TVM compiles static shapes; value-dependent shapes are not applicable
    OPTIONS = OPTIONS  # targets/llvm_cpu_options.py

    def __init__(
        self,
        threads: int | None = None,
        mcpu: str | None = None,
        number: int | None = None,
        repeat: int = 5,
        warmup: int = 1,
        mattr: list[str] | None = None,
        trials: int | None = None,
        tuning_db: str | None = None,
        max_new_tasks: int | None = None,
        int8_kernels: str = "auto",
        tune_trials: int | None = None,
        tune_time: float | None = None,
        canonicalize: Any = True,
        layout: str = "auto",
        tune_cache_flush: Any = False,
        prepack: Any = False,
        fast_math: Any = True,
        wide_vector: Any = True,
        pad_channels: Any = True,
        **options: Any,
    ) -> None:
        super().__init__(threads=threads, mcpu=mcpu, number=number, repeat=repeat, warmup=warmup,
                         mattr=mattr, trials=trials, tuning_db=tuning_db, max_new_tasks=max_new_tasks,
                         int8_kernels=int8_kernels, tune_trials=tune_trials, tune_time=tune_time,
                         canonicalize=canonicalize, layout=layout,
                         tune_cache_flush=tune_cache_flush, prepack=prepack, fast_math=fast_math,
                         wide_vector=wide_vector, pad_channels=pad_channels, **options)
        rpc_options = {k: options.pop(k) for k in rpc.OPTION_NAMES if k in options}
        if options:
            raise UsageError(f"unknown {self.name} target option(s) {sorted(options)}; valid: "
                             f"{', '.join(o.name for o in self.OPTIONS)}")
        if trials is None:
            trials = os.environ.get(TRIALS_ENV, DEFAULT_TRIALS)
        try:
            self.trials = int(trials)
            self.max_new_tasks = None if max_new_tasks is None else int(max_new_tasks)
        except (TypeError, ValueError):
            raise UsageError(f"{self.name} target: trials and max_new_tasks must be integers, got "
                             f"trials={trials!r} max_new_tasks={max_new_tasks!r}") from None
        if self.trials < 0 or (self.max_new_tasks is not None and self.max_new_tasks < 0):
            raise UsageError(f"{self.name} target: trials and max_new_tasks must be >= 0 (trials=0: no tuning)")
        self.tuning_db_root = tuning_db
        self.budget = budget_plan(self.name, tune_trials, tune_time, self.trials)
        if int8_kernels not in ("auto", "vnni", "avx2", "generic"):
            raise UsageError(f"{self.name} target: int8_kernels={int8_kernels!r}: choose auto (the best the CPU has), "
                             "vnni (targets/x86_int8.py: uint8 x int8 on vpdpbusd, AVX-512 VNNI), avx2 (packed "
                             "int16 weights, vpmaddwd) or generic (Relax's integer conv2d/matmul)")
        self._int8_kernels = int8_kernels
        self.canonicalize = _on(canonicalize)
        if str(layout).lower() not in ("auto", "nchw", "nhwc"):
            raise UsageError(f"{self.name} target: layout={layout!r}: choose auto, nchw or nhwc")
        self.layout = str(layout).lower()
        self.tune_cache_flush = _on(tune_cache_flush)
        self.prepack = _on(prepack)
        self.fast_math = _on(fast_math)
        self.wide_vector = _on(wide_vector)
        self.pad_channels = _on(pad_channels)
        # set by the search driver: a time.monotonic() deadline for tuning, and the best latency so far (ms)
        self.deadline: float | None = None
        self.incumbent_ms: float | None = None
        self.threads = int(threads) if threads is not None else (os.cpu_count() or 1)
        if self.threads < 1:
            raise UsageError(f"{self.name} target: threads must be >= 1, got {threads}")
        for key, v in (("number", number), ("repeat", repeat), ("warmup", warmup)):
            if v is not None and int(v) < (0 if key == "warmup" else 1):
                raise UsageError(f"{self.name} target: {key} must be >= {0 if key == 'warmup' else 1}, got {v}")
        self.number = None if number is None else int(number)
        self.repeat = int(repeat)
        self.warmup = int(warmup)
        self._mcpu = mcpu  # None: detect lazily (detection imports tvm)
        self._mattr = list(mattr) if mattr is not None else None
        self._target = None
        self.rpc_config = self._rpc_config(rpc_options)
        self._rpc_dir: str | None = None

    @property
    def concurrent_measure(self) -> bool:
        """Through a tracker, each measurement asks for a free device under the key: several run
        at once on several devices (the tracker queues a request when all are busy)."""
        return self.rpc_config is not None and self.rpc_config.tracker is not None

    def _rpc_config(self, rpc_options: dict[str, Any]) -> rpc.RpcConfig | None:
        """Where to measure: an RpcConfig from the rpc options (and, per target, the environment),
        or None for in-process timing here. Each subclass says."""
        raise NotImplementedError

    # ----------------------------------------------------------------------- target facts
    @property
    def mcpu(self) -> str:
        if self._mcpu is None:
            tc.load_tvm(self.threads)
            self._mcpu = tc.host_mcpu()
        return self._mcpu

    @property
    def mattr(self) -> list[str]:
        if self._mattr is None:  # detected cpu: mask features the (virtual) host lacks
            self._mattr = list(tc.host_mattr(self.mcpu)) if self.options.get("mcpu") is None else []
        return self._mattr

    @property
    def int8_kernels(self) -> str:
        """How QDQ matmuls/1x1 convs are lowered (option int8_kernels=auto): "vnni" (x86_int8's vpdpbusd
        kernel) when the target CPU has AVX-512 VNNI, "avx2" (its vpmaddwd kernel) with AVX2, else "generic"."""
        if self._int8_kernels != "auto":
            return self._int8_kernels
        from . import x86_int8

        return ("vnni" if x86_int8.vnni_available(self.target) else
                "avx2" if x86_int8.available(self.target) else "generic")

    def target_json(self) -> dict[str, Any]:
        return tc.target_dict(self.mcpu, self.threads, mattr=self.mattr)

    @property
    def target(self):
        if self._target is None:
            self._target = tc.llvm_target(self.mcpu, self.threads, mattr=self.mattr)
        return self._target

    @property
    def vector_bits(self) -> int:
        """The vector width tuning vectorizes at (tuning_ms.space): the CPU's, 0 with wide_vector off."""
        from .tuning_ms import vector_bits

        return vector_bits(self.target) if self.wide_vector else 0

    def check(self) -> None:
        tc.require_tvm(self.name)
        if self.rpc_config is not None:
            rpc.check_reachable(self.rpc_config)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "compiler": f"tvm relax {tc.tvm_version()}",
            "target": self.target_json(),
            "device": tc.cpu_model_name(),
            "threads": self.threads,
            "mcpu": self.mcpu,
            "tuned": self.trials > 0,
            **({"tuning": {"trials_per_workload": self.trials, "db": str(self.tuning_db_dir),
                           "vector_bits": self.vector_bits, **self._budget_describe()}} if self.trials else {}),
            **self._rpc_describe(),
        }

    def _budget_describe(self) -> dict[str, Any]:
        b = self.budget
        if b is None:
            return {}
        return {"budget": {"trials": b.budget_trials, "seconds": b.budget_s, "warm": b.warm, "step": b.step}}

    @property
    def tuning_db_dir(self) -> Path:
        from . import tuning

        d = tuning.db_dir_for(self.target_json(), self.tuning_db_root)
        suffix = ("-flush" if self.tune_cache_flush else "") + ("-prepack" if self.prepack else "")
        return d.with_name(d.name + suffix)

    def _rpc_describe(self) -> dict[str, Any]:
        if self.rpc_config is None:
            return {}
        c = self.rpc_config
        # the device is named by its key (or server), not the tracker's address, so a resumed
        # run with the tracker elsewhere still matches the run store's identity
        return {"device": f"TVM RPC device {c.key!r}" if c.tracker else f"TVM RPC {c.where()}",
                "rpc": c.to_dict(), "measured": f"over TVM RPC ({c.where()})"}

    # ---------------------------------------------------------------------------- compile
    def compile(self, model, workdir: Path) -> Artifact:
        tc.load_tvm(self.threads)
        specs = tc.input_specs(model)
        t0 = time.perf_counter()
        mod, prep, t_fold, n_fast, padded = self._relax_module(model)
        t1 = time.perf_counter()
        ex, lower_info = self._lower(mod, Path(workdir))
        t2 = time.perf_counter()
        info = {
            "fold_s": t_fold - t0,
            "import_s": t1 - t_fold,
            "build_s": t2 - t1,
            "inputs": [(n, list(s), d) for n, s, d in specs],
            "target": self.target_json(),
            "tuned": False,
            "canonicalized": prep,
            "channels_padded": padded,
            "layout": self.layout_for(model),
            "prepack": self.prepack,
            "fast_math": n_fast,
        }
        info.update(lower_info)
        return Artifact(target=self.name, files=[], handle=ex, info=info)

    def relax_module(self, model):
        """The Relax IRModule this target tunes and builds for `model` (what compile() lowers)."""
        return self._relax_module(model)[0]

    def _relax_module(self, model):
        """(Relax module, canonicalize info, perf_counter after folding, calls made fast math, channel
        groups padded): fold constants, canonicalize (BN and zero Pads folded, targets/tvm_prep.py),
        in NHWC pad conv channels to the vector width (targets/channel_pad.py), import (QDQ lowered),
        convert layout, fast math (exp/erf/tanh/sigmoid/softmax as polynomials)."""
        from . import channel_pad, tvm_prep

        prep: dict[str, Any] = {}
        layout = self.layout_for(model)
        folded = tc.fold_constants(model)  # first: a raw export gives Pad its amounts as Constant nodes
        if self.canonicalize:
            folded, prep = tvm_prep.canonicalize(folded)
        padded: list = []
        if layout == "nhwc" and self.pad_channels and self.vector_bits:
            folded, pad_info = channel_pad.pad_channels(folded, self.vector_bits // 32)
            padded = pad_info["channels_padded"]
        t_fold = time.perf_counter()
        mod = tc.import_onnx(folded, fold=False, int8_kernels=self.int8_kernels, int8_nhwc=layout == "nhwc")
        if layout != "nchw":
            mod = tvm_prep.convert_layout(mod, layout, self.target, int8_kernels=self.int8_kernels)
        mod, n_fast = tvm_prep.fast_math(mod) if self.fast_math else (mod, 0)
        return mod, prep, t_fold, n_fast, padded

    def layout_for(self, model) -> str:
        """The conv layout this target compiles `model` in: a layout move's hint in the model
        (passes/layout.py, graphopt.modelio.hints) wins over the `layout` option."""
        from graphopt.modelio.hints import LAYOUT, get_hint

        hint = get_hint(model, LAYOUT)
        if hint is None:
            if self.layout != "auto":
                return self.layout
            # NHWC/HWIO puts the channels on the vector lanes: EfficientNet-Lite0 x1.03 of onnxruntime after
            # 20 min vs x2.12 for NCHW after 10; its QDQ int8 form 3.2 vs 7.6 ms (targets/int8_nhwc.py; docs/compiler.md)
            ops = {n.op_type for n in model.graph.node}
            operator_int8 = ops & {"QLinearConv", "ConvInteger"}  # not lowered by qdq_lower: TVM's own import
            return "nhwc" if self.vector_bits and "Conv" in ops and not operator_int8 else "nchw"
        if hint not in ("nchw", "nhwc"):
            raise CompileError(f"{self.name}: the model's {LAYOUT} hint is {hint!r}; this target compiles nchw or nhwc "
                               "(remove the metadata_props entry, or re-export the model with a layout move)")
        return hint

    def _lower(self, mod, workdir: Path) -> tuple[Any, dict[str, Any]]:
        """Relax IRModule -> Executable: tuned through the persistent database when trials > 0.

        Cheap-first (see the README): only workloads the database lacks are tuned, most-called
        first, until the run's deadline; when the workloads already known put this candidate's
        kernel time above 1.1x the best latency so far, it cannot win and none are tuned.
        """
        if self.trials <= 0:  # untuned: no schedules, so no weight layout to pre-pack for
            return tc.build(mod, self.target, exec_mode=self.vm_exec), {"tuned": False}
        from . import tuning

        lower_bound_s = None if self.incumbent_ms is None else 1.1 * self.incumbent_ms / 1000.0
        ex, stats = tuning.tune_and_build(
            mod, self.target, db_dir=self.tuning_db_dir, trials_per_task=self.trials, work_dir=workdir,
            max_new_tasks=self.max_new_tasks, deadline=self.deadline, runner=self.ms_runner(),
            builder=self.ms_builder(), num_threads=self.threads, skip_if_known_exceeds_s=lower_bound_s,
            budget=self.budget, prepack=self.prepack, vector_bits=self.vector_bits,
            refine=0 if self.rpc_config is not None else getattr(self, "refine", 0), exec_mode=self.vm_exec)
        info = {"tuned": stats.workloads_seen > 0 and not stats.partly_untuned, "tuning": stats.to_dict()}
        return ex, info

    # ---------------------------------------------------------------------------- running
    def _ordered_inputs(self, artifact: Artifact, inputs: Mapping[str, Any]) -> list:
        return tc.ordered_inputs(artifact.info["inputs"], inputs, self.name)

    def run_once(self, artifact: Artifact, inputs: Mapping[str, Any]) -> list:
        """Run the compiled module once; outputs as numpy arrays in graph output order."""
        if self.rpc_config is not None:
            return rpc.run_remote(self.rpc_config, self._remote_lib(artifact), self._ordered_inputs(artifact, inputs))
        tvm = tc.load_tvm(self.threads)
        tc.set_num_threads(self.threads)
        return tc.run_vm(artifact.handle, tvm.cpu(), self._ordered_inputs(artifact, inputs))

    def measure(self, artifact: Artifact, inputs: Mapping[str, Any]) -> Measurement:
        if self.rpc_config is not None:
            return self._measure_rpc(artifact, inputs)
        tvm = tc.load_tvm(self.threads)
        args = self._ordered_inputs(artifact, inputs)
        threads = tc.set_num_threads(self.threads)
        samples, number = tc.time_vm(artifact.handle, tvm.cpu(), args, number=self.number,
                                     repeat=self.repeat, warmup=self.warmup)
        tuned = bool(artifact.info.get("tuned", False))
        extra: dict[str, Any] = {"mcpu": self.mcpu, "compiler": f"tvm relax {tc.tvm_version()}"}
        self._tuning_extra(artifact, extra)
        if threads != self.threads:
            extra["threads_warning"] = (
                f"asked for {self.threads} threads, TVM's pool has {threads}: tvm was imported "
                f"before TVM_NUM_THREADS could be set"
            )
        return Measurement(
            latency=LatencyStats.from_samples(samples, runs_per_repeat=number),
            method="measured",
            tuned=tuned,
            threads=threads,
            device=f"{tc.cpu_model_name()} (llvm mcpu={self.mcpu})",
            extra=extra,
        )

    @staticmethod
    def _tuning_extra(artifact: Artifact, extra: dict[str, Any]) -> None:
        """Say how tuned the measured code was: the note for untuned code, the tuning stats."""
        stats = artifact.info.get("tuning")
        if stats is not None:
            extra["tuning"] = stats
        if not artifact.info.get("tuned", False):
            extra["note"] = UNTUNED_NOTE if stats is None else (
                f"partly untuned: {stats['workloads_untuned']} of {stats['workloads_seen']} workloads ran TVM's "
                f"default schedules ({stats.get('stopped_because') or 'not tuned'})")

    def export(self, artifact: Artifact, out_dir: Path) -> list[Path]:
        if artifact.handle is None and artifact.info.get("library"):  # compiled in a worker process
            return [_copy_file(Path(artifact.info["library"]), Path(out_dir) / "model.so")]
        return [tc.export_library(artifact.handle, Path(out_dir) / "model.so")]

    # ------------------------------------------------------------- across processes
    @property
    def portable_artifacts(self) -> bool:
        return True

    def portable(self, artifact: Artifact, workdir: Path) -> Artifact:
        """Worker side of --compile-workers: the executable exported as the library a device loads
        (what _remote_lib would write), so the search's process measures and exports that file."""
        if artifact.handle is None:
            return artifact
        path = self._export_remote(artifact, Path(workdir) / "model")
        info = dict(artifact.info, library=str(path))
        if self.rpc_config is not None:
            info["rpc_lib"] = str(path)  # _remote_lib uploads it as it is
        return Artifact(target=artifact.target, files=[*artifact.files, path], handle=None, info=info)

    def load_portable(self, artifact: Artifact) -> Artifact:
        """Over RPC the library file is all measure() and export() need; measuring on this machine
        loads it into this process."""
        if artifact.handle is None and self.rpc_config is None and artifact.info.get("library"):
            tvm = tc.load_tvm(self.threads)
            artifact.handle = tvm.runtime.load_module(artifact.info["library"])
        return artifact

    # ------------------------------------------------------------------------ over RPC
    def ms_runner(self):
        """MetaSchedule runner for tuning: an RPCRunner on the tracker's devices when one is given,
        else None (MetaSchedule's local runner)."""
        c = self.rpc_config
        if c is not None and c.tracker is not None:
            return rpc.ms_runner(c)
        if self.tune_cache_flush:
            tc.load_tvm(self.threads)
            import tvm.s_tir.meta_schedule as ms

            from .tuning_ms import local_runner

            return local_runner(ms, cache_flush=True)
        return None

    def ms_builder(self) -> Any:
        """MetaSchedule builder for tuning: None = the local one (rpi4 cross-links for aarch64)."""
        return None

    def _export_remote(self, artifact: Artifact, stem: Path) -> Path:
        """Write the library a remote device loads (rpi4 overrides: cross-linked .so or .tar)."""
        return tc.export_library(artifact.handle, stem.with_suffix(".so"))

    def _remote_lib(self, artifact: Artifact) -> Path:
        """The artifact exported once for upload (kept in a temp folder until close())."""
        cached = artifact.info.get("rpc_lib")
        if cached and Path(cached).exists():
            return Path(cached)
        import tempfile

        if self._rpc_dir is None:
            self._rpc_dir = tempfile.mkdtemp(prefix="graphopt-rpc-")
        stem = Path(tempfile.mkdtemp(prefix="cand-", dir=self._rpc_dir)) / "model"
        path = self._export_remote(artifact, stem)
        artifact.info["rpc_lib"] = str(path)
        return path

    def _measure_rpc(self, artifact: Artifact, inputs: Mapping[str, Any], outputs: list | None = None) -> Measurement:
        """`outputs`, when given, receives the outputs of one run on the device (rpc.measure_remote)."""
        args = self._ordered_inputs(artifact, inputs)
        lib = self._remote_lib(artifact)
        remote: dict[str, Any] = {}
        samples, number = rpc.measure_remote(self.rpc_config, lib, args, number=self.number, repeat=self.repeat,
                                             warmup=self.warmup, info=remote, outputs=outputs)
        tuned = bool(artifact.info.get("tuned", False))
        extra: dict[str, Any] = {"mcpu": self.mcpu, "compiler": f"tvm relax {tc.tvm_version()}",
                                 "rpc": self.rpc_config.where(), "library": lib.name}
        self._tuning_extra(artifact, extra)
        return Measurement(
            latency=LatencyStats.from_samples(samples, runs_per_repeat=number),
            method="rpc",
            tuned=tuned,
            threads=remote.get("threads"),
            device=f"{self.rpc_config.where()} (llvm {self.target_json().get('mtriple', 'mcpu=' + self.mcpu)})",
            extra=extra,
        )

    def close(self) -> None:
        self._target = None
        if self._rpc_dir is not None:
            import shutil

            shutil.rmtree(self._rpc_dir, ignore_errors=True)
            self._rpc_dir = None


def _copy_file(src: Path, dst: Path) -> Path:
    """Copy src to dst atomically (temp name + os.replace)."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst
