"""TVM's cuda target against torch eager and torch.compile, on one local NVIDIA GPU.

The models are the bundled EfficientNet-Lite0 and MiniLM (models/*.onnx, exported by models/*.py
from the same torch weights that torch runs here), batch 1, float32, sample 0 of their bundled
evaluation data. Every runtime is timed by the same wall-clock loop: `number` back-to-back calls with
the inputs already on the GPU, then a device synchronize, `repeat` times after `warmup` calls;
the table shows the median per-call time and ratios against TVM. TVM's own time_evaluator
number (what graphopt's cuda target reports) is printed beside it. Outputs are checked against
onnxruntime on the CPU.

    .venv/bin/python bench/cuda_vs_torch.py [--models efficientnet,minilm] [--trials 0] [--tune-time 120]
        [--onnx OTHER.onnx] [--compile-mode default|reduce-overhead|max-autotune] [--json out.json]

With --tune-time S each model gets a per-model MetaSchedule budget of S seconds (the cuda
target's tune_time) from the database it finds, and then a second compile against the same
database (a mutated model: one conv's kernel grown by 2; the same model again for MiniLM) shows
what a search's next candidate reuses. In a 15-minute GPU session, one call per model
(`--models efficientnet --tune-time 120`, then `--models minilm ...`), about 4-5 minutes each by
the 2026-11-26 H200 run's ~1 s per trial (an estimate). `--rehearse-cpu` runs every step on this
CPU (x86 target, torch on the CPU) to check the script where there is no GPU.

Without a GPU it prints "no GPU: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
sys.path.insert(0, str(ROOT / "bench"))
MODELS = {"efficientnet": ROOT / "models" / "efficientnet_lite0.onnx", "minilm": ROOT / "models" / "minilm.onnx"}
EVALS = {"efficientnet": ROOT / "models" / "efficientnet_lite0_eval.npz", "minilm": ROOT / "models" / "minilm_eval.npz"}


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


def feed_for(model_name: str, onnx_path: Path, model) -> dict[str, np.ndarray]:
    """Sample 0 of the model's bundled evaluation data (random values for another --onnx)."""
    from graphopt.targets import tvm_common as tc

    specs = tc.input_specs(model)
    data = EVALS.get(model_name) if onnx_path == MODELS[model_name] else None
    if data is not None and data.exists():
        z = np.load(data)
        if len(specs) == 1 and "input" in z.files:
            return {specs[0][0]: z["input"][0].astype(specs[0][2])}
        return {n: z[n][0].astype(d) for n, _, d in specs}
    rng = np.random.default_rng(0)
    return {n: (rng.integers(0, 2, s) if "int" in str(d) else rng.standard_normal(s)).astype(d) for n, s, d in specs}


