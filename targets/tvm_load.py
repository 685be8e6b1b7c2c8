"""Loading Apache TVM: the one leaf module that imports tvm (lazily) and sizes its thread pool.

Importing this module does not import tvm. Every TVM target and helper loads tvm through
`load_tvm(threads)`: the runtime's thread pool is sized from TVM_NUM_THREADS when it is first
created, and can later be shrunk but never grown (measured on TVM 0.27). This module imports
nothing from graphopt but graphopt.errors, so any module may use it without an import cycle.
"""

from __future__ import annotations

import os
import sys

from graphopt.errors import UsageError

THREADS_ENV = "TVM_NUM_THREADS"


def tvm_available() -> bool:
    """True when apache-tvm is installed (does not import it)."""
    import importlib.util

    return importlib.util.find_spec("tvm") is not None


def require_tvm(target_name: str) -> None:
    """Raise UsageError naming the fix when tvm is not installed."""
    if not tvm_available():
        raise UsageError(
            f"target {target_name!r} needs Apache TVM: pip install 'graphopt[tvm]' "
            "(apache-tvm==0.27.0.post1, apache-tvm-ffi==0.1.14.post1)"
        )


def load_tvm(num_threads: int | None = None):
    """Import and return the tvm module, sizing the runtime thread pool first.

    TVM_NUM_THREADS is raised to at least `num_threads` and at least os.cpu_count() (the
    runtime's own default on these VMs is ONE thread) before tvm is imported. The pool is
    created lazily (per calling thread) and reads the variable then, so raising it after the
    import still helps a pool not created yet. A larger pool is harmless: `set_num_threads`
    shrinks it per measurement; it can never grow it.
    """
    want = max(int(num_threads or 0), os.cpu_count() or 1)
    try:
        have = int(os.environ.get(THREADS_ENV, "0"))
    except ValueError:
        have = 0
    if have < want:
        os.environ[THREADS_ENV] = str(want)
    import tvm

    return tvm


def set_num_threads(n: int) -> int:
    """Use n worker threads for TVM kernels launched from the *calling* thread.

    Returns the thread count TVM reports afterwards, which is lower than n when the pool was
    created smaller (tvm imported elsewhere before load_tvm could set TVM_NUM_THREADS).
    """
    tvm = load_tvm(n)
    tvm.get_global_func("runtime.config_threadpool")(1, int(n))  # 1 = kBig: all cores here
    return int(tvm.get_global_func("runtime.NumThreads")())


def tvm_version() -> str:
    """The TVM version string, without importing tvm when it is not imported yet."""
    if "tvm" in sys.modules:
        return str(sys.modules["tvm"].__version__)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("apache-tvm")
    except PackageNotFoundError:
        return str(load_tvm().__version__)
