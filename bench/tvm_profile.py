"""Where tuned TVM loses to onnxruntime: time per kernel kind, both sides measured now, in one run.

TVM side: each of the model's kernels as the x86 target builds it with the tuning database
(canonicalize / layout as its options), built alone and timed with random inputs of its shapes,
hot and with the CPU cache flushed before each call, x how often the model calls it, summed per
kind (depthwise conv, 1x1 conv, other conv, matmul/dense, other); and each kernel timed inside the
built model (the VM's instrument hook), the like of ORT's numbers. ORT side: onnxruntime's per-node
profile (ORT_ENABLE_ALL, same threads), averaged over runs, summed per kind of the node (a fused
node counts as its first op). Then both whole models, and what lies outside their kernels.

    .venv/bin/python bench/tvm_profile.py --tuning-db DB_ROOT [--model models/efficientnet_lite0.onnx]

The whole TVM model compiles with the target's `trials` (GRAPHOPT_TUNE_TRIALS): a workload the
database lacks is tuned first. Run it on a quiet machine: TVM's thread pool is fragile under load.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = re.compile(r"T\.Buffer\(\((.*?)\),\s*\"")


from graphopt.targets.host import cpu_summary as cpu_model  # noqa: E402 (name, SIMD flags)


def ort_kinds(model_path: Path, feed, threads: int, runs: int) -> dict[str, float]:
    import onnx
    import onnxruntime as ort

    from graphopt.targets.ort import OrtTarget

    m = onnx.load(str(model_path))
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_tensor: dict[str, str] = {}  # ORT names a fused node after its output: Conv(+BN)(+Clip) -> the conv's kind
    for n in m.graph.node:
        if n.op_type == "Conv":
            g = next((a.i for a in n.attribute if a.name == "group"), 1)
            k = next((list(a.ints) for a in n.attribute if a.name == "kernel_shape"), [1, 1])
            kind = (f"conv depthwise {k[0]}x{k[1]}" if g > 1 else
                    "conv 1x1" if k == [1, 1] else f"conv {k[0]}x{k[1]}")
            t = n.output[0]
            while True:
                by_tensor[t] = kind
                nxt = consumers.get(t, [])
                if len(nxt) != 1 or nxt[0].op_type not in ("BatchNormalization", "Clip", "Relu", "Sigmoid", "Add"):
                    break
                t = nxt[0].output[0]
    so = OrtTarget(threads=threads)._options()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):  # the profile holds every run; all are averaged (the first is a warm-up)
        sess.run(None, feed)
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    out: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "")
        tensor = node[: -len("_nchwc")] if node.endswith("_nchwc") else node
        k = by_tensor.get(tensor) if op in ("Conv", "FusedConv") else None
        if k is None:
            k = "matmul" if op in ("MatMul", "Gemm", "FusedMatMul") else (
                "conv ?" if op in ("Conv", "FusedConv") else "other")
        out[k] = out.get(k, 0.0) + float(e["dur"]) / 1000.0
    return {k: v / runs for k, v in out.items()}


def tvm_kernels(tgt, mod, db, runs: int, layout: str) -> tuple[dict[str, tuple[float, float]], int, int]:
    """Each PrimFunc the model calls as compiled with the database (with the target's prepack option:
    on pre-packed weights), built alone and timed now with random inputs of its shapes:
    kind -> (hot ms, cache-flushed ms) x calls; (.., workloads, unscheduled)."""
    import collections

    import tvm
    from tvm import relax

    from graphopt.targets import tuning

    _, fused = tuning.prepare(mod, tgt.target, prepack=tgt.prepack)
    with tgt.target, db:
        sched = relax.transform.MetaScheduleApplyDatabase()(fused)
        if tgt.prepack:  # as tuning_ms.build_with_db: the weight transforms fold away at build time
            sched = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                              relax.transform.FoldConstant()])(sched)
    calls = collections.Counter(re.findall(r"call_tir\((?:\w+\.)?(\w+)", sched["main"].script()))  # "cls." or none
    dev = tvm.cpu()
    out: dict[str, tuple[float, float]] = {}
    n = unscheduled = 0
    for gv, f in sched.functions.items():
        if not isinstance(f, tvm.tirx.PrimFunc) or (tgt.prepack and gv.name_hint not in calls):
            continue  # (a weight transform folded at build time is not called)
        n += 1
        unscheduled += not (f.attrs is not None and any("is_scheduled" in str(k) for k in f.attrs.keys()))
        head = next(ln for ln in f.script().splitlines() if "def main(" in ln)
        hot, cold = (t * 1000 for t in time_kernel(f, tgt.target, dev, runs))
        orig = gv.name_hint.removesuffix("_prepacked")  # classified by its weight's logical (unpacked) shape
        k = kind_of(orig, head if orig == gv.name_hint else
                    next(ln for ln in fused[orig].script().splitlines() if "def main(" in ln), layout)
        c = calls.get(gv.name_hint, 1)
        a, b = out.get(k, (0.0, 0.0))
        out[k] = (a + hot * c, b + cold * c)
    return out, n, unscheduled


def in_model_kinds(tgt, db_root: Path, model, mod, layout: str) -> dict[str, float]:
    """kind -> ms per model run of its kernels *inside the built model* (database records and in-model
    picks, as the target builds it), by the Relax VM's instrument hook (targets/in_model.py: median
    of 200 instrumented runs per kernel); the VM's own builtins (allocations, shape checks) as a kind."""
    from graphopt.targets import in_model, tuning
    from graphopt.targets.x86 import X86Target

    bc = X86Target(threads=tgt.threads, tuning_db=str(db_root), trials=tgt.trials,
                   canonicalize=tgt.canonicalize, layout=tgt.layout,
                   prepack=tgt.prepack, vm_exec="bytecode")  # the instrument hook sees bytecode's calls only
    art = bc.compile(model, Path(tempfile.mkdtemp()))
    prepared, fused = tuning.prepare(mod, tgt.target, prepack=tgt.prepack)
    heads = {gv.name_hint: next(ln for ln in f.script().splitlines() if "def main(" in ln)
             for gv, f in fused.functions.items() if "def main(" in f.script()}
    out: dict[str, float] = {}
    for name, s in in_model.kernel_times([art.handle], in_model._inputs(prepared), runs=200)[0].items():
        base = name.removesuffix("_prepacked")
        k = "VM builtins" if name.startswith("vm.builtin") else kind_of(base, heads.get(base, ""), layout)
        out[k] = out.get(k, 0.0) + s * 1e3
    return out


