"""targets/x86_int8.py: the AVX2 vpmaddwd and AVX-512 VNNI vpdpbusd int8 kernels, and QDQ lowered
onto them (kernels="avx2" / "vnni").

Checked: the weight packing (both tiles); that MetaSchedule's space tensorizes every packed matmul
of a lowered QDQ model (1x1 convs and matmuls, N and K not multiples of the tile) with the
intrinsic; that the lowered model matches onnxruntime's QDQ semantics exactly, untuned and tuned;
that "vnni" takes only uint8 activations with int8-range weights (the rest stays on vpmaddwd); and
that the x86 target's tuned code contains vpmaddwd / vpdpbusd.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from conftest import float_init, make_model, matmul_model, run_ort_unoptimized
from onnx import helper

pytest.importorskip("tvm")

from graphopt.errors import UsageError
from graphopt.passes.int8 import quantize
from graphopt.targets import tvm_common as tc
from graphopt.targets import x86_int8
from graphopt.targets.qdq_lower import lower_qdq


def pointwise_net(seed: int = 0) -> onnx.ModelProto:
    """x[1,16,6,6] -> Conv 1x1 (16->20) -> Relu -> Conv 3x3 (20->8) -> GAP -> Flatten -> MatMul [8,13]
    -> MatMul [13,10] -> y[1,10]: two packed matmuls with N % 8 != 0, one with odd K, and a 3x3 conv
    that stays on the generic integer conv2d."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="pw0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c1"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "wm"], ["m"], name="mm"),
             helper.make_node("MatMul", ["m", "wn"], ["y"], name="mm2")]
    inits = [float_init("w0", rng.standard_normal((20, 16, 1, 1)) * 0.3), float_init("b0", rng.standard_normal(20) * 0.1),
             float_init("w1", rng.standard_normal((8, 20, 3, 3)) * 0.2), float_init("b1", rng.standard_normal(8) * 0.1),
             float_init("wm", rng.standard_normal((8, 13)) * 0.3), float_init("wn", rng.standard_normal((13, 10)) * 0.3)]
    return make_model(nodes, {"x": [1, 16, 6, 6]}, ["y"], inits)


def _calib(n: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 1, 16, 6, 6)).astype(np.float32)}


def _host_target(threads: int = 1):
    mcpu = tc.host_mcpu()
    return tc.llvm_target(mcpu, threads, mattr=list(tc.host_mattr(mcpu)))