def torch_module(model_name: str):
    """The same weights in torch (what the ONNX model was exported from), or None with a reason."""
    import importlib.util

    try:  # by path: bench/minilm.py (on sys.path first) would shadow models/minilm.py
        script = ROOT / "models" / ("efficientnet_lite0.py" if model_name == "efficientnet" else "minilm.py")
        spec = importlib.util.spec_from_file_location(f"models_{script.stem}", script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return (mod.load_torch_model() if model_name == "efficientnet" else mod.embedder("eager")), ""
    except Exception as e:  # noqa: BLE001 - weights or transformers missing on the GPU host: TVM rows alone
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def bench_model(model_name: str, onnx_path: Path, args, timing: dict) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    from graphopt.targets import cuda
    from graphopt.targets import tvm_common as tc

    script = {"efficientnet": "efficientnet_lite0.py", "minilm": "minilm.py"}[model_name]
    if onnx_path == MODELS[model_name] and not onnx_path.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / script)], check=True, cwd=ROOT)
    model = onnx.load(str(onnx_path))
    feed = feed_for(model_name, onnx_path, model)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    rows: dict[str, dict] = {}

    # ---- TVM, graphopt's cuda target: dlight, --trials N per workload, or a --tune-time budget
    opts = {"tune_time": args.tune_time} if args.tune_time else {}
    if args.rehearse_cpu:  # every step of this script on this CPU (x86 target, torch on the CPU) before GPU minutes
        from graphopt.targets.x86 import X86Target

        target = X86Target(threads=2, trials=args.trials or (8 if args.tune_time else 0), tuning_db=args.tuning_db,
                           repeat=args.repeat, **opts)
    else:
        target = cuda.CudaTarget(trials=args.trials, tuning_db=args.tuning_db, number=args.number,
                                 repeat=args.repeat, warmup=args.warmup, **opts)
    target.check()
    d = target.describe()
    sched = d.get("schedules") or json.dumps(d.get("tuning", {}).get("budget") or d.get("tuning"))
    log(f"{model_name}: TVM compiling for {target.target_json()} ({sched})")
    work = Path(tempfile.mkdtemp(prefix="cuda-vs-torch-"))  # both compiles' files; removed before returning
    (work / "first").mkdir()
    (work / "second").mkdir()
    t0 = time.perf_counter()
    art = target.compile(model, work / "first")
    compile_s = time.perf_counter() - t0
    out = target.run_once(art, feed)[0]
    tvm = tc.load_tvm()
    dev = tvm.cpu(0) if args.rehearse_cpu else tvm.cuda(0)
    main_fn = tc.make_vm(art.handle, dev)["main"]
    args_d = tc.to_device(target._ordered_inputs(art, feed), dev)
    samples = time_loop(lambda: main_fn(*args_d), dev.sync, **timing)
    m = target.measure(art, feed)
    tuning = art.info.get("tuning", {})
    key = f"tvm {target.name}"  # "tvm cuda"; "tvm x86" in a rehearsal
    rows[key] = {"ms": statistics.median(samples), "max_abs_err": float(np.abs(out - ref).max()),
                 "compile_s": compile_s, "time_evaluator_ms": m.latency.median_ms, "tuned": m.tuned,
                 "device": m.device, "tuning": {k: tuning.get(k) for k in (
                     "workloads_seen", "workloads_tuned", "trials", "tuning_s", "stopped_because")}}
    log(f"{model_name}: TVM {rows[key]['ms']:.3f} ms, compile {compile_s:.1f} s")

    # ---- the second compile against the same database: a mutated model (one conv's kernel grown), or
    # the same model again where there is no such site; what it reuses and how long it takes
    second = None
    if target.trials > 0:
        from graphopt.modelio.ir import load_model
        from tvm_vs_ort import mutated

        mut, desc = mutated(load_model(onnx_path))
        t0 = time.perf_counter()
        info = target.compile(mut if mut is not None else model, work / "second").info.get("tuning", {})
        second = {"model": desc if mut is not None else "the same model again", "compile_s": time.perf_counter() - t0,
                  **{k: info.get(k) for k in ("workloads_seen", "workloads_reused", "workloads_tuned", "trials")}}
        log(f"{model_name}: second compile {json.dumps(second, default=str)}")

    # ---- torch eager and torch.compile, same weights
    device = "cpu" if args.rehearse_cpu else "cuda"
    sync = (lambda: None) if args.rehearse_cpu else torch.cuda.synchronize
    net, why = (torch_module(model_name) if args.rehearse_cpu or torch.cuda.is_available()
                else (None, "torch has no CUDA (a CPU build?)"))
    if net is not None:
        net = net.to(device).eval()
        xt = [torch.from_numpy(v).to(device) for v in feed.values()]
        with torch.inference_mode():
            y = net(*xt).float().cpu().numpy()
            rows["torch eager"] = {"ms": statistics.median(time_loop(lambda: net(*xt), sync, **timing)),
                                   "max_abs_err": float(np.abs(y - ref).max())}
            log(f"{model_name}: torch.compile(mode={args.compile_mode!r}): compiling")
            t0 = time.perf_counter()
            cnet = torch.compile(net, mode=args.compile_mode)
            y = cnet(*xt).float().cpu().numpy()
            rows["torch.compile"] = {"ms": statistics.median(time_loop(lambda: cnet(*xt), sync, **timing)),
                                     "max_abs_err": float(np.abs(y - ref).max()),
                                     "compile_s": time.perf_counter() - t0}
    else:
        log(f"{model_name}: no torch rows ({why})")
    if onnx_path != MODELS[model_name] and net is not None:
        log("note: torch runs the bundled model's weights, not --onnx; the ratios compare different models")
    target.close()
    shutil.rmtree(work, ignore_errors=True)
    return {"model": str(onnx_path), "schedules": sched, "rows": rows, "tvm_key": key, "second_compile": second,
            "torch_missing": why or None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet", help="comma-separated: efficientnet, minilm")
    ap.add_argument("--onnx", type=Path, default=None, help="another ONNX model instead (one --models entry)")
    ap.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per task (0: dlight, untuned); "
                    "with --tune-time, each new workload's warm-up")
    ap.add_argument("--tune-time", default=None, help="per-model tuning budget (e.g. 120, 3m): the cuda target's "
                    "tune_time, spent where the latency is")
    ap.add_argument("--tuning-db", default=None, help="tuning database root (default: graphopt's cache)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--number", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--rehearse-cpu", action="store_true", help="run every step on this CPU instead (x86 target, "
                    "torch on the CPU): checks the script where there is no GPU; its numbers are not the GPU's")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad or not names:
        ap.error(f"--models: unknown {bad}; choose from {sorted(MODELS)}")
    if args.onnx is not None and len(names) != 1:
        ap.error("--onnx replaces one model: give one --models entry with it")

    if not args.rehearse_cpu and not gpu_present():
        print("no GPU: skipped (--rehearse-cpu runs every step on this CPU)")
        return 0

    import torch

    from graphopt.targets import tvm_common as tc

    timing = {"number": args.number, "repeat": args.repeat, "warmup": args.warmup}
    gpu = ("this CPU (--rehearse-cpu)" if args.rehearse_cpu else
           torch.cuda.get_device_name(0) if torch.cuda.is_available() else "the local GPU")
    results = {}
    for name in names:
        onnx_path = args.onnx if args.onnx is not None else MODELS[name]
        res = results[name] = bench_model(name, onnx_path, args, timing)
        rows, base = res["rows"], res["rows"][res["tvm_key"]]["ms"]
        print(f"\n{onnx_path.name}, batch 1, float32, on {gpu}; torch {torch.__version__}, tvm {tc.tvm_version()} "
              f"({res['schedules']})")
        print(f"timing: median of {args.repeat} blocks x {args.number} calls after {args.warmup} warm-up calls")
        print(f"{'runtime':<16}{'ms':>10}{'x TVM':>9}{'max|err| vs ORT':>18}{'compile s':>11}")
        for k, r in rows.items():
            print(f"{k:<16}{r['ms']:>10.3f}{r['ms'] / base:>9.2f}{r['max_abs_err']:>18.2e}"
                  f"{r.get('compile_s', float('nan')):>11.1f}")
        t = rows[res["tvm_key"]]
        print(f"TVM time_evaluator: {t['time_evaluator_ms']:.3f} ms; tuning: {json.dumps(t['tuning'], default=str)}")
        if res["second_compile"]:
            sc = res["second_compile"]
            print(f"second compile ({sc['model']}): {sc['compile_s']:.1f} s ({sc['compile_s'] / t['compile_s']:.0%} "
                  f"of the first), reused {sc['workloads_reused']}/{sc['workloads_seen']} workloads, "
                  f"{sc['trials']} trials")
        if res["torch_missing"]:
            print(f"torch rows missing: {res['torch_missing']}")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "timing": timing, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