def time_kernel(func, target, dev, runs: int) -> tuple[float, float]:
    """(hot s, cache-flushed s) of one PrimFunc built alone, on random inputs of its buffers' shapes:
    hot = best of 5 x 20 back-to-back calls; flushed = median of `runs` calls, each after the CPU
    cache is flushed (all but the first argument). One untimed warm-up first (the first timing in a
    process paid for the thread pool's start and the inputs' pages)."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()
    head = next(ln for ln in func.script().splitlines() if "def main(" in ln)
    args = [tvm.runtime.tensor(np.asarray(np.random.rand(*[int(d) for d in re.findall(r"\d+", shp.replace("T.int64(", ""))]))
                               .astype(dt), dev) for shp, dt in re.findall(r'T\.Buffer\(\((.*?)\),\s*"(\w+)"', head)]
    lib.time_evaluator("main", dev, number=5, repeat=1)(*args)
    hot = min(lib.time_evaluator("main", dev, number=20, repeat=5)(*args).results)
    cold = float(np.median(lib.time_evaluator("main", dev, number=1, repeat=runs,
                                              f_preproc="cache_flush_cpu_non_first_arg")(*args).results))
    return hot, cold


def kind_of(name: str, head: str, layout: str) -> str:
    shapes = [[int(d) for d in re.findall(r"\d+", s.replace("T.int64(", ""))] for s in SHAPE.findall(head)]
    if "conv2d" in name and len(shapes) >= 2 and len(shapes[1]) == 4:
        kh, kw, i, o = shapes[1] if layout == "nhwc" else (shapes[1][2], shapes[1][3], shapes[1][1], shapes[1][0])
        if i == 1 and o > 1:
            return f"conv depthwise {kh}x{kw}"
        return "conv 1x1" if (kh, kw) == (1, 1) else f"conv {kh}x{kw}"
    if "matmul" in name or "dense" in name:
        return "matmul"
    return "other"


def e2e_ms(fn, rounds: int = 30) -> float:
    import time

    for _ in range(3):
        fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "efficientnet_lite0.onnx")
    ap.add_argument("--calib", type=Path, default=ROOT / "models" / "efficientnet_lite0_calib.npz")
    ap.add_argument("--tuning-db", type=Path, required=True, help="tuning database root (as --tuning-db)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--canonicalize", type=int, default=1, help="as the x86 target option (1: BN and Pads folded)")
    ap.add_argument("--layout", default="auto", choices=("auto", "nchw", "nhwc"), help="as the x86 target option")
    ap.add_argument("--prepack", type=int, default=0, help="as the x86 target option (1: weights pre-packed)")
    args = ap.parse_args()
    import onnxruntime as ort

    from graphopt.modelio.ir import load_model
    from graphopt.targets import tuning
    from graphopt.targets import tvm_common as tc
    from graphopt.targets.ort import OrtTarget
    from graphopt.targets.x86 import X86Target

    loaded = load_model(args.model)
    x = np.load(args.calib)
    feed = {loaded.inputs[0].name: x[x.files[0]][0]}
    ort_ms = ort_kinds(args.model, feed, args.threads, args.runs)
    tgt = X86Target(threads=args.threads, tuning_db=str(args.tuning_db), canonicalize=args.canonicalize,
                    layout=args.layout, prepack=args.prepack)
    tc.load_tvm(args.threads)
    art = tgt.compile(loaded.proto, Path(tempfile.mkdtemp()))  # the model as the target builds it (trials: env)
    mod = tgt.relax_module(loaded.proto)
    db = tuning.open_db(tgt.tuning_db_dir)
    tvm_ms, n, unscheduled = tvm_kernels(tgt, mod, db, args.runs, tgt.layout_for(loaded.proto))
    inm = in_model_kinds(tgt, args.tuning_db, loaded.proto, mod, tgt.layout_for(loaded.proto))
    sess = ort.InferenceSession(str(args.model), OrtTarget(threads=args.threads)._options(),
                                providers=["CPUExecutionProvider"])
    ort_model = e2e_ms(lambda: sess.run(None, feed))
    tvm_model = float(tgt.measure(art, feed).latency.median_ms)
    print(f"{args.model.name}: {cpu_model()}, {args.threads} threads; TVM: each of the model's {n} kernels "
          f"({unscheduled} without a database schedule) built alone and timed now, hot caches and with the CPU "
          f"cache flushed before each call, and inside the built model (the VM's instrument hook, 200 runs, "
          f"medians); ORT: its profiler (inside its model), mean of {args.runs} runs")
    print("\n| kind | TVM ms (hot) | TVM ms (flushed) | TVM ms (in model) | ORT ms (in model) | TVM/ORT (flushed) "
          "| TVM/ORT (in model) |\n|---|---|---|---|---|---|---|")
    kinds = sorted(set(tvm_ms) | set(ort_ms) | set(inm), key=lambda k: -inm.get(k, 0.0))
    for k in kinds:
        (a, c), b, m = tvm_ms.get(k, (0.0, 0.0)), ort_ms.get(k, 0.0), inm.get(k, 0.0)
        print(f"| {k} | {a:.2f} | {c:.2f} | {m:.2f} | {b:.2f} | {'x%.2f' % (c / b) if b else '-'} "
              f"| {'x%.2f' % (m / b) if b else '-'} |")
    ta, tc_ = sum(v[0] for v in tvm_ms.values()), sum(v[1] for v in tvm_ms.values())
    tb_, tm_ = sum(ort_ms.values()), sum(inm.values())
    print(f"| **kernels** | {ta:.2f} | {tc_:.2f} | {tm_:.2f} | {tb_:.2f} | x{tc_ / tb_:.2f} | x{tm_ / tb_:.2f} |")
    print(f"| **whole model** | {tvm_model:.2f} | | | {ort_model:.2f} | | x{tvm_model / ort_model:.2f} |")
    print(f"\nOutside the kernels: TVM {tvm_model - tc_:.2f} ms (model - flushed kernels), "
          f"ORT {ort_model - tb_:.2f} ms (model - profiled kernels)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
