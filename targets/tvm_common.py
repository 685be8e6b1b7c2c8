"""Helpers shared by the TVM targets (x86, rpi4, cuda; tuning in targets/tuning.py).

Importing this module does not import tvm: every function imports it lazily, because
`import tvm` costs seconds (and `graphopt --help` must stay fast). tvm is loaded by
targets/tvm_load.py (`load_tvm(threads)`, re-exported here), which every helper here calls
first: the runtime's thread pool is sized from TVM_NUM_THREADS when it is first created, and
can later be shrunk but never grown (measured on TVM 0.27).

The compile flow a TVM target follows:

    mod = import_onnx(model, input_shapes)   # ONNX -> Relax IRModule (raw); folds constants
    ex = build(mod, target)                  # untuned: tvm.compile with the default pipeline
    ex = tuning.tune_and_build(mod, target, db_dir=...)  # tuned: MetaSchedule on the fused module,
                                             # then compile_relax(db, raw) (targets/tuning.py)
    outs = run_vm(ex, dev, inputs); ms = time_vm(ex, dev, inputs, number, repeat, warmup)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from graphopt.errors import CompileError, UsageError

# loading tvm lives in the leaf module tvm_load (x86_int8 needs it without this module); re-exported here
from .tvm_load import THREADS_ENV, load_tvm, require_tvm, set_num_threads, tvm_available, tvm_version  # noqa: F401

if TYPE_CHECKING:
    import numpy as np
    import onnx

# ----------------------------------------------------------------------------------- the host
from .host import cpu_flags as _cpu_flags  # noqa: E402
from .host import cpu_model_name, cpu_summary  # noqa: E402,F401 (re-exported: tc.cpu_model_name, tc.cpu_summary)


def fallback_mcpu() -> str:
    """A safe LLVM cpu name for this machine when LLVM's own detection is unavailable."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        if {"avx2", "fma", "bmi2", "movbe"} <= _cpu_flags():
            return "x86-64-v3"
        return "x86-64"
    return "generic"


@functools.lru_cache(maxsize=1)
def host_mcpu() -> str:
    """LLVM's name for the host CPU (what clang's -march=native picks), e.g. "znver3".

    TVM 0.27 has no `llc`-style probe of its own beyond LLVM's sys::getHostCPUName, exposed
    as tvm.target.codegen.llvm_get_system_cpu() (also used by tvm.target.detect_target).
    Falls back to fallback_mcpu() when tvm or LLVM cannot answer or LLVM says "generic".
    """
    try:
        load_tvm()
        from tvm.target import codegen

        name = str(codegen.llvm_get_system_cpu())
        if name and name != "generic":
            return name
    except Exception:  # noqa: BLE001 - detection is best effort
        pass
    return fallback_mcpu()


@functools.lru_cache(maxsize=8)
def host_mattr(mcpu: str) -> tuple[str, ...]:
    """"-feature" entries for features `mcpu` implies but this host lacks, e.g. ("-avx512f",).

    LLVM names the CPU from its family/model, but a hypervisor may mask features (AVX-512 on
    a Zen 4 VM): code built for the bare name would then die of SIGILL. clang's -march=native
    adds the same corrections. Empty when the host cannot be probed.
    """
    try:
        tvm = load_tvm()
        from tvm.target import codegen

        host = dict(tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")())
        implied = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    except Exception:  # noqa: BLE001 - best effort
        return ()
    return tuple(sorted(f"-{f}" for f in implied if f in host and not bool(host[f])))


def target_dict(mcpu: str, num_cores: int, **extra: Any) -> dict[str, Any]:
    """The JSON dict form of an llvm target (the only form TVM 0.27 accepts)."""
    d: dict[str, Any] = {"kind": "llvm", "mcpu": mcpu, "num-cores": int(num_cores)}
    for k, v in extra.items():
        if v is None or (isinstance(v, (list, tuple)) and not v):
            continue
        d[k] = list(v) if isinstance(v, tuple) else v
    return d


def llvm_target(mcpu: str, num_cores: int, **extra: Any):
    """tvm.target.Target({"kind": "llvm", "mcpu": ..., "num-cores": ...} + extra keys)."""
    tvm = load_tvm(num_cores)
    try:
        return tvm.target.Target(target_dict(mcpu, num_cores, **extra))
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"invalid TVM llvm target {target_dict(mcpu, num_cores, **extra)}: {_first_line(e)}") from None


