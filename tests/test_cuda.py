"""The cuda target: builds for an NVIDIA arch on a CPU-only host; measures only where a GPU is.

CI and the project's build machine have no GPU: the GPU tests skip there, and the no-GPU tests
(TargetUnreachable, exit 4) skip on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

if importlib.util.find_spec("tvm") is None:
    pytest.skip("apache-tvm is not installed", allow_module_level=True)

from conftest import conv_bn_model, run_cli
from graphopt.targets import cuda

from graphopt.errors import DataError, TargetUnreachable, UsageError


def _nvidia_gpu_present() -> bool:
    """Cheap (no tvm import): the NVIDIA driver lists at least one GPU."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


HAS_GPU = _nvidia_gpu_present()
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU (none on this machine)")
no_gpu_only = pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU behaviour; this machine has a GPU")
RPC_ENV = ("GRAPHOPT_RPC_TRACKER", "GRAPHOPT_RPC_KEY", "GRAPHOPT_RPC_SERVER")


@pytest.fixture(autouse=True)
def _no_rpc_env(monkeypatch):
    for var in RPC_ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return conv_bn_model(channels=8, size=16, blocks=2)


@pytest.fixture(scope="module")
def compiled(model, tmp_path_factory):
    t = cuda.CudaTarget(arch="sm_90")
    return t, t.compile(model, tmp_path_factory.mktemp("cuda"))


def _embedded_cuda_source(artifact) -> str:
    """The CUDA source TVM 0.27 embeds in the library (it JIT-compiles it on the GPU host)."""
    mods = [artifact.handle.mod]
    while mods:
        m = mods.pop()
        if m.kind == "cuda":
            return m.inspect_source()
        mods.extend(m.imports)
    raise AssertionError("no cuda module in the executable")


def test_compile_for_sm90_without_a_gpu(compiled, tmp_path):
    t, art = compiled
    assert art.info["target"] == {"kind": "cuda", "arch": "sm_90"} and art.info["tuned"] is False
    assert art.info["inputs"] == [("x", [1, 3, 16, 16], "float32")]
    src = _embedded_cuda_source(art)
    assert 'extern "C" __global__' in src and "fused_conv2d" in src
    (lib,) = t.export(art, tmp_path)
    assert lib == tmp_path / "model.so"
    data = lib.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert b"fused_conv2d" in data  # the kernels travel inside the .so
    if not HAS_GPU:  # as CUDA source (a GPU host with TVM's nvcc callback compiles them to a fatbin at build)
        assert b"__global__" in data
        assert b"threadIdx.x" in data  # with their launch parameters (kernel -> thread axes map)


@pytest.mark.skipif(not cuda.has_nvcc(), reason="nvcc (CUDA toolkit) is not installed")
def test_embedded_kernels_compile_for_sm90(compiled):
    """What the GPU host will do at load time, done here with nvcc: the source is valid for sm_90."""
    import tvm
    from tvm.support import nvcc

    _, art = compiled
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}):  # nvcc's helpers read the arch from the target
        fatbin = nvcc.compile_cuda(_embedded_cuda_source(art), target_format="fatbin", arch="sm_90",
                                   compiler="nvcc")
    assert bytes(fatbin[:4]) == bytes.fromhex("50ed55ba")  # fatbin magic 0xBA55ED50, little endian


@pytest.mark.parametrize("given, want", [("sm_90", "sm_90"), ("90", "sm_90"), (86, "sm_86"), ("SM_80", "sm_80"),
                                         ("sm_90a", "sm_90a"), ("sm87", "sm_87")])
def test_parse_arch(given, want):
    assert cuda.parse_arch(given) == want


@pytest.mark.parametrize("bad", ["sm_x", "h100", "sm_9", "compute_90", "", "sm_20"])
def test_bad_arch_names_the_flag(bad):
    with pytest.raises(UsageError, match=r"arch=.*--target-opt arch=sm_90"):
        cuda.CudaTarget(arch=bad)


