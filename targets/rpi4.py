"""rpi4: a Raspberry Pi 4 (aarch64 Cortex-A72, NEON, 4 cores) through Apache TVM, cross-compiled here.

Latency comes from one of two places, and the report says which:
  - a real Pi through TVM RPC (Measurement.method = "rpc"): `--target-opt tracker=HOST:PORT
    --target-opt key=NAME` (or `server=HOST:PORT`, or $GRAPHOPT_RPC_TRACKER/_KEY/_SERVER); on the Pi:
    `python -m tvm.exec.rpc_server --tracker HOST:PORT --key NAME`;
  - with `--target-opt estimate=1`, a cost model of the Cortex-A72 (COST_MODEL below;
    Measurement.method = "estimated": no device timed it).
With neither, the target refuses to start (UsageError, exit 2: no device was named) instead of pretending.

Whenever a device is given, each candidate's outputs from one run on the device are compared with
onnxruntime's on this host for the same graph and inputs (Measurement.extra["device_check"]); a
mismatch fails the candidate. `--target-opt check=0` turns this off, `check_tol=T` sets the
tolerance (max |device - onnxruntime| / max(1, max |onnxruntime|); default 1e-3, 5e-2 for QDQ graphs,
which onnxruntime runs in int8 and TVM in float).

An emulated Pi (tests/emulated_pi.py: QEMU's Cortex-A72 model) says so on the device
(`graphopt.emulated`). Its timings are an x86 host translating aarch64 code, not a Pi's latency, so
the target refuses to time on it; with `estimate=1` the cost model ranks the candidates and the
emulator runs each one's aarch64 code to check its outputs ("estimate ranks, the device checks").

The deployable artifact is `model.so` (linked for aarch64 by a cross compiler: Debian's
aarch64-linux-gnu-g++/gcc on PATH, else the `ziglang` PyPI package's `zig cc`) or, without one,
`model.tar` (objects the Pi links itself when it loads the file: needs gcc on the Pi), plus
`run_on_pi.py`, a script that loads and times it with the TVM runtime alone.
Choose with `--target-opt cc=auto|zig|tar|COMMAND` (default auto).

Importing this module does not import tvm.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from graphopt.errors import CompileError, TargetUnreachable, UsageError
from graphopt.plugin import Artifact, LatencyStats, Measurement, Option

from . import device_check, rpc
from . import tvm_common as tc
from .llvm_cpu import LlvmCpuTarget

TRIPLE = "aarch64-linux-gnu"
MCPU = "cortex-a72"
MATTR = ("+neon",)
CORES = 4

# ------------------------------------------------------------------------------ cost model
# A roofline per ONNX node, for ranking candidates when no Pi is reachable. Assumptions:
#   - 4 Cortex-A72 cores at 1.5 GHz, each with two 128-bit NEON FMA pipes: 4 fp32 lanes x 2 FLOPs
#     x 2 pipes = 16 FLOP/cycle/core -> 96 GFLOP/s peak fp32 (scaled by threads/4);
#   - tuned kernels reach a fraction of peak that depends on the op kind (EFFICIENCY below; dense
#     convs and matmuls vectorize well, depthwise convs and pooling much less);
#   - ~4 GB/s usable DRAM bandwidth (LPDDR4-3200 is 12.8 GB/s on paper; STREAM-like copies on a Pi 4
#     reach 4-5 GB/s); every node reads its inputs and weights and writes its outputs once (no
#     operator fusion or cache reuse modeled: the 1 MB L2 is ignored);
#   - a node takes max(compute time, memory time) + a fixed 8 us of dispatch/thread-pool overhead;
#   - data-movement ops (Reshape, Flatten, ...) cost only their memory traffic when they copy.
# It ranks graphs by arithmetic and traffic; it does not predict the Pi's absolute latency
# to better than a factor of ~2-3. Every number from it is reported as "estimated".
COST_MODEL = {
    "peak_gflops_per_core": 1.5 * 16,  # GHz x FLOP/cycle
    "cores": CORES,
    "dram_gbytes_per_s": 4.0,
    "overhead_us_per_node": 8.0,
}
EFFICIENCY = {
    "Conv": 0.35, "ConvDepthwise": 0.10, "ConvTranspose": 0.25, "Gemm": 0.40, "MatMul": 0.40,
    "Attention": 0.25, "com.microsoft:Attention": 0.25,
}
DEFAULT_EFFICIENCY = 0.10  # elementwise, pooling, normalization: memory-bound anyway
NO_COPY_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Constant"}


def _tensor_bytes(model) -> dict[str, int]:
    """Tensor name -> bytes, for every tensor with a static shape (after shape inference)."""
    import onnx
    from onnx import helper

    with contextlib.suppress(Exception):  # else use what the model declares
        model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    out: dict[str, int] = {}

    def size(elem_type: int) -> int:
        try:
            return helper.tensor_dtype_to_np_dtype(elem_type).itemsize
        except Exception:  # noqa: BLE001
            return 4

    for vi in (*g.input, *g.value_info, *g.output):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if tt.HasField("shape") and all(d is not None for d in dims):
            out[vi.name] = math.prod(dims) * size(tt.elem_type)
    for t in g.initializer:
        out[t.name] = math.prod(t.dims) * size(t.data_type)
    return out


def estimate_ms(model, threads: int = CORES) -> tuple[float, dict[str, Any]]:
    """(estimated latency in ms, breakdown) of an ONNX model on a Pi 4 under COST_MODEL."""
    from graphopt.reporting.analysis import analyze

    stats = analyze(model)
    nbytes = _tensor_bytes(model)
    peak = COST_MODEL["peak_gflops_per_core"] * 1e9 * max(1, min(int(threads), CORES))
    bw = COST_MODEL["dram_gbytes_per_s"] * 1e9
    total, compute_s, memory_s, by_op = 0.0, 0.0, 0.0, {}
    for node, ns in zip(model.graph.node, stats.nodes):
        kind = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        if kind == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1:
                kind = "ConvDepthwise"
        if kind == "Constant":
            continue
        moved = 0 if kind in NO_COPY_OPS else sum(nbytes.get(x, 0) for x in (*node.input, *node.output) if x)
        t_c = ns.flops / (peak * EFFICIENCY.get(kind, DEFAULT_EFFICIENCY))
        t_m = moved / bw
        t = max(t_c, t_m) + COST_MODEL["overhead_us_per_node"] * 1e-6
        total += t
        compute_s += t_c
        memory_s += t_m
        by_op[kind] = by_op.get(kind, 0.0) + t * 1e3
    detail = {"flops": stats.total_flops, "compute_bound_ms": compute_s * 1e3, "memory_bound_ms": memory_s * 1e3,
              "by_op_ms": {k: round(v, 4) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
              "unknown_flops_ops": stats.unknown_flops_ops}
    return total * 1e3, detail


# ------------------------------------------------------------------------------- linking
def find_cross_compiler(choice: str = "auto") -> str | None:
    """The aarch64 linker to use: a command on PATH, "zig" (the ziglang package), or None (.tar).

    auto: aarch64-linux-gnu-g++, then aarch64-linux-gnu-gcc (Debian's g++-aarch64-linux-gnu /
    gcc-aarch64-linux-gnu), then zig when `ziglang` is installed, else None.
    """
    choice = str(choice or "auto")
    if choice == "tar":
        return None
    if choice == "zig":
        if importlib.util.find_spec("ziglang") is None:
            raise UsageError("rpi4 cc=zig needs the ziglang package: pip install ziglang")
        return "zig"
    if choice != "auto":
        if shutil.which(choice) is None:
            raise UsageError(f"rpi4 cc={choice!r}: no such command on PATH; install gcc-aarch64-linux-gnu "
                             "(apt), pip install ziglang and use cc=zig, or use cc=tar")
        return choice
    for cmd in (f"{TRIPLE}-g++", f"{TRIPLE}-gcc"):
        if shutil.which(cmd):
            return cmd
    if importlib.util.find_spec("ziglang") is not None:
        return "zig"
    return None


def zig_link(output: str, objects: list[str], options: list[str] | None = None) -> None:
    """Link TVM's objects into an aarch64 shared library with `python -m ziglang cc` (no apt needed)."""
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", TRIPLE, "-shared", "-fPIC", "-o", output,
           *objects, *(options or [])]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"zig cc failed ({r.returncode}): {r.stderr.strip()[-500:]}")


