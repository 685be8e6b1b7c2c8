"""The option table of the LLVM/TVM CPU targets (targets/llvm_cpu.py: x86 and rpi4 add their own).

What each option does is said in its help (`graphopt list`); docs/targets.md has the measurements
behind the defaults. Importing this module does not import tvm.
"""

from __future__ import annotations

from graphopt.plugin import Option

from . import rpc

OPTIONS = (
    Option("threads", int, None, "TVM worker threads (default: the CPUs here)", minimum=1),
    Option("mcpu", str, None, "LLVM -mcpu (default: this CPU)"),
    Option("mattr", list, None, "LLVM -mattr features"),
    Option("number", int, None, "runs per timed repeat (default: sized to the model)", minimum=1),
    Option("repeat", int, 5, "timed repeats (median reported)", minimum=1),
    Option("warmup", int, 1, "untimed runs first", minimum=0),
    Option("trials", int, None, "MetaSchedule trials (0: no tuning; default GRAPHOPT_TUNE_TRIALS)", minimum=0),
    Option("tuning_db", str, None, "tuning database directory (default ~/.cache/graphopt/tuning)"),
    Option("max_new_tasks", int, None, "tune at most this many new tasks per candidate", minimum=0),
    Option("int8_kernels", str, "auto", "int8 conv/matmul kernels", choices=("auto", "vnni", "avx2", "generic")),
    Option("tune_trials", int, None, "per-model tuning budget in trials, spent where the latency is "
           "(`trials` becomes each new workload's warm-up)", minimum=1),
    Option("tune_time", str, None, "per-model tuning budget in time (seconds, or 90s / 20m / 1h)"),
    Option("canonicalize", bool, True, "fold BatchNormalization and zero Pads into the convs before import, "
           "as onnxruntime does (exact; targets/tvm_prep.py)"),
    Option("layout", str, "auto", "convolution data layout TVM compiles: nhwc (Relax ConvertLayout to NHWC/HWIO), "
           "nchw, or auto: nhwc for a conv model (float or QDQ int8) where the x86 space vectorizes wide (wide_vector "
           "with AVX2/AVX-512), nchw otherwise (QLinearConv models, rpi4); a model's `layout` pass hint wins; "
           "docs/compiler.md", choices=("auto", "nchw", "nhwc")),
    Option("tune_cache_flush", bool, False, "tune with the CPU caches flushed before each timed call (weights "
           "cold, as in the model); its records go to their own database folder"),
    Option("prepack", bool, False, "let MetaSchedule choose each weight's memory layout and transform the "
           "weights once at build time (RewriteLayout; exact; its records go to their own database folder)"),
    Option("fast_math", bool, True, "exp, erf, tanh, sigmoid and softmax as vectorized polynomials (Relax "
           "FastMathTransform; within 1e-6 of onnxruntime) instead of scalar libm calls, 3.5-42x "
           "slower here and data-dependent (bench/tvm_fast_math.py, docs/compiler.md); 0: libm"),
    Option("wide_vector", bool, True, "tune with every tiled kernel's innermost output axis vectorized at the "
           "CPU's full width (512 bits with AVX-512, 256 with AVX2; x86 only; MetaSchedule's "
           "MultiLevelTilingWideVector); 0: TVM's default space (docs/compiler.md)"),
    Option("pad_channels", bool, True, "in NHWC, pad conv channel counts to a multiple of the vector width "
           "(24 -> 32, 40 -> 48 with AVX-512) with zero weights, carried to the next convs (exact; "
           "targets/channel_pad.py); 0: off"),
) + rpc.rpc_options()