def test_options_are_validated():
    with pytest.raises(UsageError, match=r"unknown cuda target option\(s\) \['archh'\]; valid: arch"):
        cuda.CudaTarget(archh="sm_90")
    for key, bad in (("trials", -1), ("repeat", 0), ("warmup", "x"), ("number", 1.5), ("max_new_tasks", 0)):
        with pytest.raises(UsageError, match=f"cuda target: {key}="):
            cuda.CudaTarget(arch="sm_90", **{key: bad})
    with pytest.raises(UsageError, match="compiler='clang'"):
        cuda.CudaTarget(arch="sm_90", compiler="clang")
    with pytest.raises(UsageError, match="needs the device key"):
        cuda.CudaTarget(arch="sm_90", tracker="127.0.0.1:9190")
    t = cuda.CudaTarget(arch="sm_90", trials="8", repeat=3)
    assert (t.trials, t.repeat, t.arch) == (8, 3, "sm_90")


def test_registry():
    from graphopt.registry import TARGETS

    assert TARGETS.get("cuda") is cuda.CudaTarget
    assert "cuda" in TARGETS.names()


def test_missing_arch_without_gpu_names_the_flag(monkeypatch):
    monkeypatch.setattr(cuda, "local_gpu", lambda: None)
    t = cuda.CudaTarget()
    with pytest.raises(UsageError, match=r"no local NVIDIA GPU.*--target-opt arch=sm_XX"):
        _ = t.arch


def test_measure_without_gpu_is_unreachable(compiled, monkeypatch):
    t, art = compiled
    monkeypatch.setattr(cuda, "local_gpu", lambda: None)
    x = {"x": np.zeros((1, 3, 16, 16), np.float32)}
    with pytest.raises(TargetUnreachable) as e:
        t.measure(art, x)
    assert str(e.value) == cuda.NO_DEVICE
    assert "--target-opt tracker=HOST:PORT --target-opt key=NAME" in str(e.value)
    with pytest.raises(TargetUnreachable):
        t.run_once(art, x)
    with pytest.raises(TargetUnreachable, match="no CUDA device here"):
        cuda.CudaTarget(arch="sm_90").check()
    with pytest.raises(DataError, match=r"input 'x' has shape \[1, 3, 8, 8\]"):  # inputs are checked first
        t.measure(art, {"x": np.zeros((1, 3, 8, 8), np.float32)})


def test_unreachable_tracker(monkeypatch):
    import socket

    monkeypatch.setattr(cuda, "local_gpu", lambda: None)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = cuda.CudaTarget(arch="sm_90", tracker=f"127.0.0.1:{port}", key="h100")
    with pytest.raises(TargetUnreachable, match=rf"RPC tracker 127.0.0.1:{port} is unreachable"):
        t.check()
    assert t.describe()["rpc"]["key"] == "h100" and t.describe()["measured"] == "over RPC"


def test_measure_over_rpc_uploads_the_library(model, tmp_path, monkeypatch):
    """No GPU here, a tracker given: the arch comes from the device, the .so goes to it, method 'rpc'.
    (The device is faked at the targets/rpc.py boundary; test_rpc.py runs a real tracker.)"""
    monkeypatch.setattr(cuda, "local_gpu", lambda: None)
    calls = {}

    def fake_with_session(cfg, fn, what):
        class Dev:
            exist, compute_version, device_name = True, "8.6", "NVIDIA GeForce RTX 3090"

        class Sess:
            def device(self, kind, i):
                calls["device"] = (kind, i)
                return Dev()

        return fn(Sess())

    def fake_measure_remote(cfg, lib_path, inputs, number=None, repeat=5, warmup=1, device="cpu", **kw):
        calls.update(lib=Path(lib_path), device_kind=device, shapes=[x.shape for x in inputs], repeat=repeat)
        return [1.5, 1.25, 1.75], 7

    monkeypatch.setattr(cuda.rpc_mod, "with_session", fake_with_session)
    monkeypatch.setattr(cuda.rpc_mod, "check_reachable", lambda cfg: 1)
    monkeypatch.setattr(cuda.rpc_mod, "measure_remote", fake_measure_remote)
    t = cuda.CudaTarget(tracker="127.0.0.1:9190", key="rtx", repeat=3)
    t.check()
    assert t.arch == "sm_86" and calls["device"] == ("cuda", 0)
    art = t.compile(model, tmp_path)
    assert art.files == [tmp_path / "model.so"] and art.files[0].stat().st_size > 0
    m = t.measure(art, {"x": np.zeros((1, 3, 16, 16), np.float32)})
    assert calls["lib"] == tmp_path / "model.so" and calls["device_kind"] == "cuda"
    assert calls["shapes"] == [(1, 3, 16, 16)] and calls["repeat"] == 3
    assert m.method == "rpc" and m.latency.median_ms == 1.5 and m.latency.runs_per_repeat == 7
    assert m.device == "NVIDIA GeForce RTX 3090 (sm_86)" and m.extra["rpc"].startswith("key 'rtx'")
    assert t.describe()["device"] == "TVM RPC device 'rtx' (cuda)"