# ---------------------------------------------------------------------------- ONNX -> Relax
def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    # TVM errors carry a C++ traceback; the message is the last non-empty line after it.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(e).__name__
    for ln in lines:  # prefer a "XxxError: message" line when there is one
        if "Error:" in ln and not ln.startswith("File "):
            msg = ln
            break
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _op_label(node: "onnx.NodeProto") -> str:
    dom = f"{node.domain}." if node.domain and node.domain != "ai.onnx" else ""
    return f"{dom}{node.op_type}"


def unsupported_ops(model: "onnx.ModelProto") -> list[str]:
    """Ops of the top graph that TVM's Relax ONNX importer has no converter for (sorted)."""
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map  # private, 0.27
    except Exception:  # noqa: BLE001 - best effort: the importer itself will still complain
        return []
    known = set(_get_convert_map()) | {"Constant", "If"}
    return sorted({_op_label(n) for n in model.graph.node if n.op_type not in known})


def _failing_node(tb) -> Any:
    """The ONNX node the importer was converting when it raised (from its frame locals)."""
    node = None
    for frame, _ in traceback.walk_tb(tb):
        if frame.f_code.co_name == "_construct_nodes" and "node" in frame.f_locals:
            node = frame.f_locals["node"]  # innermost wins (subgraphs of If)
    return node


def input_specs(model: "onnx.ModelProto") -> list[tuple[str, list[int | str | None], str]]:
    """(name, shape, numpy dtype name) of the graph inputs that are not initializers."""
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "float32"
        out.append((vi.name, shape, dtype))
    return out


from graphopt.modelio.ir import fold_constants, normalize_constants  # noqa: E402,F401  (re-exported)