zig_link.output_format = "so"  # type: ignore[attr-defined]  # what TVM's export_library reads


def fcompile_for(cc: str):
    """The `fcompile` export_library needs for a cross compiler from find_cross_compiler()."""
    if cc == "zig":
        return zig_link
    from tvm.support import cc as tvm_cc

    return tvm_cc.cross_compiler(cc)


def export_for_runner(cc: str | None, mod) -> str:
    """MetaSchedule builder f_export: one tuning trial's module as a file the Pi can load."""
    out = Path(tempfile.mkdtemp(prefix="graphopt-ms-"))
    if cc is None:
        from tvm.support import tar

        path = out / "tvm_tmp_mod.tar"
        mod.export_library(str(path), fcompile=tar)
    else:
        path = out / "tvm_tmp_mod.so"
        mod.export_library(str(path), fcompile=fcompile_for(cc))
    return str(path)


def export_aarch64(executable, path: Path, cc: str | None) -> Path:
    """Write `executable` to path (.so with cc, .tar without), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        if path.suffix == ".tar":
            executable.export_library(str(tmp))
        else:
            if cc is None:
                raise UsageError(f"{path.name}: no aarch64 cross compiler; use a .tar path")
            executable.export_library(str(tmp), fcompile=fcompile_for(cc))
        os.replace(tmp, path)
    except UsageError:
        raise
    except Exception as e:
        raise CompileError(f"exporting {path.name} for {TRIPLE} failed: {type(e).__name__}: {tc._first_line(e)}") \
            from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


RUN_ON_PI = '''\
"""Run {lib} on a Raspberry Pi 4 (64-bit OS) with the TVM runtime alone.

    pip install apache-tvm==0.27.0.post1   # on the Pi (aarch64 wheel); only the runtime is used
    TVM_NUM_THREADS=4 TVM_USE_RUNTIME_LIB=1 python3 run_on_pi.py
    ... python3 run_on_pi.py inputs.npz outputs.npz   # your inputs (by input name); outputs saved
{tar_note}"""
import sys
import time

import numpy as np
import tvm.runtime
import tvm.runtime.vm

INPUTS = {inputs!r}  # name -> (shape, dtype), in call order

lib = tvm.runtime.load_module("{lib}")
dev = tvm.cpu()
vm = tvm.runtime.vm.VirtualMachine(lib, dev)
if len(sys.argv) > 1:
    data = np.load(sys.argv[1])
    arrays = [np.ascontiguousarray(data[n], dtype=d) for n, (s, d) in INPUTS.items()]
else:
    arrays = [np.random.default_rng(0).standard_normal(s).astype(d) for s, d in INPUTS.values()]
args = [tvm.runtime.tensor(a, dev) for a in arrays]
t0 = time.perf_counter()
out = vm["main"](*args)
first_s = time.perf_counter() - t0


def flat(v):
    return [v.numpy()] if hasattr(v, "numpy") else [a for x in v for a in flat(x)]


if len(sys.argv) > 2:
    np.savez(sys.argv[2], *flat(out))
    print("outputs saved to %s" % sys.argv[2])
number = max(1, min(10, int(0.2 / max(first_s, 1e-6))))  # a repeat lasts ~0.2 s (at least one run)
t = vm.time_evaluator("main", dev, number=number, repeat=5)(*args)
print("median %.3f ms (%d runs x 5 repeats)" % (t.median * 1e3, number))
'''


def _flag(value: Any, what: str) -> bool:
    v = str(value).strip().lower()
    if v not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise UsageError(f"rpi4 {what}={value!r}: use {what}=1 or {what}=0")
    return v in ("1", "true", "yes", "on")


def _tolerance(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = -1.0
    if not 0 < v < 1e3:
        raise UsageError(f"rpi4 check_tol={value!r}: expected a positive number, e.g. check_tol=1e-3")
    return v


class Rpi4Target(LlvmCpuTarget):
    name = "rpi4"
    description = ("Raspberry Pi 4 (aarch64 Cortex-A72, 4 cores) via TVM, cross-compiled; measured over TVM RPC, "
                   "or estimated by a cost model with estimate=1.")
    OPTIONS = LlvmCpuTarget.OPTIONS + (
        Option("estimate", bool, False, "latency from a cost model instead of a device"),
        Option("cc", str, "auto", "cross compiler for the aarch64 library (auto: zig or clang)"),
        Option("check", bool, True, "check the device's outputs against onnxruntime"),
        Option("check_tol", float, None, "tolerance of that check", minimum=0),
    )

    def __init__(self, threads: int | None = None, estimate: Any = False, cc: str = "auto", check: Any = True,
                 check_tol: Any = None, **options: Any) -> None:
        for bad in ("mcpu", "mattr"):
            if bad in options:
                raise UsageError(f"rpi4 target: {bad} is fixed ({MCPU}, {list(MATTR)}); use the x86 target "
                                 "with mcpu/mattr (and tracker=/key=) for another CPU")
        super().__init__(threads=threads if threads is not None else CORES, mcpu=MCPU, mattr=list(MATTR), **options)
        self.options.update(estimate=estimate, cc=cc)
        self.estimate = str(estimate).strip().lower() in ("1", "true", "yes", "on")
        if str(estimate).strip().lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off", ""):
            raise UsageError(f"rpi4 estimate={estimate!r}: use estimate=1 (a cost model) or estimate=0")
        self.cc_choice = str(cc)
        self._cc: str | None | bool = False  # False: not looked up yet
        self.device_check = _flag(check, "check")
        self.check_tol = None if check_tol in (None, "") else _tolerance(check_tol)
        self.options.update(check=check, check_tol=check_tol)
        self.emulated: str | None = None  # what an emulated device said about itself (check())

    def _rpc_config(self, rpc_options: dict[str, Any]) -> rpc.RpcConfig | None:
        return rpc.RpcConfig.from_options(rpc_options, env=os.environ)

    # ------------------------------------------------------------------------ target facts
    def target_json(self) -> dict[str, Any]:
        return {"kind": "llvm", "mtriple": TRIPLE, "mcpu": MCPU, "mattr": list(MATTR), "num-cores": self.threads}

    @property
    def target(self):
        if self._target is None:
            tvm = tc.load_tvm()
            self._target = tvm.target.Target(self.target_json())
        return self._target

    @property
    def cross_compiler(self) -> str | None:
        if self._cc is False:
            self._cc = find_cross_compiler(self.cc_choice)
        return self._cc  # type: ignore[return-value]

    def check(self) -> None:
        tc.require_tvm(self.name)
        if self.rpc_config is not None:
            rpc.check_reachable(self.rpc_config)
            self.emulated = device_check.emulated(self.rpc_config)
            if self.emulated and not self.estimate:
                raise UsageError(
                    f"rpi4: the device under {self.rpc_config.where()} is an emulator ({self.emulated}); its timings "
                    f"are not a Pi's latencies: add --target-opt estimate=1 (the cost model ranks the candidates, "
                    f"the emulator runs each one and checks its outputs against onnxruntime)")
        elif not self.estimate:  # nothing to reach was named: a usage error (2), not an unreachable device (4)
            raise UsageError(
                "rpi4 needs a Raspberry Pi to measure on: give a TVM RPC tracker (--target-opt tracker=HOST:PORT "
                "--target-opt key=NAME, or $GRAPHOPT_RPC_TRACKER and $GRAPHOPT_RPC_KEY; on the Pi run `python -m "
                "tvm.exec.rpc_server --tracker HOST:PORT --key NAME`), or ask for a cost-model estimate with "
                "--target-opt estimate=1 (latencies then marked 'estimated')")
        self.cross_compiler  # noqa: B018 - a bad cc= option fails before the search

    def describe(self) -> dict[str, Any]:
        cc = self.cross_compiler
        d = {
            "name": self.name,
            "compiler": f"tvm relax {tc.tvm_version()}",
            "target": self.target_json(),
            "device": "Raspberry Pi 4 (Cortex-A72 x4, NEON)",
            "threads": self.threads,
            "mcpu": MCPU,
            "tuned": False,
            "linker": cc or "none (model.tar: the Pi links it on load)",
            "deploy": self.deploy_lines(),
        }
        if self.rpc_config is not None:
            d.update(self._rpc_describe())
            d["device"] = f"Raspberry Pi 4 over TVM RPC ({d['device']})"
            if self.emulated:
                d["device"] = f"emulated Raspberry Pi 4 over TVM RPC ({self.emulated})"
            if self.device_check:
                d["device_check"] = device_check.HOW
        if self.estimate:
            d["measured"] = "estimated by a Cortex-A72 cost model (no device timed any code)"
            if self.rpc_config is not None and self.device_check:
                d["measured"] += f"; each candidate's outputs checked on {self.rpc_config.where()}"
            d["cost_model"] = {**COST_MODEL, "efficiency": EFFICIENCY, "default_efficiency": DEFAULT_EFFICIENCY}
        elif self.rpc_config is None:
            d["measured"] = "estimated by a Cortex-A72 cost model (no device ran any code)"
            d["cost_model"] = {**COST_MODEL, "efficiency": EFFICIENCY, "default_efficiency": DEFAULT_EFFICIENCY}
        return d

    def deploy_lines(self) -> list[str]:
        lib = "model.so" if self.cross_compiler else "model.tar"
        return [f"copy {lib} and run_on_pi.py to the Pi (64-bit Raspberry Pi OS), then:",
                "  pip install apache-tvm==0.27.0.post1",
                "  TVM_NUM_THREADS=4 TVM_USE_RUNTIME_LIB=1 python3 run_on_pi.py",
                f"in code: vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module('{lib}'), tvm.cpu()); "
                + "out = vm['main'](*inputs)"]

    # ----------------------------------------------------------------------------- compile
    def compile(self, model, workdir: Path) -> Artifact:
        art = super().compile(model, workdir)
        if self.rpc_config is None or self.estimate:
            ms, detail = estimate_ms(model, self.threads)
            art.info["estimate_ms"] = ms
            art.info["estimate"] = detail
        if self.rpc_config is not None and self.device_check:
            art.info["reference_onnx"] = str(device_check.save_reference(model, Path(workdir)))
        return art

    def _lower(self, mod, workdir: Path):
        if self.rpc_config is None or self.estimate:  # no device to tune on (or ranking by the cost model)
            return tc.build(mod, self.target), {"tuned": False}
        return super()._lower(mod, workdir)

    def ms_builder(self):
        """MetaSchedule builder whose trials are linked for aarch64 (cross compiler) or tarred."""
        tc.load_tvm()
        import tvm.s_tir.meta_schedule as ms

        from .tuning import timeout_s

        return ms.builder.LocalBuilder(f_export=functools.partial(export_for_runner, self.cross_compiler),
                                       timeout_sec=timeout_s())

    # ----------------------------------------------------------------------------- running
    def _export_remote(self, artifact: Artifact, stem: Path) -> Path:
        cc = self.cross_compiler
        return export_aarch64(artifact.handle, stem.with_suffix(".so" if cc else ".tar"), cc)

    def run_once(self, artifact: Artifact, inputs):
        if self.rpc_config is None:
            raise TargetUnreachable("rpi4: running the model needs a Pi over TVM RPC (--target-opt tracker=HOST:PORT "
                                    "--target-opt key=NAME); the aarch64 code cannot run on this machine")
        return super().run_once(artifact, inputs)

    def measure(self, artifact: Artifact, inputs) -> Measurement:
        if self.rpc_config is not None and not self.estimate:
            m = self._measure_rpc(artifact, inputs)
            m.extra["deploy"] = self.deploy_lines()
            if "device_check" in artifact.info:
                m.extra["device_check"] = artifact.info["device_check"]
            return m
        if "estimate_ms" not in artifact.info:
            raise TargetUnreachable("rpi4: no cost-model estimate for this artifact and no RPC device to measure on")
        args = self._ordered_inputs(artifact, inputs)  # the same input checks as a real measurement
        device = "Raspberry Pi 4 (Cortex-A72 x4) cost model: no device ran this"
        extra = {"cost_model": "roofline per ONNX node, see graphopt.targets.rpi4.COST_MODEL",
                 **artifact.info.get("estimate", {})}
        if self.rpc_config is not None and self.device_check:
            if "device_check" not in artifact.info:  # once per artifact (confirm() measures again)
                outs = rpc.run_remote(self.rpc_config, self._remote_lib(artifact), args)
                artifact.info["device_check"] = device_check.compare(artifact, inputs, outs, self.check_tol,
                                                                     self.rpc_config.where(), self.emulated)
            extra["device_check"] = artifact.info["device_check"]
            device = (f"Raspberry Pi 4 (Cortex-A72 x4) cost model: no device timed this; its outputs were checked "
                      f"on {self.rpc_config.where()}" + (" (an emulator)" if self.emulated else ""))
        return Measurement(
            latency=LatencyStats.from_samples([artifact.info["estimate_ms"]], runs_per_repeat=1),
            method="estimated",
            tuned=None,
            threads=self.threads,
            device=device,
            extra=extra,
        )

    def _measure_rpc(self, artifact: Artifact, inputs, outputs: list | None = None) -> Measurement:
        """Time on the Pi; with the device check on, the same session's first run is compared
        with onnxruntime (via rpc.measure_remote's `outputs`)."""
        if not self.device_check or "device_check" in artifact.info:
            return super()._measure_rpc(artifact, inputs)
        outs: list = []
        m = super()._measure_rpc(artifact, inputs, outputs=outs)
        artifact.info["device_check"] = device_check.compare(artifact, inputs, outs, self.check_tol,
                                                             self.rpc_config.where(), self.emulated)
        return m

    def load_portable(self, artifact: Artifact) -> Artifact:
        """--compile-workers: the aarch64 library cannot load here; measure() uploads it (RPC) or
        reads the estimate, export() copies it."""
        return artifact

    def export(self, artifact: Artifact, out_dir: Path) -> list[Path]:
        out_dir = Path(out_dir)
        cc = self.cross_compiler
        name = "model.so" if cc else "model.tar"
        portable = artifact.info.get("library")
        if artifact.handle is None and portable and Path(portable).suffix == Path(name).suffix:  # compiled in a worker
            from .llvm_cpu import _copy_file

            lib = _copy_file(Path(portable), out_dir / name)
        else:
            lib = export_aarch64(artifact.handle, out_dir / name, cc)
        inputs = {n: (list(s), d) for n, s, d in artifact.info.get("inputs", [])}
        note = ("\nmodel.tar holds object files: the Pi links them when it loads the file, so it needs gcc\n"
                "(sudo apt install gcc). Install gcc-aarch64-linux-gnu or `pip install ziglang` here to get a .so.\n"
                if lib.suffix == ".tar" else "")
        script = out_dir / "run_on_pi.py"
        script.write_text(RUN_ON_PI.format(lib=lib.name, inputs=inputs, tar_note=note), encoding="utf-8")
        return [lib, script]
