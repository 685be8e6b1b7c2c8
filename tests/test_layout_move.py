"""Compiler-aware moves on the TVM CPU targets (issue 18): the `layout` pass (a hint in the model's
metadata that x86/rpi4 compile by) and the `prepack` target option (weights in the layout the
tuned schedules chose, transformed at build time). Both are exact: checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import conv_bn_model, float_init, make_model, matmul_model, run_ort_unoptimized
from graphopt.driver import materialize
from graphopt.errors import CompileError
from graphopt.exact import build_space
from graphopt.genotype import Genotype
from graphopt.modelio.hints import LAYOUT, get_hint, set_hint
from graphopt.modelio.ir import load_proto
from graphopt.passes.int8 import Int8Quantize
from graphopt.passes.layout import ConvLayout
from graphopt.plugin import MoveContext


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 16, 16)).astype(np.float32)


def test_one_whole_model_site_on_a_conv_net_and_none_without_convs():
    sites = ConvLayout().sites(load_proto(conv_bn_model(blocks=2)).graph())
    assert [(s.key, s.choices, s.exact_choice) for s in sites] == [("layout:*", ("keep", "nhwc"), "nhwc")]
    graph = load_proto(matmul_model()).graph()
    assert ConvLayout().sites(graph) == []
    assert ConvLayout().rejections(graph) == [("(graph)", "no 2-D Conv: the layout of nothing would change")]


def test_the_move_writes_the_hint_and_leaves_the_graph_as_it_was():
    loaded = load_proto(conv_bn_model(blocks=2))
    space = build_space({"layout": ConvLayout().sites(loaded.graph())})
    model, applied = materialize(loaded, space, Genotype({"layout:*exact": "nhwc"}), {"layout": ConvLayout()},
                                 MoveContext(loaded.proto))
    onnx.checker.check_model(model, full_check=True)
    assert applied == {"layout:*exact": "applied"} and get_hint(model, LAYOUT) == "nhwc"
    assert get_hint(loaded.proto, LAYOUT) is None  # the base model is not touched
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in loaded.proto.graph.node]
    np.testing.assert_array_equal(run_ort_unoptimized(model, {"x": _x()})[0],
                                  run_ort_unoptimized(loaded.proto, {"x": _x()})[0])


def test_the_hint_survives_int8s_whole_model_rewrite():
    """layout's finalize runs after int8's (stage 95 > 90), which builds a new model."""
    loaded = load_proto(conv_bn_model(blocks=2))
    passes = {"layout": ConvLayout(), "int8": Int8Quantize()}
    space = build_space({k: p.sites(loaded.graph()) for k, p in passes.items()})
    calib = {"x": np.stack([_x(s) for s in range(4)])}
    model, _ = materialize(loaded, space, Genotype({"layout:*exact": "nhwc", "int8:*": "all"}), passes,
                           MoveContext(loaded.proto, calibration=calib))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert get_hint(model, LAYOUT) == "nhwc"


@pytest.mark.tvm
def test_x86_compiles_by_the_hint_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("tvm")
    from graphopt.targets.x86 import X86Target

    model = conv_bn_model(blocks=2)
    hinted = onnx.ModelProto()
    hinted.CopyFrom(model)
    set_hint(hinted, LAYOUT, "nhwc")
    t = X86Target(threads=1, trials=0, layout="nchw")  # its own option is nchw: the hint wins
    assert 'data_layout="NHWC"' in t.relax_module(hinted).script()
    assert 'data_layout="NHWC"' not in t.relax_module(model).script()
    art = t.compile(hinted, tmp_path)
    assert art.info["layout"] == "nhwc"
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": _x()})[0]
    np.testing.assert_allclose(t.run_once(art, {"x": _x()})[0], want, rtol=1e-4, atol=1e-4)
    set_hint(hinted, LAYOUT, "nchw16c")
    with pytest.raises(CompileError, match="the model's graphopt.layout hint is 'nchw16c'; this target compiles "
                                           "nchw or nhwc"):
        t.compile(hinted, tmp_path)


def _relu6_net() -> onnx.ModelProto:
    """x -> Conv -> Clip(0, 6) -> depthwise Conv -> Clip(0, 6) -> 1x1 Conv -> y: MobileNet's block."""
    from onnx import helper

    rng = np.random.default_rng(3)
    inits = [float_init("w0", rng.standard_normal((8, 3, 3, 3)) * 0.5), float_init("b0", rng.standard_normal(8)),
             float_init("w1", rng.standard_normal((8, 1, 3, 3)) * 0.5), float_init("w2", rng.standard_normal((4, 8, 1, 1))),
             float_init("lo", 0.0), float_init("hi", 6.0)]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1], group=8),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"])]
    m = make_model(nodes, {"x": [1, 3, 16, 16]}, ["y"], inits)
    onnx.checker.check_model(m)
    return m


