"""The x86 option vm_exec: the Relax VM's main compiled to native code vs interpreted bytecode,
on the same tuning database, against onnxruntime, timed alternately in one process.

    .venv/bin/python bench/tvm_vm_exec.py --tuning-db DB_ROOT [--models efficientnet,minilm] [--rounds 7]

First the VM's cost per kernel call in each form (a chain of 200 tiny kernels). DB_ROOT holds the
x86 target's database folders (a tuning curve's --out DIR/tuning-db/MODEL-curve,
or a run's --tuning-db): both forms build from it with its in-model picks (refine=1: no timing, no
tuning of what it has; a workload it lacks is tuned with 1 trial). Prints per round and the median
of rounds: TVM compiled, TVM bytecode, onnxruntime (ms), and the ratios. Run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tvm_vs_ort import MODELS, THREADS, feed_for  # noqa: E402

from graphopt.modelio.ir import load_model  # noqa: E402
from graphopt.targets.host import cpu_summary  # noqa: E402
from graphopt.targets.ort import OrtTarget  # noqa: E402
from graphopt.targets.x86 import X86Target  # noqa: E402


def per_call_us(calls: int = 200) -> dict[str, float]:
    """The VM's cost per kernel call in each form: a chain of `calls` tiny elementwise kernels (1x16
    floats each, so the kernels themselves take almost nothing), timed by the VM's time_evaluator."""
    import numpy as np
    import tvm
    from tvm import relax

    from graphopt.targets import tvm_common as tc

    tc.load_tvm(THREADS)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 16], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for i in range(calls):
                c = relax.const(np.full((1, 16), 0.5 if i % 2 else i % 7, "float32"))
                y = bb.emit(relax.op.multiply(y, c) if i % 2 else relax.op.add(y, c))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    arg = tvm.runtime.tensor(np.random.default_rng(0).random((1, 16)).astype("float32"))
    got = {}
    for mode in ("compiled", "bytecode"):
        vm = relax.VirtualMachine(tc.relax_build(bb.get(), X86Target(threads=THREADS).target, mode), tvm.cpu())
        vm.set_input("main", arg)
        res = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=200, repeat=7)("main").results
        got[mode] = statistics.median(res) * 1e6 / calls
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuning-db", type=Path, required=True, help="tuning database root (as --tuning-db)")
    ap.add_argument("--models", default="efficientnet,minilm")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=20, help="each target's timed repeats per round (its median)")
    a = ap.parse_args()
    print(f"# host: {cpu_summary()}; {THREADS} threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    import onnxruntime as ort

    pc = per_call_us()
    print(f"per kernel call (a chain of 200 tiny kernels): compiled {pc['compiled']:.3f} us, bytecode "
          f"{pc['bytecode']:.3f} us", flush=True)
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        path, calib = MODELS[name]
        loaded = load_model(path)
        targets = {mode: X86Target(threads=THREADS, trials=1, refine=1, vm_exec=mode, repeat=a.repeat,
                                   tuning_db=str(a.tuning_db))
                   for mode in ("compiled", "bytecode")}
        runs = {}
        for mode, tgt in targets.items():
            art = tgt.compile(loaded.proto, Path(tempfile.mkdtemp()))
            runs[mode] = (tgt, art)
            print(f"{name} {mode}: built; picks used {art.info['tuning']['in_model'].get('picks_used')}", flush=True)
        ot = OrtTarget(threads=THREADS, repeat=a.repeat)
        runs["ort"] = (ot, ot.compile(loaded.proto, Path(tempfile.mkdtemp())))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = feed_for(calib, sess.get_inputs())
        outs = {m: runs[m][0].run_once(runs[m][1], feed) for m in ("compiled", "bytecode")}
        same = all((x == y).all() for x, y in zip(outs["compiled"], outs["bytecode"]))
        rows = []
        for r in range(a.rounds):  # each target's own measure(): what a search and its report use
            row = {m: tgt.measure(art, feed).latency.median_ms for m, (tgt, art) in runs.items()}
            rows.append(row)
            print(f"{name} round {r}: compiled {row['compiled']:.3f}  bytecode {row['bytecode']:.3f}  "
                  f"onnxruntime {row['ort']:.3f} ms", flush=True)
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"| {name} | {med['compiled']:.3f} | {med['bytecode']:.3f} | {med['ort']:.3f} | "
              f"x{med['compiled'] / med['bytecode']:.3f} | x{med['compiled'] / med['ort']:.3f} | "
              f"x{med['bytecode'] / med['ort']:.3f} | outputs {'identical' if same else 'DIFFER'} |")
        for tgt, _ in runs.values():  # (the ort one too)
            tgt.close()


if __name__ == "__main__":
    main()
