"""The host machine's CPU name, for the `device` a CPU target reports (ort, x86): one definition.
Imports nothing heavy."""

from __future__ import annotations

import platform


def cpu_model_name() -> str:
    """The host CPU's marketing name (/proc/cpuinfo 'model name'), or platform's best guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"
