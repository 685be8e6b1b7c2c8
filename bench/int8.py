"""int8 on TVM x86 and onnxruntime: fp32 vs fake-quant QDQ vs QDQ lowered to integer kernels.

    .venv/bin/python bench/int8.py [--models small,pointwise,example] [--tune-trials 0] [--threads 2]

Models: `small` (3x3 convs), `pointwise` (1x1 convs, the bulk of a MobileNet/EfficientNet),
`example` (EfficientNet-Lite0, models/). For each model: the fp32 ONNX model and its QDQ form (passes/int8.quantize: static, per-channel
int8 weights, uint8 MinMax activations, whole model, calibrated on the model's calibration
samples) are

- run on onnxruntime (targets/ort.py settings: ORT_ENABLE_ALL, --threads intra-op threads),
  where the QDQ model executes as QLinear* integer kernels;
- compiled for this CPU with TVM Relax (targets/tvm_common: host mcpu, --threads cores)
  three or four ways: fp32; QDQ as imported (fake quantization in float32, lower_int8=False); QDQ
  lowered to Relax's integer conv2d/matmul (targets/qdq_lower.py, kernels="generic"); and, on
  a CPU with AVX2, QDQ lowered with kernels="avx2": matmuls and 1x1 convs on the packed int16
  weight kernel MetaSchedule tensorizes with vpmaddwd (targets/x86_int8.py); and "avx2 dw-fp32": the
  same, but the depthwise convs left in fp32 (the per-layer choice the int8 pass offers the search:
  int8 only on the nodes it names, the depthwise convs' own generic integer code avoided). Untuned (default pipeline), and,
  with --tune-trials N > 0, tuned with MetaSchedule (targets/tuning.tune_and_build, N trials
  per task, a database under --db).

Every latency is measured on this machine in-process (median of --repeat repeats); the table
prints ratios against fp32 on the same runtime, measured in the same run. Untuned TVM CPU code
is 40-110x slower than tuned code: read its rows only as ratios between themselves.
Accuracy columns: max |out - fp32| over the first sample, and for TVM int8 the max difference
from onnxruntime's reference QDQ semantics (graph optimizations off) in output quantization steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def small_net(size: int = 56, channels: int = 64, seed: int = 0) -> onnx.ModelProto:
    """x[1,16,size,size] -> 3 x (Conv 3x3 -> Relu) at `channels` -> GAP -> Flatten -> Gemm -> y[1,100]."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    nodes, inits, cin, cur = [], [], 16, "x"
    for i in range(3):
        inits += [onnx.numpy_helper.from_array((rng.standard_normal((channels, cin, 3, 3)) * (2 / (9 * cin)) ** 0.5)
                                               .astype(f32), f"w{i}"),
                  onnx.numpy_helper.from_array((rng.standard_normal(channels) * 0.1).astype(f32), f"b{i}")]
        nodes += [helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        cin, cur = channels, f"r{i}"
    inits += [onnx.numpy_helper.from_array((rng.standard_normal((100, channels)) * 0.1).astype(f32), "wg"),
              onnx.numpy_helper.from_array(np.zeros(100, f32), "bg")]
    nodes += [helper.make_node("GlobalAveragePool", [cur], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, size, size])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 100])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def pointwise_net(size: int = 28, channels: int = 128, seed: int = 0) -> onnx.ModelProto:
    """x[1,channels,size,size] -> 3 x (Conv 1x1 channels->4*channels -> Relu -> Conv 1x1 back -> Relu)
    -> GAP -> Flatten -> Gemm -> y[1,100]: the pointwise convs that carry most of a MobileNet's or
    EfficientNet's multiply-adds (a 1x1 conv is a matmul over channels)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    nodes, inits, cur = [], [], "x"
    for i in range(3):
        for j, (cin, cout) in enumerate(((channels, 4 * channels), (4 * channels, channels))):
            n = f"{i}_{j}"
            inits += [onnx.numpy_helper.from_array((rng.standard_normal((cout, cin, 1, 1)) * (2 / cin) ** 0.5)
                                                   .astype(f32), f"w{n}"),
                      onnx.numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(f32), f"b{n}")]
            nodes += [helper.make_node("Conv", [cur, f"w{n}", f"b{n}"], [f"c{n}"], name=f"pw{n}"),
                      helper.make_node("Relu", [f"c{n}"], [f"r{n}"], name=f"relu{n}")]
            cur = f"r{n}"
    inits += [onnx.numpy_helper.from_array((rng.standard_normal((100, channels)) * 0.1).astype(f32), "wg"),
              onnx.numpy_helper.from_array(np.zeros(100, f32), "bg")]
    nodes += [helper.make_node("GlobalAveragePool", [cur], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "pointwise",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, channels, size, size])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 100])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def load(name: str) -> tuple[str, onnx.ModelProto, dict[str, np.ndarray]]:
    """(label, fp32 model after graphopt's load (folded, shapes inferred), calibration arrays)."""
    from graphopt.modelio.ir import load_proto

    if name == "small":
        m = small_net()
        calib = {"x": np.abs(np.random.default_rng(1).standard_normal((8, 1, 16, 56, 56))).astype(np.float32)}
        return "small conv net 16->64x3 @56x56", load_proto(m).proto, calib
    if name == "pointwise":
        m = pointwise_net()
        calib = {"x": np.abs(np.random.default_rng(1).standard_normal((8, 1, 128, 28, 28))).astype(np.float32)}
        return "pointwise net 128<->512 1x1 x3 @28x28", load_proto(m).proto, calib
    if name == "example":
        path = ROOT / "models" / "efficientnet_lite0.onnx"
        if not path.exists():
            raise SystemExit("models/efficientnet_lite0.onnx missing: run `make demo` (or models/efficientnet_lite0.py)")
        with np.load(ROOT / "models" / "efficientnet_lite0_calib.npz") as z:
            calib = {k: z[k][:8] for k in z.files}
        return "EfficientNet-Lite0 224x224", load_proto(onnx.load(str(path))).proto, calib
    raise SystemExit(f"unknown model {name!r}: use small, pointwise or example")


def ort_ms(model: onnx.ModelProto, feed: dict, threads: int, repeat: int) -> tuple[float, np.ndarray]:
    from graphopt.targets.ort import OrtTarget

    t = OrtTarget(threads=threads, repeat=repeat)
    with tempfile.TemporaryDirectory() as d:
        art = t.compile(model, Path(d))
        m = t.measure(art, feed)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    out = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return m.latency.median_ms, out


def ort_reference(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def output_step(qdq: onnx.ModelProto) -> float:
    q = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear"][-1]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer}
    return float(inits[q.input[1]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small,pointwise", help="comma list of: small, pointwise, example")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per task (0: untuned only)")
    ap.add_argument("--db", default=str(ROOT / "bench" / "out" / "int8_tuning_db"))
    ap.add_argument("--variants", default="", help="comma list of TVM variants to run (default all): fp32, "
                    "fake-quant, generic, avx2, avx2-dwfp32")
    args = ap.parse_args()

    from graphopt.passes.int8 import quantize
    from graphopt.targets import tvm_common as tc

    tvm = tc.load_tvm(args.threads)
    tc.set_num_threads(args.threads)
    mcpu = tc.host_mcpu()
    target = tc.llvm_target(mcpu, args.threads, mattr=list(tc.host_mattr(mcpu)))
    print(f"# TVM {tc.tvm_version()} llvm mcpu={mcpu} threads={args.threads}; {tc.cpu_summary()}")
    rows = []
    for name in [s.strip() for s in args.models.split(",") if s.strip()]:
        label, fp32, calib = load(name)
        t = time.monotonic()
        qdq = quantize(fp32, calib, None, activations="uint8")
        print(f"\n## {label}  (quantize_static {time.monotonic() - t:.1f} s)")
        feed = {k: v[0] for k, v in calib.items()}
        x = [feed[k] for k, _, _ in tc.input_specs(fp32)]

        o32_ms, o32 = ort_ms(fp32, feed, args.threads, args.repeat)
        oq_ms, oq = ort_ms(qdq, feed, args.threads, args.repeat)
        ref = ort_reference(qdq, feed)
        step = output_step(qdq)
        rows.append((label, "onnxruntime", "fp32", o32_ms, 1.0, 0.0, ""))
        rows.append((label, "onnxruntime", "QDQ (QLinear kernels)", oq_ms, oq_ms / o32_ms,
                     float(np.abs(oq - o32).max()), f"{np.abs(oq - ref).max() / step:.1f}"))

        from graphopt.targets.tvm_prep import canonicalize

        # fp32 as the x86 target builds it (BN and zero Pads folded: the QDQ model has them folded too)
        dw = {n.name for n in fp32.graph.node if n.op_type == "Conv"
              and next((a.i for a in n.attribute if a.name == "group"), 1) > 1}
        part = None
        if dw:  # the depthwise convs stay fp32: int8 on every other Conv/MatMul/Gemm (per-layer sites)
            rest = [n.name for n in fp32.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.name not in dw]
            part = quantize(fp32, calib, rest, activations="uint8")
            op_ms, op = ort_ms(part, feed, args.threads, args.repeat)
            rows.append((label, "onnxruntime", f"QDQ, {len(dw)} depthwise fp32", op_ms, op_ms / o32_ms,
                         float(np.abs(op - o32).max()), ""))
        mods = {"fp32": tc.import_onnx(canonicalize(fp32)[0]), "QDQ fake-quant": tc.import_onnx(qdq, lower_int8=False)}
        from graphopt.targets.qdq_lower import lower_qdq

        mods["QDQ lowered int8"], stats = lower_qdq(mods["QDQ fake-quant"])
        print(f"lowering (generic kernels): {stats}")
        from graphopt.targets import x86_int8

        if x86_int8.available(target):
            mods["QDQ lowered int8 avx2"], stats = lower_qdq(mods["QDQ fake-quant"], kernels="avx2")
            print(f"lowering (avx2 kernels, vpmaddwd): {stats}")
            if part is not None:
                mods["QDQ avx2 dw-fp32"], stats = lower_qdq(tc.import_onnx(part, lower_int8=False), kernels="avx2")
                print(f"lowering (avx2, {len(dw)} depthwise convs fp32): {stats}")
        wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
        short = {"fp32": "fp32", "QDQ fake-quant": "fake-quant", "QDQ lowered int8": "generic",
                 "QDQ lowered int8 avx2": "avx2", "QDQ avx2 dw-fp32": "avx2-dwfp32"}
        if wanted:
            mods = {k: v for k, v in mods.items() if short[k] in wanted or k == "fp32"}  # fp32: the baseline
        modes = [("untuned", None)] + ([("tuned", args.tune_trials)] if args.tune_trials > 0 else [])
        for mode, trials in modes:
            base_ms = None
            for kind, mod in mods.items():
                t = time.monotonic()
                if trials is None:
                    ex = tc.build(mod, target)
                    how = ""
                else:
                    from graphopt.targets.tuning import tune_and_build

                    with tempfile.TemporaryDirectory() as wd:
                        ex, st = tune_and_build(mod, target, db_dir=args.db, trials_per_task=trials, work_dir=wd,
                                                num_threads=args.threads)
                    how = f" ({st.workloads_tuned} tuned, {st.workloads_reused} reused, {st.workloads_untuned} untuned)"
                build_s = time.monotonic() - t
                out = tc.run_vm(ex, tvm.cpu(), x)[0]
                samples, _ = tc.time_vm(ex, tvm.cpu(), x, repeat=args.repeat)
                ms = float(np.median(samples))
                base_ms = base_ms or ms
                steps = f"{np.abs(out - ref).max() / step:.1f}" if kind not in ("fp32", "QDQ avx2 dw-fp32") else ""
                rows.append((label, f"tvm x86 {mode}", kind, ms, ms / base_ms, float(np.abs(out - o32).max()), steps))
                print(f"  tvm {mode:8s} {kind:18s} {ms:9.3f} ms  x{ms / base_ms:.2f} vs fp32  build {build_s:.1f} s{how}")
    print("\n| model | runtime | variant | median ms | vs fp32 | max abs diff vs ORT fp32 | steps off ORT QDQ ref |")
    print("|---|---|---|---|---|---|---|")
    for label, rt, kind, ms, ratio, diff, steps in rows:
        print(f"| {label} | {rt} | {kind} | {ms:.3f} | {ratio:.2f} | {diff:.4f} | {steps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
