"""What a transcendental function costs in TVM-compiled CPU code: libm vs TOPI's fast_* polynomials.

LLVM lowers tir.exp / erf / tanh / sigmoid on x86 to scalar libm calls; the x86 and rpi4 targets'
`fast_math` option (default on, targets/tvm_prep.fast_math) computes them with TOPI's vectorizable
polynomials instead. This bench builds each function alone over MiniLM's GELU input shape
(128 x 1536 float32), untuned and single-threaded, and times it on values of scale 1 (activations)
and scale 100 (large values: MetaSchedule's runner fills every argument uniform in [1, 10), so its
matmul outputs are ~10^4): libm's time depends on the values, which is how the tuned records
mis-stated MiniLM's GELU and softmax kernels (docs/compiler.md).

    .venv/bin/python bench/tvm_fast_math.py [--shape 128x1536] [--out bench/out]

Prints the CPU, then a table: ms per call for each function, libm and fast, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="128x1536")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args(argv)
    from graphopt.targets import tvm_common as tc
    from graphopt.targets.tvm_prep import fast_sigmoid

    tvm = tc.load_tvm(1)
    from tvm import te, topi

    shape = tuple(int(d) for d in args.shape.split("x"))
    mcpu = tc.host_mcpu()
    target = tc.llvm_target(mcpu, 1, mattr=list(tc.host_mattr(mcpu)))
    pairs = [("erf", topi.erf, topi.fast_erf), ("exp", topi.exp, topi.fast_exp),
             ("tanh", topi.tanh, topi.fast_tanh), ("sigmoid", topi.sigmoid, fast_sigmoid)]
    rows = []
    print(f"CPU: {tc.cpu_summary()}; TVM {tc.tvm_version()}; target {target}; 1 thread, untuned; shape {shape}")
    for name, libm, fast in pairs:
        for scale in (1.0, 100.0):
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * np.float32(scale)
            if name == "exp":
                x = -np.abs(x)  # softmax's exp(x - max): non-positive arguments
            ms = {}
            for kind, fn in (("libm", libm), ("fast", fast)):
                A = te.placeholder(shape, "float32", name="A")
                lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([A, fn(A)])}), target=target)
                a, b = tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros_like(x))
                ev = lib.mod.time_evaluator("main", tvm.cpu(), number=20, repeat=5)
                ev(a, b)
                ms[kind] = min(ev(a, b).results) * 1e3
            rows.append({"function": name, "scale": scale, "libm_ms": round(ms["libm"], 4),
                         "fast_ms": round(ms["fast"], 4), "libm_over_fast": round(ms["libm"] / ms["fast"], 1)})
    print("\n| function | values of scale | libm ms | fast ms | libm / fast |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['function']} | {r['scale']:g} | {r['libm_ms']:.3f} | {r['fast_ms']:.3f} | x{r['libm_over_fast']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tvm_fast_math.json").write_text(json.dumps({"cpu": tc.cpu_summary(), "shape": shape, "rows": rows},
                                                            indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
