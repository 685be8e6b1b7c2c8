"""Where tuned TVM loses to onnxruntime: time per kernel kind, from the tuning database and ORT's profiler.

TVM side: the model's MetaSchedule workloads (fused module, x86 target), each one's best measured
time in the database x how often the model calls it, summed per kind (depthwise conv, 1x1 conv,
other conv, matmul/dense, other). ORT side: onnxruntime's per-node profile (ORT_ENABLE_ALL, same
threads), averaged over runs, summed per kind of the node (a fused node counts as its first op).

    nice -n 19 .venv/bin/python bench/tvm_profile.py --tuning-db DB_ROOT [--model models/efficientnet_lite0.onnx]

Both sides are measured in one process, but the TVM numbers are the tuner's measurements (taken
while it tuned), so read the kinds' ratios, not small absolute differences.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = re.compile(r"T\.Buffer\(\((.*?)\),\s*\"")


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def tvm_kind(task) -> str:
    (fn,) = task.dispatched[0].functions.values()
    head = next((ln for ln in fn.script().splitlines() if ln.lstrip().startswith("def main(")), "")
    shapes = [[int(x) for x in re.findall(r"T\.int64\((\d+)\)|(?<![\w.(])(\d+)(?=[,)])", s) for x in x if x]
              for s in SHAPE.findall(head)]
    name = task.task_name
    if "conv2d" in name and len(shapes) >= 2:
        data, w = shapes[0], shapes[1]
        if len(w) == 4:
            if w[1] == 1 and len(data) == 4 and data[1] == w[0] and w[0] > 1:
                return f"conv depthwise {w[2]}x{w[3]}"
            return "conv 1x1" if w[2] == 1 and w[3] == 1 else f"conv {w[2]}x{w[3]}"
    if "matmul" in name or "dense" in name:
        return "matmul"
    return "other"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "efficientnet_lite0.onnx")
    ap.add_argument("--calib", type=Path, default=ROOT / "models" / "efficientnet_lite0_calib.npz")
    ap.add_argument("--tuning-db", type=Path, required=True, help="tuning database root (as --tuning-db)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    from graphopt.ir import load_model
    from graphopt.targets import tuning
    from graphopt.targets import tvm_common as tc
    from graphopt.targets.x86 import X86Target

    loaded = load_model(args.model)
    x = np.load(args.calib)
    feed = {loaded.inputs[0].name: x[x.files[0]][0]}
    ort_ms = ort_kinds(args.model, feed, args.threads, args.runs)
    tgt = X86Target(threads=args.threads, tuning_db=str(args.tuning_db))
    tc.load_tvm(args.threads)
    import tvm.s_tir.meta_schedule as ms

    mod = tc.import_onnx(tc.fold_constants(loaded.proto), fold=False, int8_kernels=tgt.int8_kernels)
    _, fused = tuning.prepare(mod, tgt.target)
    tasks = ms.relax_integration.extract_tasks(fused, tgt.target)
    db = tuning.open_db(tgt.tuning_db_dir)
    tvm_ms: dict[str, float] = {}
    unknown = 0
    for t in tasks:
        s = tuning.task_best_seconds(db, t)
        if s is None:
            unknown += 1
            continue
        k = tvm_kind(t)
        tvm_ms[k] = tvm_ms.get(k, 0.0) + s * float(t.weight) * 1000
    kinds = sorted(set(tvm_ms) | set(ort_ms), key=lambda k: -tvm_ms.get(k, 0.0))
    print(f"{args.model.name}: {cpu_model()}, {args.threads} threads; TVM: tuning database best x calls "
          f"({len(tasks)} workloads, {unknown} without a record); ORT: profiler, mean of {args.runs} runs")
    print("\n| kind | TVM ms | ORT ms | TVM/ORT |\n|---|---|---|---|")
    for k in kinds:
        a, b = tvm_ms.get(k, 0.0), ort_ms.get(k, 0.0)
        print(f"| {k} | {a:.2f} | {b:.2f} | {'x%.2f' % (a / b) if b else '-'} |")
    ta, tb_ = sum(tvm_ms.values()), sum(ort_ms.values())
    print(f"| **total** | {ta:.2f} | {tb_:.2f} | x{ta / tb_:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
