"""x86: this machine's CPU through Apache TVM (Relax, LLVM, MetaSchedule), timed in-process or over RPC.

Everything but the name and where it measures is shared with rpi4 in targets/llvm_cpu.py
(`LlvmCpuTarget`: compile flow, tuning, timing, export). Importing this module does not import tvm.
"""

from __future__ import annotations

from typing import Any

from . import rpc
from .llvm_cpu import DEFAULT_TRIALS, TRIALS_ENV, UNTUNED_NOTE, LlvmCpuTarget, _copy_file  # noqa: F401


class X86Target(LlvmCpuTarget):
    name = "x86"
    description = ("This machine's x86 CPU via Apache TVM Relax + LLVM, MetaSchedule-tuned (persistent database), "
                   "timed in-process or over RPC.")
    OPTIONS = LlvmCpuTarget.OPTIONS

    def _rpc_config(self, rpc_options: dict[str, Any]) -> rpc.RpcConfig | None:
        """Measure through TVM RPC when tracker/server options are given (x86 ignores the
        GRAPHOPT_RPC_* environment: it means this machine unless told otherwise)."""
        return rpc.RpcConfig.from_options(rpc_options, env=None)
