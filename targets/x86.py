"""x86: this machine's CPU through Apache TVM (Relax, LLVM, MetaSchedule), timed in-process or over RPC.

Everything but the name and where it measures is shared with rpi4 in targets/llvm_cpu.py
(`LlvmCpuTarget`: compile flow, tuning, timing, export). Importing this module does not import tvm.
"""

from __future__ import annotations

from typing import Any

from graphopt.errors import UsageError
from graphopt.plugin import Option

from . import in_model, rpc, tune_budget
from .llvm_cpu import DEFAULT_TRIALS, TRIALS_ENV, UNTUNED_NOTE, VM_EXEC, LlvmCpuTarget, _copy_file, _on  # noqa: F401


class X86Target(LlvmCpuTarget):
    name = "x86"
    description = ("This machine's x86 CPU via Apache TVM Relax + LLVM, MetaSchedule-tuned (persistent database), "
                   "timed in-process or over RPC.")
    OPTIONS = LlvmCpuTarget.OPTIONS + (
        Option("refine", int, 4, "after tuning, re-time the top N records of each heavy workload inside the "
               f"compiled model and keep the fastest there (N builds; only when the workloads not yet checked are "
               f">= {in_model.MIN_SHARE:.0%} of the model and >= {in_model.MIN_MS} ms; measured here, not over "
               "RPC; targets/in_model.py); 0: the database's best records", minimum=0),
        Option("alloc_in_model", bool, False, "with a tune_time/tune_trials budget: weigh each workload by its kernel's "
               "time inside the compiled model (profiled after the warm-up, then every "
               "%d s; the builds count against the budget) instead of calls x its record; measured here, "
               "not over RPC; targets/tune_budget.py; 0: off" % tune_budget.PROFILE_EVERY_S),
        Option("vm_exec", str, "compiled", "the Relax VM's form of the model: compiled (its main function compiled "
               "to native code: ~0.1 us less per kernel call, within the noise on the bundled models; a model it "
               "cannot take is built as bytecode, with a warning) or bytecode (interpreted; what refine times by, "
               "through the VM's instrument hook)", choices=VM_EXEC),
    )

    def __init__(self, *args: Any, refine: Any = 4, alloc_in_model: Any = 0, vm_exec: Any = "compiled",
                 **options: Any) -> None:
        super().__init__(*args, **options)
        self.vm_exec = str(vm_exec).strip().lower()
        if self.vm_exec not in VM_EXEC:
            raise UsageError(f"x86 target: vm_exec={vm_exec!r}: choose {' or '.join(VM_EXEC)}")
        self.options["vm_exec"] = self.vm_exec
        try:
            self.refine = int(refine)
        except (TypeError, ValueError):
            self.refine = -1
        if self.refine < 0:
            raise UsageError(f"x86 target: refine={refine!r}: a count of records (0: off, 4: the default)")
        self.options["refine"] = self.refine
        self.alloc_in_model = _on(alloc_in_model)
        if self.alloc_in_model and self.budget is None:
            raise UsageError("x86 target: alloc_in_model=1 weighs a per-model tuning budget; give one too "
                             "(--target-opt tune_time=20m or tune_trials=N), or drop alloc_in_model")
        self.options["alloc_in_model"] = int(self.alloc_in_model)
        if self.budget is not None:  # profiled where it measures: not over RPC
            self.budget.in_model = self.alloc_in_model and self.rpc_config is None

    @property
    def ort_comparable(self) -> bool:
        """Timed on this host's CPU (not over RPC): onnxruntime here is the fair comparison
        (graphopt.reporting.ort_reference times it next to the kept graph at the end of a run)."""
        return self.rpc_config is None

    def _rpc_config(self, rpc_options: dict[str, Any]) -> rpc.RpcConfig | None:
        """Measure through TVM RPC when tracker/server options are given (x86 ignores the
        GRAPHOPT_RPC_* environment: it means this machine unless told otherwise)."""
        return rpc.RpcConfig.from_options(rpc_options, env=None)