@pytest.mark.tvm
def test_nhwc_carries_the_layout_through_clip_and_matches_onnxruntime(tmp_path):
    """The importer's Clip is a call_tir to TOPI max/min, opaque to ConvertLayout: without
    tvm_prep.raise_elementwise every Clip sat between two transposes back to NCHW. With it the
    only transposes left are the model's input and output."""
    pytest.importorskip("tvm")
    from tvm import relax

    from graphopt.targets.x86 import X86Target

    model = _relu6_net()
    t = X86Target(threads=1, trials=0, layout="nhwc")
    folded = relax.transform.FoldConstant()(t.relax_module(model)).script()
    assert folded.count("R.permute_dims(") == 2, folded  # NCHW -> NHWC at the input, back at the output
    assert "R.maximum(" in folded and "R.minimum(" in folded and "call_tir" not in folded
    art = t.compile(model, tmp_path)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": _x()})[0]
    np.testing.assert_allclose(t.run_once(art, {"x": _x()})[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.tvm
def test_raise_elementwise_replaces_only_kernels_the_op_legalizes_to():
    """A call_tir is raised to R.maximum / R.minimum only when its kernel is exactly that op's
    legalization; a kernel named `maximum` that computes something else stays a call_tir, and
    the caller's module is not modified."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax, te, topi

    from graphopt.targets.tvm_prep import raise_elementwise

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    c = relax.Var("c", relax.TensorType((), "float32"))
    with bb.function("main", [x, c]):
        with bb.dataflow():
            a = bb.emit_te(topi.maximum, x, c)
            b = bb.emit_te(lambda t, s: te.compute(t.shape, lambda *i: te.max(t(*i), s()) + 1.0, name="T_maximum"),
                           a, c, primfunc_name_hint="maximum")
            out = bb.emit_output(bb.emit_te(topi.minimum, b, c))
        bb.emit_func_output(out)
    mod = bb.get()
    before = mod.script()
    raised, n = raise_elementwise(mod)
    assert n == 2
    text = raised.script()
    assert text.count("R.call_tir(") == 1 and "R.maximum(x, c)" in text and "R.minimum(" in text
    assert mod.script() == before
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((1, 4, 8, 8)).astype(np.float32), np.array(0.5, np.float32)]
    outs = []
    for m in (mod, raised):
        ex = relax.build(relax.transform.LegalizeOps()(m), "llvm")
        vm = relax.VirtualMachine(ex, tvm.cpu())
        outs.append(vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], np.minimum(np.maximum(args[0], 0.5) + 1.0, 0.5))


@pytest.mark.tvm
@pytest.mark.slow  # ~30-60 s of tuning on a quiet 2-core machine
def test_prepack_builds_on_packed_weights_in_its_own_database(tmp_path):
    pytest.importorskip("tvm")
    from graphopt.targets.x86 import X86Target

    model = matmul_model(k=128, n=128, rows=32)
    plain = X86Target(threads=2, trials=4, tuning_db=str(tmp_path / "db"))
    target = X86Target(threads=2, trials=4, tuning_db=str(tmp_path / "db"), prepack=1)
    assert target.tuning_db_dir.name == plain.tuning_db_dir.name + "-prepack"
    try:
        art = target.compile(model, tmp_path)
        st = art.info["tuning"]
        assert art.info["prepack"] is True and st["db"] == str(target.tuning_db_dir)
        assert st["workloads_tuned"] == st["workloads_seen"] == 1
        assert st["prepacked"] == 1, st  # the tuned matmul reads its weight in the layout its schedule chose
        x = np.random.default_rng(1).standard_normal((1, 32, 128)).astype(np.float32)
        want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(target.run_once(art, {"x": x})[0], want, rtol=1e-4, atol=1e-4)
        assert not plain.tuning_db_dir.exists()
    finally:
        target.close()
        plain.close()


def test_a_hint_is_part_of_the_candidates_identity():
    """Two candidates with the same graph, one with a layout hint, are not duplicates (the run
    store dedups by model_hash); a model without hints hashes as before (resumable stores)."""
    import hashlib

    from graphopt.modelio.graph_io import model_hash

    model = conv_bn_model(blocks=2)
    hinted = onnx.ModelProto()
    hinted.CopyFrom(model)
    set_hint(hinted, LAYOUT, "nhwc")
    assert model_hash(model) == hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()
    assert model_hash(hinted) != model_hash(model)


@pytest.mark.tvm
def test_the_x86_search_measures_the_layout_move(tmp_path):
    """passes=layout on x86 (untuned, layout=nchw: the default `auto` would compile this float conv
    net in NHWC anyway): the NHWC candidate is compiled and timed like any other (not a duplicate
    of the original); the winner's exported model carries the hint iff it chose it."""
    pytest.importorskip("tvm")
    from graphopt import optimize

    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(blocks=2), path)
    res = optimize(path, "x86", passes="layout", budget=3, out=tmp_path / "o",
                   target_options={"threads": 1, "trials": 0, "repeat": 3, "layout": "nchw"})
    assert res.exit_code == 0
    recs = {tuple(sorted(r.genotype.items())): r for r in res.records}
    nhwc = recs[(("layout:*exact", "nhwc"),)]
    assert nhwc.status == "ok" and nhwc.duplicate_of is None and nhwc.latency_ms > 0
    best = onnx.load(str(tmp_path / "o" / "best.onnx"))
    chose = dict(res.report["best"]["genotype"]).get("layout:*exact") == "nhwc"
    assert (get_hint(best, LAYOUT) == "nhwc") == chose
