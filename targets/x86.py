"""x86: this machine's CPU through Apache TVM (Relax, LLVM), timed in-process. Untuned for now.

Compile flow (tvm_common's docstring): fold_constants -> import_onnx -> _lower (untuned: tvm.compile; a
MetaSchedule step will override _lower: tune the fused module, compile_relax on the raw one)
-> Artifact(handle=Executable). Importing this module does not import tvm.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from graphopt.errors import DataError, UsageError
from graphopt.plugin import Artifact, LatencyStats, Measurement, Target

from . import tvm_common as tc

UNTUNED_NOTE = (
    "untuned TVM CPU code (default Relax pipeline, no schedules: naive single-threaded loops) "
    "is 40-110x slower than tuned code and onnxruntime; do not read it as TVM's speed"
)


class X86Target(Target):
    name = "x86"
    description = "This machine's x86 CPU via Apache TVM Relax + LLVM (untuned), timed in-process."

    def __init__(
        self,
        threads: int | None = None,
        mcpu: str | None = None,
        number: int | None = None,
        repeat: int = 5,
        warmup: int = 1,
        mattr: list[str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(threads=threads, mcpu=mcpu, number=number, repeat=repeat, warmup=warmup,
                         mattr=mattr, **options)
        if options:
            raise UsageError(
                f"unknown x86 target option(s) {sorted(options)}; valid: threads, mcpu, number, "
                "repeat, warmup, mattr"
            )
        self.threads = int(threads) if threads is not None else (os.cpu_count() or 1)
        if self.threads < 1:
            raise UsageError(f"x86 target: threads must be >= 1, got {threads}")
        for key, v in (("number", number), ("repeat", repeat), ("warmup", warmup)):
            if v is not None and int(v) < (0 if key == "warmup" else 1):
                raise UsageError(f"x86 target: {key} must be >= {0 if key == 'warmup' else 1}, got {v}")
        self.number = None if number is None else int(number)
        self.repeat = int(repeat)
        self.warmup = int(warmup)
        self._mcpu = mcpu  # None: detect lazily (detection imports tvm)
        self._mattr = list(mattr) if mattr is not None else None
        self._target = None

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

    def target_json(self) -> dict[str, Any]:
        return tc.target_dict(self.mcpu, self.threads, mattr=self.mattr)

    @property
    def target(self):
        if self._target is None:
            self._target = tc.llvm_target(self.mcpu, self.threads, mattr=self.mattr)
        return self._target

    def check(self) -> None:
        tc.require_tvm(self.name)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "compiler": f"tvm relax {tc.tvm_version()}",
            "target": self.target_json(),
            "device": tc.cpu_model_name(),
            "threads": self.threads,
            "mcpu": self.mcpu,
            "tuned": False,
        }

    # ---------------------------------------------------------------------------- compile
    def compile(self, model, workdir: Path) -> Artifact:
        tc.load_tvm(self.threads)
        specs = tc.input_specs(model)
        t0 = time.perf_counter()
        folded = tc.fold_constants(model)
        tf = time.perf_counter()
        mod = tc.import_onnx(folded, fold=False)
        t1 = time.perf_counter()
        ex, lower_info = self._lower(mod, Path(workdir))
        t2 = time.perf_counter()
        info = {
            "fold_s": tf - t0,
            "import_s": t1 - tf,
            "build_s": t2 - t1,
            "inputs": [(n, list(s), d) for n, s, d in specs],
            "target": self.target_json(),
            "tuned": False,
        }
        info.update(lower_info)
        return Artifact(target=self.name, files=[], handle=ex, info=info)

    def _lower(self, mod, workdir: Path) -> tuple[Any, dict[str, Any]]:
        """Relax IRModule -> Executable. The tuning step replaces this (returns tuned=True)."""
        return tc.build(mod, self.target), {"tuned": False}

    # ---------------------------------------------------------------------------- running
    def _ordered_inputs(self, artifact: Artifact, inputs: Mapping[str, Any]) -> list:
        import numpy as np

        specs = artifact.info["inputs"]
        names = [n for n, _, _ in specs]
        if set(inputs) != set(names):
            raise DataError(f"x86 target: inputs {sorted(inputs)} do not match the model's {sorted(names)}")
        out = []
        for name, shape, dtype in specs:
            x = np.asarray(inputs[name])
            if list(x.shape) != list(shape):
                raise DataError(f"x86 target: input {name!r} has shape {list(x.shape)}, the model declares {shape}")
            out.append(x.astype(dtype, copy=False))
        return out

    def run_once(self, artifact: Artifact, inputs: Mapping[str, Any]) -> list:
        """Run the compiled module once; outputs as numpy arrays in graph output order."""
        tvm = tc.load_tvm(self.threads)
        tc.set_num_threads(self.threads)
        return tc.run_vm(artifact.handle, tvm.cpu(), self._ordered_inputs(artifact, inputs))

    def measure(self, artifact: Artifact, inputs: Mapping[str, Any]) -> Measurement:
        tvm = tc.load_tvm(self.threads)
        args = self._ordered_inputs(artifact, inputs)
        threads = tc.set_num_threads(self.threads)
        samples, number = tc.time_vm(artifact.handle, tvm.cpu(), args, number=self.number,
                                     repeat=self.repeat, warmup=self.warmup)
        tuned = bool(artifact.info.get("tuned", False))
        extra: dict[str, Any] = {"mcpu": self.mcpu, "compiler": f"tvm relax {tc.tvm_version()}"}
        if not tuned:
            extra["note"] = UNTUNED_NOTE
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

    def export(self, artifact: Artifact, out_dir: Path) -> list[Path]:
        return [tc.export_library(artifact.handle, Path(out_dir) / "model.so")]

    def close(self) -> None:
        self._target = None