def _ort_qdq(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    """ONNX QDQ semantics evaluated exactly (graph optimizations off: no QLinear fusion)."""
    return run_ort_unoptimized(model, feed)[0]


needs_avx2 = pytest.mark.skipif(not x86_int8.available(_host_target()), reason="this CPU has no AVX2")
needs_vnni = pytest.mark.skipif(not x86_int8.vnni_available(_host_target()), reason="this CPU has no AVX-512 VNNI")


@pytest.fixture(scope="module", params=["uint8", "int8"])
def qdq(request) -> onnx.ModelProto:
    return quantize(pointwise_net(), _calib(), None, activations=request.param, reduce_range=False)


def test_pack_weight_layout():
    w = np.random.default_rng(0).integers(-127, 128, size=(5, 11)).astype(np.int8)  # K=5 (odd), N=11
    bp = x86_int8.pack_weight(w)
    assert bp.dtype == np.int16 and bp.shape == (2, 3, 8, 2)  # ceil(11/8), ceil(5/2), 8, 2
    for k in range(6):
        for j in range(16):
            want = int(w[k, j]) if k < 5 and j < 11 else 0
            assert bp[j // 8, k // 2, j % 8, k % 2] == want
    bv = x86_int8.pack_weight(w, x86_int8.VNNI)
    assert bv.dtype == np.int8 and bv.shape == (1, 2, 16, 4)  # ceil(11/16), ceil(5/4), 16, 4
    for k in range(8):
        for j in range(16):
            assert bv[j // 16, k // 4, j % 16, k % 4] == (int(w[k, j]) if k < 5 and j < 11 else 0)


def test_avx2_lowering_packs_matmuls_and_1x1_convs(qdq):
    low, stats = lower_qdq(tc.import_onnx(qdq, lower_int8=False), kernels="avx2")
    assert stats["packed"] == 3 and stats["conv2d"] == 2 and stats["matmul"] == 2 and stats["skipped"] == {}, stats
    packed = [f for gv, f in low.functions.items() if gv.name_hint.startswith("packed_int8_matmul")]
    assert len(packed) == 3
    for f in packed:  # activation (uint8/int8) x int16 packed weight -> int32; nothing in float
        assert [str(p.dtype) for p in f.params][1:] == ["int16", "int32"]
        assert str(f.params[0].dtype) in ("uint8", "int8")
    with pytest.raises(ValueError, match="kernels='amx'"):
        lower_qdq(tc.import_onnx(qdq, lower_int8=False), kernels="amx")


def test_vnni_lowering_takes_uint8_activations_and_matches_onnxruntime_exactly(qdq):
    """kernels="vnni": a uint8 activation's packed matmuls get int8 weights in the 16x4 tile
    (vpdpbusd multiplies uint8 by int8); an int8 activation's stay in the AVX2 tile (int16). The
    untuned build is onnxruntime's QDQ result exactly on any CPU (the intrinsic is only in tuned code)."""
    mod = tc.import_onnx(qdq, lower_int8=False)
    low, stats = lower_qdq(mod, kernels="vnni")
    uint8 = "uint8" in {str(f.params[0].dtype) for gv, f in low.functions.items()
                        if gv.name_hint.startswith("packed_int8_matmul")}
    assert stats["packed"] == 3 and stats["vnni"] == (3 if uint8 else 0), stats
    weights = [f.params[1] for gv, f in low.functions.items() if gv.name_hint.startswith("packed_int8_matmul")]
    assert {str(w.dtype) for w in weights} == ({"int8"} if uint8 else {"int16"})
    if uint8:
        assert all(int(w.shape[2]) == 16 and int(w.shape[3]) == 4 for w in weights)
    tvm = tc.load_tvm()
    ex = tc.build(tc.import_onnx(qdq, int8_kernels="vnni"), tvm.target.Target({"kind": "llvm"}))
    for x in _calib(3, seed=7)["x"]:
        np.testing.assert_allclose(tc.run_vm(ex, tvm.cpu(), [x])[0], _ort_qdq(qdq, {"x": x}), rtol=0, atol=1e-6)


def test_vnni_keeps_weights_outside_int8_on_the_avx2_tile():
    """A MatMulInteger whose weight minus zero point leaves int8 (uint8 weights, zero point 0) cannot
    run on vpdpbusd; it is packed for vpmaddwd (int16) and computes the same as TVM's own import."""
    rng = np.random.default_rng(4)
    w = rng.integers(0, 256, size=(24, 20)).astype(np.uint8)
    w[0, 0] = 255
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq"),
             helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["acc"], name="mmi"),
             helper.make_node("Cast", ["acc"], ["accf"], to=onnx.TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["accf", "xs"], ["y"], name="scale")]
    model = make_model(nodes, {"x": [1, 8, 24]}, ["y"], [onnx.numpy_helper.from_array(w, "w")])
    mod = tc.import_onnx(model, lower_int8=False)
    low, stats = lower_qdq(mod, kernels="vnni")
    assert stats["packed"] == 1 and stats["vnni"] == 0, stats
    tvm = tc.load_tvm()
    llvm = tvm.target.Target({"kind": "llvm"})
    x = rng.standard_normal((1, 8, 24)).astype(np.float32)
    np.testing.assert_array_equal(tc.run_vm(tc.build(low, llvm), tvm.cpu(), [x])[0],
                                  tc.run_vm(tc.build(mod, llvm), tvm.cpu(), [x])[0])


def test_avx2_lowering_matches_onnxruntime_exactly_untuned(qdq):
    """Integer arithmetic is exact: the lowered model gives onnxruntime's QDQ result (no schedule,
    so this holds on any CPU; the intrinsic is only used by tuned code)."""
    tvm = tc.load_tvm()
    ex = tc.build(tc.import_onnx(qdq, int8_kernels="avx2"), tvm.target.Target({"kind": "llvm"}))
    for x in _calib(3, seed=7)["x"]:
        np.testing.assert_allclose(tc.run_vm(ex, tvm.cpu(), [x])[0], _ort_qdq(qdq, {"x": x}), rtol=0, atol=1e-6)


@needs_avx2
def test_every_packed_task_is_tensorized_with_vpmaddwd(qdq):
    """MetaSchedule's space (x86_int8.space) tiles each fused packed-matmul task and tensorizes its
    8x2 tile with the intrinsic in every design space; other tasks are scheduled as by default."""
    import tvm.s_tir.meta_schedule as ms

    from graphopt.targets import tuning

    tgt = _host_target()
    _, fused = tuning.prepare(tc.import_onnx(qdq, int8_kernels="avx2"), tgt)
    tasks = ms.relax_integration.extract_tasks(fused, tgt)
    seen = 0
    for t in tasks:
        mod = t.dispatched[0]
        ctx = ms.TuneContext(mod=mod, target=tgt, space_generator=x86_int8.space(tgt), task_name=t.task_name,
                             rand_state=0)
        assert len(ctx.space_generator.postprocs) == len(ms.Postproc.create("llvm")) + 2  # tensorize, parallel check
        spaces = ctx.space_generator.generate_design_space(mod)
        assert spaces
        kept = [sch for sch in spaces if all(p.apply(sch) for p in ctx.space_generator.postprocs)]
        assert kept, t.task_name  # a design space the postprocs reject is redrawn when tuning
        for sch in kept:
            tensorized = "llvm.x86.avx2.pmadd.wd" in sch.mod.script()
            assert tensorized == ("packed_int8_matmul" in t.task_name), t.task_name
        seen += "packed_int8_matmul" in t.task_name
    assert seen == 3


@needs_avx2
def test_single_threaded_packed_schedules_are_rejected():
    """The space's last postproc redraws a schedule that leaves the packed matmul on one thread of
    a multi-core target (MetaSchedule's search kept outer tiles of 1 on MiniLM)."""
    import tvm.s_tir.meta_schedule as ms
    from tvm import te
    from tvm.s_tir import Schedule

    tvm = tc.load_tvm()
    a = te.placeholder((32, 16), "uint8", name="A")
    bp = te.placeholder((2, 8, 8, 2), "int16", name="Bp")
    func = te.create_prim_func([a, bp, x86_int8.packed_matmul_te(a, bp)])
    mod = tvm.IRModule({"main": func})
    check = x86_int8._parallel_postproc(ms)(2)  # as for a 2-core target
    sch = Schedule(mod)
    assert check.apply(sch) is False  # 2 cores, no parallel loop
    i, j, k = sch.get_loops(sch.get_sblock("packed_int8_matmul"))
    sch.parallel(i)
    assert check.apply(sch) is True
    assert x86_int8._parallel_postproc(ms)(1).apply(Schedule(mod)) is True  # one core: nothing to ask


@needs_avx2
def test_x86_target_tunes_int8_into_vpmaddwd(tmp_path):
    """The x86 target end to end: QDQ import, lowering onto the packed kernel, MetaSchedule tuning
    (2 trials per workload into a fresh database) and the build from the database. The machine
    code multiplies with vpmaddwd, or with vpdpwssd (AVX-512 VNNI's vpmaddwd + vpaddd in one
    instruction: LLVM fuses them where the CPU has it fast, e.g. znver5), and the result is
    onnxruntime's QDQ result."""
    from graphopt.targets.x86 import X86Target

    calib = {"x": np.random.default_rng(1).standard_normal((8, 1, 16, 64)).astype(np.float32)}
    q = quantize(matmul_model(k=64, n=32, rows=16), calib, None, activations="uint8", reduce_range=False)
    t = X86Target(trials=2, threads=1, tuning_db=str(tmp_path / "db"), int8_kernels="avx2")
    assert t.int8_kernels == "avx2"
    art = t.compile(q, tmp_path)
    st = art.info["tuning"]
    assert st["workloads_tuned"] >= 1 and not st["untuned_tasks"], st
    asm = _sources(art.handle.mod)
    assert "vpmaddwd" in asm or "vpdpwssd" in asm
    assert "vpdpbusd" not in asm  # int8_kernels=avx2: the int16 tile, not VNNI's uint8 x int8 one
    x = calib["x"][0]
    np.testing.assert_allclose(t.run_once(art, {"x": x})[0], _ort_qdq(q, {"x": x}), rtol=0, atol=1e-5)


@needs_vnni
def test_x86_target_tunes_uint8_int8_into_vpdpbusd(tmp_path):
    """On a CPU with AVX-512 VNNI the x86 target's default (int8_kernels=auto) lowers a uint8 QDQ
    matmul onto the VNNI tile; tuned (2 trials), its machine code multiplies with vpdpbusd, and the
    result is onnxruntime's QDQ result."""
    from graphopt.targets.x86 import X86Target

    calib = {"x": np.random.default_rng(1).standard_normal((8, 1, 16, 62)).astype(np.float32)}
    q = quantize(matmul_model(k=62, n=40, rows=16), calib, None, activations="uint8", reduce_range=False)
    t = X86Target(trials=2, threads=1, tuning_db=str(tmp_path / "db"))
    assert t.int8_kernels == "vnni"
    art = t.compile(q, tmp_path)
    st = art.info["tuning"]
    assert st["workloads_tuned"] >= 1 and not st["untuned_tasks"], st
    assert "vpdpbusd" in _sources(art.handle.mod)
    x = calib["x"][0]
    np.testing.assert_allclose(t.run_once(art, {"x": x})[0], _ort_qdq(q, {"x": x}), rtol=0, atol=1e-5)


def _sources(mod) -> str:
    out = []
    try:
        out.append(mod.inspect_source("asm"))
    except Exception:  # noqa: BLE001 - a module without assembly (the VM's own)
        pass
    for sub in getattr(mod, "imports", []):
        out.append(_sources(sub))
    return "\n".join(out)


def test_int8_kernels_option_is_checked():
    from graphopt.targets.x86 import X86Target

    with pytest.raises(UsageError, match="int8_kernels='amx'.*auto.*vnni.*avx2.*generic"):
        X86Target(int8_kernels="amx")
    assert X86Target(int8_kernels="generic").int8_kernels == "generic"
    host = _host_target()
    want = "vnni" if x86_int8.vnni_available(host) else "avx2" if x86_int8.available(host) else "generic"
    assert X86Target().int8_kernels == want  # auto: the best the CPU has


@pytest.mark.parametrize("per_channel", [True, False])
def test_matmul_integer_from_quantize_dynamic_is_packed(per_channel):
    """onnxruntime's quantize_dynamic form (DynamicQuantizeLinear -> MatMulInteger with a runtime
    activation zero point; per-column weight zero points when per-channel) is lowered onto the
    packed kernel too (odd K here): the same numbers as TVM's own import and the ONNX reference.
    (onnxruntime itself with graph optimizations off is 5% off on the per-channel form, so it is
    not the reference here.)"""
    from onnx.reference import ReferenceEvaluator

    from graphopt.passes.int8 import quantize_dynamic_nodes

    q = quantize_dynamic_nodes(matmul_model(k=63, n=20, rows=16), ["mm"], per_channel=per_channel,
                               reduce_range=False)
    assert "MatMulInteger" in [n.op_type for n in q.graph.node]
    mod = tc.import_onnx(q, lower_int8=False)
    low, stats = lower_qdq(mod, kernels="avx2")
    assert stats["packed"] == 1 and stats["matmul"] == 1, stats
    assert lower_qdq(mod)[1]["packed"] == 0  # generic kernels leave MatMulInteger as TVM imports it
    tvm = tc.load_tvm()
    llvm = tvm.target.Target({"kind": "llvm"})
    x = np.random.default_rng(3).standard_normal((1, 16, 63)).astype(np.float32)
    got = tc.run_vm(tc.build(low, llvm), tvm.cpu(), [x])[0]
    np.testing.assert_array_equal(got, tc.run_vm(tc.build(mod, llvm), tvm.cpu(), [x])[0])
    np.testing.assert_allclose(got, ReferenceEvaluator(q).run(None, {"x": x})[0], rtol=0, atol=1e-4)
