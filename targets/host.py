"""The host machine's CPU: its name, for the `device` a CPU target reports (ort, x86), and the
instruction-set flags that decide int8 and vector speed, which every published number carries
(`cpu_summary`; bench/). One definition. Imports nothing heavy."""

from __future__ import annotations

import platform

CPUINFO = "/proc/cpuinfo"  # a module attribute so a test can point it elsewhere


def cpu_model_name() -> str:
    """The host CPU's marketing name (/proc/cpuinfo 'model name'), or platform's best guess."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


# the flags that change which kernels run (vector width, int8 dot products, AMX); ARM: dot products, SVE
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp", "sve", "i8mm")


def cpu_flags() -> set[str]:
    """/proc/cpuinfo's 'flags' (x86) or 'Features' (ARM) of the first CPU; empty where unreadable."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_summary() -> str:
    """'AMD EPYC (avx2 avx512f avx512_vnni ...)': the name and the SPEED_FLAGS it has, for a bench's header."""
    flags = cpu_flags()
    have = " ".join(f for f in SPEED_FLAGS if f in flags)
    return f"{cpu_model_name()} ({have or 'no SIMD flags read'})"