def mask_index_to_bias(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """com.microsoft.Attention with a 2-D mask_index [B, T] and no attention_bias, rewritten to
    the equivalent additive attention_bias (1 - mask) * mask_filter_value as [B, 1, 1, T].

    TVM 0.27's importer passes a 2-D mask_index to R.nn.attention as a 2-D bias and fails
    ("The bias should have 4 dimensions"). passes/attention.py emits mask_index for padding
    masks (onnxruntime's QAttention keeps it). Returns `model` itself when nothing matches,
    else a copy.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def is_target(n) -> bool:
        ins = list(n.input)
        return (n.op_type == "Attention" and n.domain == "com.microsoft" and len(ins) >= 4 and bool(ins[3])
                and not (len(ins) > 5 and ins[5]))

    if not any(is_target(n) for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 13)
    made: dict[str, str] = {}
    nodes = []
    for n in out.graph.node:
        if is_target(n):
            mask = n.input[3]
            fill = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "mask_filter_value"), -10000.0)
            key = f"{mask}|{fill}"
            if key not in made:
                base = f"{mask}_as_bias_{len(made)}"
                consts = [numpy_helper.from_array(np.array(1.0, np.float32), base + "_one"),
                          numpy_helper.from_array(np.array(fill, np.float32), base + "_fill")]
                out.graph.initializer.extend(consts)
                nodes.append(helper.make_node("Cast", [mask], [base + "_f"], to=TensorProto.FLOAT, name=base + "/cast"))
                nodes.append(helper.make_node("Sub", [base + "_one", base + "_f"], [base + "_inv"], name=base + "/sub"))
                nodes.append(helper.make_node("Mul", [base + "_inv", base + "_fill"], [base + "_2d"], name=base + "/mul"))
                if opset >= 13:
                    out.graph.initializer.append(numpy_helper.from_array(np.array([1, 2], np.int64), base + "_axes"))
                    nodes.append(helper.make_node("Unsqueeze", [base + "_2d", base + "_axes"], [base], name=base + "/unsq"))
                else:
                    nodes.append(helper.make_node("Unsqueeze", [base + "_2d"], [base], axes=[1, 2], name=base + "/unsq"))
                made[key] = base
            ins = list(n.input)[:3] + ["", "", made[key]]
            del n.input[:]
            n.input.extend(ins)
        nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def import_onnx(
    model: "onnx.ModelProto",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_dtypes: Mapping[str, str] | None = None,
    fold: bool = True,
    lower_int8: bool = True,
    int8_kernels: str = "generic",
    int8_nhwc: bool = False,
):
    """ONNX ModelProto -> Relax IRModule via tvm.relax.frontend.onnx.from_onnx.

    `input_shapes` defaults to the model's declared (static) input shapes; a symbolic or
    unknown dimension without an entry in input_shapes is a CompileError (TVM targets need
    static shapes: a batch-1 export bakes its Reshape shapes). Input dtypes come from the model.
    `fold`: fold constant subgraphs first (fold_constants; ~0.3 s on EfficientNet-Lite0).
    `lower_int8`: rewrite QDQ (dequantize -> conv2d/matmul) into integer conv2d/matmul with int32
    accumulation (targets/qdq_lower.py); a model without DequantizeLinear is left as it is.
    `int8_kernels`: "avx2" lowers matmuls and 1x1 convs to the packed kernel MetaSchedule
    tensorizes with vpmaddwd (targets/x86_int8.py; x86 with AVX2), "vnni" likewise with the uint8
    ones on vpdpbusd (AVX-512 VNNI), "generic" to Relax's ops. `int8_nhwc`: lowered for a conversion
    to NHWC next (qdq_lower's `nhwc`; targets/int8_nhwc.py).
    Raises CompileError naming the unsupported op(s), or the node whose conversion failed.
    """
    load_tvm()
    from tvm.relax.frontend.onnx import from_onnx

    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    given = dict(input_shapes or {})
    for name, shape, dtype in input_specs(model):
        s = given.pop(name, shape)
        if any(not isinstance(d, int) or d < 0 for d in s):
            raise CompileError(
                f"TVM needs a static shape for input {name!r}, got {list(s)}; "
                "pass input_shapes={name: [...]} or export the model with fixed shapes"
            )
        shapes[name] = [int(d) for d in s]
        dtypes[name] = (input_dtypes or {}).get(name, dtype)
    if given:
        raise CompileError(f"input_shapes names unknown inputs {sorted(given)}; model inputs: {sorted(shapes)}")

    model = mask_index_to_bias(model)
    model = fold_constants(model) if fold else normalize_constants(model)
    missing = unsupported_ops(model)
    if missing:
        raise CompileError(
            f"TVM {tvm_version()} ONNX importer does not support op(s): {', '.join(missing)}"
        )
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # from_onnx warns on every onnx.checker complaint
            mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes)
    except Exception as e:  # noqa: BLE001 - every importer failure becomes a CompileError
        ver = tvm_version()
        if type(e).__name__ == "OpNotImplemented":
            raise CompileError(f"TVM {ver} ONNX importer: {_first_line(e)}") from e
        node = _failing_node(e.__traceback__)
        if node is not None:
            raise CompileError(
                f"TVM {ver} ONNX importer failed on op {_op_label(node)} (node {node.name!r}): "
                f"{type(e).__name__}: {_first_line(e)}"
            ) from e
        raise CompileError(f"TVM {ver} ONNX import failed: {type(e).__name__}: {_first_line(e)}") from e
    lowered_ops = ("DequantizeLinear", "MatMulInteger") if int8_kernels in ("avx2", "vnni") else ("DequantizeLinear",)
    if lower_int8 and any(n.op_type in lowered_ops for n in model.graph.node):
        from .qdq_lower import lower_qdq

        try:
            mod, stats = lower_qdq(mod, kernels=int8_kernels, nhwc=int8_nhwc)
        except Exception as e:  # noqa: BLE001
            raise CompileError(f"QDQ -> integer lowering failed: {type(e).__name__}: {_first_line(e)}; "
                               "import with lower_int8=False to run the QDQ model as fake quantization") from e
        import logging

        logging.getLogger("graphopt.tvm").info("QDQ -> integer lowering: %s", stats)
    return mod


# ------------------------------------------------------------------------------------- build
def build(mod, target, pipeline: Any = None, exec_mode: str = "bytecode"):
    """tvm.compile(mod, target) -> Executable; `pipeline` is a relax_pipeline (default: the
    target's default pipeline, i.e. untuned code on CPU); `exec_mode` the Relax VM's form
    ("bytecode", or "compiled": main compiled to native code, tuning_ms.build_with_db)."""
    tvm = load_tvm()
    try:
        kwargs = {} if pipeline is None else {"relax_pipeline": pipeline}
        if exec_mode != "bytecode":
            return relax_build(mod, target, exec_mode, **kwargs)
        return tvm.compile(mod, target=target, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"TVM {tvm_version()} build for {target} failed: {type(e).__name__}: {_first_line(e)}") from e


def relax_build(mod, target, exec_mode: str = "bytecode", **kwargs):
    """relax.build(mod, target, exec_mode=...): a module the compiled form cannot take (the VM's
    TIR codegen covers less of Relax than its bytecode does) is built as bytecode instead, with a
    warning, and so computes the same; kwargs as relax.build's (relax_pipeline)."""
    load_tvm()
    from tvm import relax

    if exec_mode == "bytecode":
        return relax.build(mod, target=target, **kwargs)
    try:
        return relax.build(mod, target=target, exec_mode=exec_mode, **kwargs)
    except Exception as e:  # noqa: BLE001 - the bytecode build below raises what is really wrong
        import logging

        logging.getLogger("graphopt.tvm").warning("vm_exec=%s: the build failed (%s: %s); building bytecode instead",
                                                  exec_mode, type(e).__name__, _first_line(e))
        return relax.build(mod, target=target, **kwargs)


@contextlib.contextmanager
def _stderr_without(marker: str):
    """Run the body with file descriptor 2 (where TVM's C++ logging writes) sent to a temporary file;
    then write its lines back to stderr, except those containing `marker`."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            kept = [ln for ln in buf.read().decode(errors="replace").splitlines(keepends=True) if marker not in ln]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def export_library(executable, path: Path) -> Path:
    """Write the executable as a shared library at `path`, atomically (temp name + os.replace).

    Linking a .so needs a C compiler (g++/gcc/clang, or $CXX/$CC); a path ending in .tar
    needs none.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-1:]) or ".so"
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{suffix}")
    if suffix != ".tar":
        from tvm.support.cc import get_cc

        if get_cc() is None:
            raise UsageError(
                f"exporting {path.name} needs a C compiler to link it: install g++ (or set CXX)"
            )
    try:
        with _stderr_without("Scope Saving:"):  # TVM 0.27 logs one per constant of an executable that has run
            executable.export_library(str(tmp))
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001
        raise CompileError(f"TVM export_library({path.name}) failed: {type(e).__name__}: {_first_line(e)}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------------------- run
def ordered_inputs(specs, inputs: Mapping[str, Any], target_name: str) -> list:
    """One sample's inputs as arrays in the model's input order, checked against `specs`
    ((name, shape, dtype) from input_specs); DataError naming the mismatch otherwise."""
    import numpy as np

    from graphopt.errors import DataError

    names = [n for n, _, _ in specs]
    if set(inputs) != set(names):
        raise DataError(f"{target_name} target: inputs {sorted(inputs)} do not match the model's {sorted(names)}")
    out = []
    for name, shape, dtype in specs:
        x = np.asarray(inputs[name])
        if list(x.shape) != list(shape):
            raise DataError(f"{target_name} target: input {name!r} has shape {list(x.shape)}, the model declares {shape}")
        out.append(x.astype(dtype, copy=False))
    return out


def make_vm(executable_or_vm, dev):
    """A relax.VirtualMachine on dev, from an Executable, a runtime Module or a VM."""
    load_tvm()
    from tvm import relax

    if isinstance(executable_or_vm, relax.VirtualMachine):
        return executable_or_vm
    return relax.VirtualMachine(executable_or_vm, dev)


def to_device(inputs: Sequence["np.ndarray"], dev) -> list:
    tvm = load_tvm()
    import numpy as np

    return [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs]


def _to_numpy(value) -> list["np.ndarray"]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__"):
        out: list = []
        for v in value:
            out.extend(_to_numpy(v))
        return out
    raise TypeError(f"unexpected VM output {type(value).__name__}")


def run_vm(executable_or_vm, dev, inputs: Sequence["np.ndarray"]) -> list["np.ndarray"]:
    """Run main once on dev; outputs flattened to a list of numpy arrays (graph output order)."""
    vm = make_vm(executable_or_vm, dev)
    return _to_numpy(vm["main"](*to_device(inputs, dev)))


def time_vm(
    executable_or_vm,
    dev,
    inputs: Sequence["np.ndarray"],
    number: int | None = None,
    repeat: int = 5,
    warmup: int = 1,
    min_repeat_ms: float = 20.0,
) -> tuple[list[float], int]:
    """Time main on dev with vm.time_evaluator: (per-repeat mean milliseconds, number).

    `warmup` untimed runs first (at least one, also used to pick `number` when it is None so
    that one repeat lasts about min_repeat_ms; capped at 100). Each returned sample is the
    mean of `number` back-to-back runs. Inputs are copied to the device once, outside timing.
    """
    vm = make_vm(executable_or_vm, dev)
    args = to_device(inputs, dev)
    main = vm["main"]
    t = math.inf
    for _ in range(max(1, int(warmup))):
        t0 = time.perf_counter()
        main(*args)
        dev.sync()
        t = min(t, time.perf_counter() - t0)
    if number is None:
        number = max(1, min(100, math.ceil(min_repeat_ms / 1000.0 / max(t, 1e-9))))
    # time_evaluator adds one more discarded warm-up call of its own.
    res = vm.time_evaluator("main", dev, number=int(number), repeat=int(repeat))(*args)
    return [float(r) * 1000.0 for r in res.results], int(number)