def test_describe(compiled):
    t, _ = compiled
    d = t.describe()
    assert d["name"] == "cuda" and d["target"] == {"kind": "cuda", "arch": "sm_90"}
    assert d["tuned"] is False and "dlight" in d["schedules"]
    assert d["compiler"].startswith("tvm relax 0.27")


def test_tuning_without_gpu_applies_database_only(model, tmp_path, monkeypatch):
    """trials=N with no GPU reachable: no trials run, the (empty) database is applied, dlight does the rest."""
    monkeypatch.setattr(cuda, "local_gpu", lambda: None)
    t = cuda.CudaTarget(arch="sm_90", trials=4, tuning_db=str(tmp_path / "db"))
    art = t.compile(model, tmp_path)
    st = art.info["tuning"]
    assert st["trials"] == 0 and st["workloads_tuned"] == 0
    assert st["workloads_seen"] >= 3 and st["workloads_untuned"] == st["workloads_seen"]
    assert art.info["tuned"] is False and "no GPU reachable" in art.info["tuning_note"]
    assert Path(st["db"]).parent == tmp_path / "db"
    assert "__global__" in _embedded_cuda_source(art)


def _fake_runner_class():
    """A MetaSchedule runner that measures nothing (no GPU here): made-up times, counted."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

    @derived_object
    class Done(PyRunnerFuture):
        def __init__(self, secs: float) -> None:
            super().__init__()
            self.secs = secs

        def done(self) -> bool:
            return True

        def result(self):
            return RunnerResult([self.secs], None)

    @derived_object
    class FakeRunner(PyRunner):
        def __init__(self) -> None:
            super().__init__()
            self.runs = 0

        def run(self, inputs):
            self.runs += len(inputs)
            return [Done(1e-5 * (1 + (self.runs + i) % 5)) for i in range(len(inputs))]

    return FakeRunner


def test_cuda_tuning_budget_options():
    """tune_trials / tune_time: a per-model budget as on x86; with trials=0 (cuda's default) each new
    workload's warm-up is tune_budget.DEFAULT_WARM."""
    from graphopt.targets.tune_budget import DEFAULT_WARM

    t = cuda.CudaTarget(arch="sm_90", tune_time="2m")
    assert (t.budget.budget_s, t.budget.budget_trials, t.trials) == (120.0, None, DEFAULT_WARM)
    assert "a per-model budget (120 s; 8 warm-up trials per new workload)" in t.describe()["schedules"]
    t = cuda.CudaTarget(arch="sm_90", trials=2, tune_trials="40")
    assert (t.budget.budget_trials, t.budget.warm, t.trials) == (40, 2, 2)
    assert cuda.CudaTarget(arch="sm_90").budget is None
    with pytest.raises(UsageError, match="cuda target: tune_trials must be an integer and tune_time seconds"):
        cuda.CudaTarget(arch="sm_90", tune_time="soon")


def test_cuda_tuning_budget_is_spent_and_reused(tmp_path, monkeypatch):
    """A tune_trials budget on sm_90 with the stand-in runner (as RPC would measure): the first compile
    spends at most the budget, every workload gets its warm-up, and then rounds go to the heaviest;
    the second compile of the model finds every tuned workload in the database and tunes nothing."""
    FakeRunner = _fake_runner_class()
    runners = []
    monkeypatch.setattr(cuda.rpc_mod, "ms_runner", lambda rpc: runners.append(FakeRunner()) or runners[-1])
    t = cuda.CudaTarget(arch="sm_90", trials=1, tune_trials=12, tuning_db=str(tmp_path / "db"))
    monkeypatch.setattr(t, "_where", lambda: "rpc")
    model = conv_bn_model(channels=8, size=8, blocks=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = t.compile(model, tmp_path / "a").info["tuning"]
    second = t.compile(model, tmp_path / "b").info["tuning"]
    n = first["workloads_seen"]
    assert n >= 3 and first["budget"]["budget_trials"] == 12 and first["budget"]["warm"] == 1
    assert n <= first["trials"] <= 12 and first["budget"]["rounds"] >= 2  # warm-up, then rounds
    assert first["budget"]["stopped_because"] in ("trial budget spent", "nothing left to tune")
    assert runners[0].runs >= first["workloads_tuned"]
    # a workload whose sampled schedules were all rejected before building is recorded as failed, not retried
    assert second["workloads_reused"] == first["workloads_tuned"] >= n - 1
    assert second["trials"] == 0 and runners[1].runs == 0


def test_cuda_tuning_fills_database_and_next_compile_reuses_it(tmp_path):
    """MetaSchedule for cuda end to end on a CPU host: TVM's CUDA schedule rules, the builder and the
    database are real; only the runner is a stand-in (it returns made-up times: there is no GPU).
    Without the per-block limits in the target, every cuda tuning run failed with "missing attribute
    `max_threads_per_block`" (found on an H200, 2026-11-26)."""
    from graphopt.targets import tuning
    from graphopt.targets import tvm_common as tc

    FakeRunner = _fake_runner_class()
    t = cuda.CudaTarget(arch="sm_90", trials=1)
    assert t.target.attrs["max_threads_per_block"] == 1024 and t.target_json() == {"kind": "cuda", "arch": "sm_90"}
    mod = tc.import_onnx(cuda.bn_to_affine(tc.fold_constants(conv_bn_model(channels=8, size=8, blocks=1))), fold=False)
    db_dir = tuning.db_dir_for(t.target_json(), tmp_path / "db")
    stats, kernels = [], []
    for _ in range(2):
        runner = FakeRunner()
        with t.target:
            ex, st = tuning.tune_and_build(mod, t.target, db_dir=db_dir, trials_per_task=1, work_dir=tmp_path,
                                           runner=runner)
        stats.append((st, runner.runs))
        kernels.append(_embedded_cuda_source(SimpleNamespace(handle=ex)))
    (first, runs1), (second, runs2) = stats
    # a workload's sampled schedules can all be rejected before building (no time for it): most must tune
    assert first.workloads_seen >= 3 and first.workloads_tuned >= first.workloads_seen - 1
    assert first.workloads_tuned + len(first.untuned_tasks) == first.workloads_seen and runs1 >= first.workloads_tuned
    # the second compile measures nothing it already has
    assert second.workloads_seen == first.workloads_seen and second.workloads_reused >= first.workloads_tuned
    assert runs2 <= len(first.untuned_tasks) and set(second.untuned_tasks) <= set(first.untuned_tasks)
    # both builds carry CUDA kernels with the database's schedules: the second the same as the first, and
    # not TVM's default (untuned) schedules
    assert all('extern "C" __global__' in k for k in kernels)
    assert kernels[1] == kernels[0]
    plain = cuda.CudaTarget(arch="sm_90").compile(conv_bn_model(channels=8, size=8, blocks=1), tmp_path / "plain")
    assert plain.info["tuned"] is False and _embedded_cuda_source(plain) != kernels[0]


@no_gpu_only
def test_cli_run_without_gpu_exits_4(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), p)
    res = run_cli("run", p, "--target", "cuda", "--target-opt", "arch=sm_90", "--budget", "2",
                  "--out", tmp_path / "o", timeout=300)
    assert res.returncode == 4, res.stderr
    assert "no CUDA device here" in res.stderr and "--target-opt tracker=HOST:PORT" in res.stderr


def test_import_does_not_import_tvm():
    code = ("import sys, graphopt.targets.cuda as c\nc.CudaTarget(arch='sm_90').options\n"
            "assert 'tvm' not in sys.modules, 'tvm imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------ on a GPU
@gpu_only
def test_gpu_numerics_match_onnxruntime(model, tmp_path):
    import onnxruntime as ort

    t = cuda.CudaTarget()  # arch detected from the local GPU
    t.check()
    assert t.arch.startswith("sm_")
    art = t.compile(model, tmp_path)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    (got,) = t.run_once(art, {"x": x})
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    m = t.measure(art, {"x": x})
    assert m.method == "measured" and m.tuned is False and m.latency.median_ms > 0
    assert "sm_" in m.device


@gpu_only
def test_gpu_exported_library_loads_and_runs(model, tmp_path):
    import tvm
    from tvm import relax

    t = cuda.CudaTarget()
    art = t.compile(model, tmp_path)
    (lib,) = t.export(art, tmp_path / "out")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cuda(0))
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    out = vm["main"](tvm.runtime.tensor(x, tvm.cuda(0)))
    (want,) = t.run_once(art, {"x": x})
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_nvcc_or_nvrtc_requirement_message(monkeypatch):
    monkeypatch.setattr(cuda, "has_nvrtc", lambda: False)
    monkeypatch.setattr(cuda, "has_nvcc", lambda: False)
    monkeypatch.delenv("TVM_CUDA_COMPILE_MODE", raising=False)
    with pytest.raises(UsageError, match="pip install cuda-bindings .*nvcc is on PATH"):
        cuda.CudaTarget(arch="sm_90")._setup_compiler()


def conv_clip_pad_dwconv_model() -> onnx.ModelProto:
    """1x1 Conv -> BN -> Clip(0, 6) -> Pad (bottom/right by 1) -> depthwise 3x3 stride-2 Conv, as in
    EfficientNet-Lite0: Relax fuses the Pad into the first conv's function, where TVM 0.27's dlight
    gpu.Matmul rule raises."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, arr, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(arr, dtype), name)

    inits = [init("w0", rng.standard_normal((16, 8, 1, 1)) * 0.3), init("s", rng.uniform(0.5, 1.5, 16)),
             init("b", rng.standard_normal(16) * 0.1), init("m", rng.standard_normal(16) * 0.1),
             init("v", rng.uniform(0.5, 2.0, 16)), init("w1", rng.standard_normal((16, 1, 3, 3)) * 0.3),
             init("lo", 0.0), init("hi", 6.0), init("pads", [0, 0, 0, 0, 0, 0, 1, 1], np.int64)]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
             helper.make_node("BatchNormalization", ["c0", "s", "b", "m", "v"], ["n0"], name="bn0"),
             helper.make_node("Clip", ["n0", "lo", "hi"], ["r0"], name="clip0"),
             helper.make_node("Pad", ["r0", "pads"], ["p0"], name="pad0"),
             helper.make_node("Conv", ["p0", "w1"], ["y"], name="dw", group=16, strides=[2, 2])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_dlight_rule_failure_falls_back_instead_of_failing(tmp_path):
    """EfficientNet-Lite0 hits this: without the guard the whole cuda build fails with
    "There are some consumers of the cache-write stage that are not properly inlined"."""

    m = conv_clip_pad_dwconv_model()
    t = cuda.CudaTarget(arch="sm_90")
    art = t.compile(m, tmp_path)  # raises CompileError without cuda._guarded
    fails = art.info.get("dlight_rule_failures", [])
    assert fails and all(f.startswith("Matmul: ") and "cache-write stage" in f for f in fails), fails
    assert "__global__" in _embedded_cuda_source(art)
    # unguarded (as compile_relax applies them), the same rules fail the whole build in TVM 0.27
    import tvm
    from graphopt.targets import tvm_common as tc

    mod = tc.import_onnx(cuda.bn_to_affine(m))  # what CudaTarget.compile imports
    with t.target, pytest.raises(Exception, match="cache-write stage"):
        tvm.compile(mod, target=t.target, relax_pipeline=cuda.default_pipeline(t.target, guard=False))


def test_bn_to_affine_matches_onnxruntime():
    import onnxruntime as ort

    m = conv_bn_model(channels=8, size=16, blocks=2)
    a = cuda.bn_to_affine(m)
    onnx.checker.check_model(a)
    assert [n.op_type for n in a.graph.node].count("BatchNormalization") == 0
    assert [n.op_type for n in m.graph.node].count("BatchNormalization") == 2  # the input is not modified
    assert {"bn0/affine/mul", "bn0/affine/add"} <= {n.name for n in a.graph.node}
    x = np.random.default_rng(2).standard_normal((4, 1, 3, 16, 16)).astype(np.float32)

    def run(model):
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.stack([s.run(None, {"x": xi})[0] for xi in x])

    np.testing.assert_allclose(run(a), run(m), rtol=1e-5, atol=1e-5)
    bare = onnx.ModelProto()
    bare.CopyFrom(m)
    for init in bare.graph.initializer:
        if init.name == "bn0_m":
            bare.graph.input.append(onnx.helper.make_tensor_value_info("bn0_m", onnx.TensorProto.FLOAT, [8]))
    bare.graph.initializer.remove(next(i for i in bare.graph.initializer if i.name == "bn0_m"))
    kept = cuda.bn_to_affine(bare)  # bn0's mean is a graph input now: bn0 stays, bn1 is rewritten
    assert [n.name for n in kept.graph.node if n.op_type == "BatchNormalization"] == ["bn0"]
