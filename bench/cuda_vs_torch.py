"""TVM's cuda target against torch eager and torch.compile, on one local NVIDIA GPU.

The model is the bundled EfficientNet-Lite0 (models/efficientnet_lite0.onnx, built by
models/efficientnet_lite0.py from the same torch weights that torch runs here), batch 1,
float32. Every runtime is timed by the same wall-clock loop: `number` back-to-back calls with
the inputs already on the GPU, then a device synchronize, `repeat` times after `warmup` calls;
the table shows the median per-call time and ratios against TVM. TVM's own time_evaluator
number (what graphopt's cuda target reports) is printed beside it. Outputs are checked against
onnxruntime on the CPU.

    .venv/bin/python bench/cuda_vs_torch.py [--trials 0] [--onnx models/efficientnet_lite0.onnx]
        [--compile-mode default|reduce-overhead|max-autotune] [--json out.json]

Without a GPU it prints "no GPU: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
EVAL = ROOT / "models" / "efficientnet_lite0_eval.npz"


def log(msg: str) -> None:
    print(f"[cuda_vs_torch {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gpu_present() -> bool:
    """An NVIDIA GPU that torch or TVM can use (cheap checks first)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if not (gpus.is_dir() and any(gpus.iterdir())):
        return False
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    from graphopt.targets import cuda

    return cuda.local_gpu() is not None


def time_loop(call, sync, number: int, repeat: int, warmup: int) -> list[float]:
    """Per-call milliseconds of `repeat` timed blocks of `number` calls (synchronized at the end)."""
    for _ in range(warmup):
        call()
    sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            call()
        sync()
        out.append((time.perf_counter() - t0) * 1000.0 / number)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, default=MODEL, help="ONNX model (default: the bundled example)")
    ap.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per task (0: dlight, untuned)")
    ap.add_argument("--tuning-db", default=None, help="tuning database root (default: graphopt's cache)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--number", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    if not gpu_present():
        print("no GPU: skipped")
        return 0

    import onnx
    import onnxruntime as ort
    import torch
    from graphopt.targets import cuda
    from graphopt.targets import tvm_common as tc

    if args.onnx == MODEL and not MODEL.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "efficientnet_lite0.py")], check=True, cwd=ROOT)
    model = onnx.load(str(args.onnx))
    (name, shape, dtype), = tc.input_specs(model)
    if EVAL.exists() and args.onnx == MODEL:
        x = np.load(EVAL)["input"][0].astype(np.float32)
    else:
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    (ref,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})

    rows: dict[str, dict] = {}
    timing = {"number": args.number, "repeat": args.repeat, "warmup": args.warmup}

    # ---- TVM, graphopt's cuda target
    target = cuda.CudaTarget(trials=args.trials, tuning_db=args.tuning_db, number=args.number, repeat=args.repeat,
                             warmup=args.warmup)
    target.check()
    sched = f"MetaSchedule {args.trials} trials/task" if args.trials else "dlight, untuned"
    log(f"TVM: compiling for {target.arch} ({sched})")
    t0 = time.perf_counter()
    art = target.compile(model, Path(tempfile.mkdtemp(prefix="cuda-vs-torch-")))
    compile_s = time.perf_counter() - t0
    (out,) = target.run_once(art, {name: x})
    tvm = tc.load_tvm()
    dev = tvm.cuda(0)
    vm = tc.make_vm(art.handle, dev)
    main_fn = vm["main"]
    (xd,) = tc.to_device([x], dev)
    samples = time_loop(lambda: main_fn(xd), dev.sync, **timing)
    m = target.measure(art, {name: x})
    rows["tvm cuda"] = {"ms": statistics.median(samples), "max_abs_err": float(np.abs(out - ref).max()),
                        "compile_s": compile_s, "time_evaluator_ms": m.latency.median_ms,
                        "tuned": m.tuned, "device": m.device}

    # ---- torch eager and torch.compile, same weights
    from efficientnet_lite0 import load_torch_model

    if not torch.cuda.is_available():
        log(f"torch {torch.__version__} cannot use the GPU (a CPU-only build?): install a CUDA build of torch "
            "for the torch rows; printing TVM alone")
        print(f"tvm cuda: {rows['tvm cuda']['ms']:.3f} ms (time_evaluator {m.latency.median_ms:.3f} ms), "
              f"max|err| vs ORT {rows['tvm cuda']['max_abs_err']:.2e}; torch: no CUDA")
        return 0
    net = load_torch_model().cuda().eval()
    xt = torch.from_numpy(x).cuda()
    with torch.inference_mode():
        y = net(xt).float().cpu().numpy()
        rows["torch eager"] = {"ms": statistics.median(time_loop(lambda: net(xt), torch.cuda.synchronize, **timing)),
                               "max_abs_err": float(np.abs(y - ref).max())}
        log(f"torch.compile(mode={args.compile_mode!r}): compiling")
        t0 = time.perf_counter()
        cnet = torch.compile(net, mode=args.compile_mode)
        y = cnet(xt).float().cpu().numpy()
        rows["torch.compile"] = {"ms": statistics.median(time_loop(lambda: cnet(xt), torch.cuda.synchronize,
                                                                   **timing)),
                                 "max_abs_err": float(np.abs(y - ref).max()), "compile_s": time.perf_counter() - t0}

    base = rows["tvm cuda"]["ms"]
    gpu = torch.cuda.get_device_name(0)
    if args.onnx != MODEL:
        log("note: torch runs the bundled EfficientNet-Lite0, not --onnx; the ratios compare different models")
    print(f"{args.onnx.name}, batch {shape[0]}, float32, on {gpu}; torch {torch.__version__}, "
          f"tvm {tc.tvm_version()} ({sched})")
    print(f"timing: median of {args.repeat} blocks x {args.number} calls after {args.warmup} warm-up calls")
    print(f"{'runtime':<16}{'ms':>10}{'x TVM':>9}{'max|err| vs ORT':>18}")
    for k, r in rows.items():
        print(f"{k:<16}{r['ms']:>10.3f}{r['ms'] / base:>9.2f}{r['max_abs_err']:>18.2e}")
    print(f"TVM time_evaluator: {rows['tvm cuda']['time_evaluator_ms']:.3f} ms; "
          f"TVM compile {rows['tvm cuda']['compile_s']:.1f} s, torch.compile {rows['torch.compile']['compile_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "model": str(args.onnx), "timing": timing, "rows": rows},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
