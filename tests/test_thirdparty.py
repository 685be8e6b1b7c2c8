"""Models graphopt did not export (issue 14), each failure class on a tiny model built in code:
an already-int8 input model, int8 on an opset 11 model, an If whose branches hold an LSTM,
symbolic batch / dynamic dimensions, and --estimate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import conv_bn_model, run_cli
from graphopt.driver import Budget, RunConfig, run_search
from graphopt.errors import ModelError
from graphopt.reporting.inspection import inspect_model
from graphopt.modelio.ir import load_model


def _sess(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _cfg(path, out, **kw):
    kw.setdefault("passes", ["conv_bn"])
    kw.setdefault("allow_synthetic", True)  # robustness on synthetic inputs, data-dependent moves included
    return RunConfig(model=path, target="ort", budget=Budget(trials=kw.pop("trials", 2)), out=out, progress=False,
                     confirm_rounds=0, target_options={"repeat": 3, "number": 2, "warmup": 1}, **kw)


# ------------------------------------------------------------------- (a) an already-int8 model
def int8_input_model(tmp_path):
    """A conv net quantized by onnxruntime's quantize_dynamic: ConvInteger + DynamicQuantizeLinear
    + MatMulInteger, as shipped by packages that quantize before publishing."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(conv_bn_model(), src)
    quantize_dynamic(src, dst, weight_type=QuantType.QUInt8, op_types_to_quantize=["Conv", "Gemm", "MatMul"])
    m = onnx.load(dst)
    ops = {n.op_type for n in m.graph.node}
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= ops
    return dst


def test_int8_input_model_is_evaluated_as_the_original(tmp_path, monkeypatch):
    # ddddocr's int8 model cannot be re-exported (a Reshape after DynamicQuantizeLSTM leaves its graph
    # output without a shape: "materialize: ValidationError: Field 'shape' of 'type' is required"):
    # the original must not go through materialize's export at all
    import graphopt.modelio.ir

    def no_export(graph):
        raise onnx.checker.ValidationError("Field 'shape' of 'type' is required but missing.")

    monkeypatch.setattr(graphopt.modelio.ir, "export_graph", no_export)  # materialize imports it from there
    path = int8_input_model(tmp_path)
    res = run_search(_cfg(path, tmp_path / "out"))
    rep = res.report
    assert rep["baseline"]["status"] == "ok", rep["baseline"]["error"]
    assert rep["status"] == "ok" and res.exit_code == 0
    assert (tmp_path / "out" / "best.onnx").read_bytes() == path.read_bytes()


def test_inspect_says_why_quantized_nodes_are_left_alone(tmp_path):
    info = inspect_model(int8_input_model(tmp_path))
    for name, p in info["passes"].items():
        whys = [r["why"] for r in p["rejected"]]
        assert any(w.startswith("ConvInteger is already quantized") for w in whys), (name, whys)
        assert any(w.startswith("DynamicQuantizeLinear is already quantized") for w in whys), (name, whys)


# -------------------------------------------------------------- (b) int8 on an opset 11 model
def opset11_conv_net():
    m = conv_bn_model(blocks=2)
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", 11))
    m.ir_version = 6
    onnx.checker.check_model(m)
    return m


def _int8_all(tmp_path, trials=1):
    path = tmp_path / "op11.onnx"
    onnx.save(opset11_conv_net(), path)
    from graphopt.driver import Search
    from graphopt.genotype import Genotype

    s = Search(_cfg(path, tmp_path / "out", passes=["int8"]))
    s.setup()
    try:
        rec, _ = s.evaluate(Genotype({"int8:*": "all"}))
        from graphopt.driver import materialize

        model = materialize(s.base, s.space, Genotype({"int8:*": "all"}), s.passes, s.ctx)[0] \
            if rec.status != "failed" else None
    finally:
        s.store.close()
    return rec, model


def _dq_axes(model):
    return [a for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]


def test_int8_on_opset11_converts_the_opset(tmp_path, caplog):
    caplog.set_level("INFO", logger="graphopt")
    rec, model = _int8_all(tmp_path)
    assert rec.status in ("ok", "infeasible"), rec.error
    assert rec.fidelity is not None and rec.fidelity > 0.9
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 13
    assert _dq_axes(model), "per-channel weights after the opset conversion"
    assert "converted to opset 13 with onnx.version_converter" in caplog.text
    onnx.checker.check_model(model)


def test_int8_on_opset11_falls_back_to_per_tensor(tmp_path, caplog, monkeypatch):
    import onnx.version_converter

    def fail(model, version):
        raise RuntimeError("no adapter for this op")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    caplog.set_level("INFO", logger="graphopt")
    rec, model = _int8_all(tmp_path)
    assert rec.status in ("ok", "infeasible"), rec.error
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 11
    assert not _dq_axes(model)
    assert "quantizing weights per tensor" in caplog.text
    _sess(model)


# ------------------------------------------------------------ (c) If whose branches hold an LSTM
def if_lstm_model(xshape, channels=4, hidden=3) -> onnx.ModelProto:
    """torch's export of `x = x.squeeze(-1); if x.dim() != 2: x = x.unsqueeze(0); h = LSTM(x.unsqueeze(0))`
    (Silero VAD's decoder): If nodes whose branches differ in rank, the LSTMs inside the second If.
    With the last input dimension fixed to 1, onnxruntime's shape inference of the branch that does
    not run fails ("LSTM: First input tensor must have rank 3"); with it symbolic, it runs."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, channels)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R")]

    def vi(name, rank):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}_{i}" for i in range(rank)])

    squeeze = helper.make_graph([helper.make_node("Squeeze", ["x", "m1v"], ["ys"])], "squeeze", [], [vi("ys", 2)])
    keep = helper.make_graph([helper.make_node("Identity", ["x"], ["yi"])], "keep", [], [vi("yi", 3)])

    def lstm_branch(tag, unbatched):
        nodes = [helper.make_node("Unsqueeze", ["y", "zero_v"], [f"{tag}_u0"])]
        src = f"{tag}_u0"
        if unbatched:
            nodes.append(helper.make_node("Unsqueeze", [src, "zero_v"], [f"{tag}_u1"]))
            src = f"{tag}_u1"
        nodes += [helper.make_node("LSTM", [src, "W", "R"], [f"{tag}_Y", f"{tag}_h"], hidden_size=hidden),
                  helper.make_node("Squeeze", [f"{tag}_h", "zero_v"], [f"{tag}_out"])]
        return helper.make_graph(nodes, tag, [], [vi(f"{tag}_out", 2)])

    def const(name, v):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))

    nodes = [const("m1", -1), const("m1v", [-1]), const("zero_v", [0]), const("one", 1), const("two", 2),
             helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Gather", ["xs", "m1"], ["last"]),
             helper.make_node("Equal", ["last", "one"], ["c1"]),
             helper.make_node("If", ["c1"], ["y"], then_branch=squeeze, else_branch=keep),
             helper.make_node("Shape", ["y"], ["yshape"]), helper.make_node("Size", ["yshape"], ["rank"]),
             helper.make_node("Equal", ["rank", "two"], ["batched"]), helper.make_node("Not", ["batched"], ["c2"]),
             helper.make_node("If", ["c2"], ["h"], then_branch=lstm_branch("unbatched", True),
                              else_branch=lstm_branch("batched", False)),
             helper.make_node("Relu", ["h"], ["out"])]
    g = helper.make_graph(nodes, "if_lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
                          [vi("out", 2)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_if_lstm_model_loads_with_shape_and_keeps_its_results(tmp_path):
    path = tmp_path / "if_lstm.onnx"
    orig = if_lstm_model(["B", 4, "T"])
    onnx.save(orig, path)
    base = load_model(path, {"x": (1, 4, 1)})
    assert base.symbolic_inputs
    assert [s.shape for s in base.inputs] == [(1, 4, 1)]
    assert any("left symbolic" in n and "If/Loop" in n for n in base.notes)
    x = np.random.default_rng(1).standard_normal((1, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(_sess(base.proto).run(None, {"x": x})[0], _sess(orig).run(None, {"x": x})[0],
                               rtol=1e-6, atol=1e-6)
    res = run_search(_cfg(path, tmp_path / "out", shapes={"x": (1, 4, 1)}, passes=["conv_bn", "int8", "width"]))
    assert res.report["baseline"]["status"] == "ok", res.report["baseline"]["error"]


def test_error_blames_the_file_when_onnxruntime_cannot_run_it(tmp_path):
    # fixed at 1 in the file itself: onnxruntime refuses the file as given, graphopt changed nothing
    path = tmp_path / "bad.onnx"
    onnx.save(if_lstm_model([1, 4, 1]), path)
    with pytest.raises(ModelError, match="cannot run .* as given"):
        load_model(path)


def test_passes_skip_nodes_whose_outputs_a_subgraph_reads(tmp_path):
    # a conv whose output an If branch reads: no pass may rewrite it (it cannot update the branch)
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    branch = lambda tag: helper.make_graph(  # noqa: E731
        [helper.make_node("Relu" if tag == "a" else "Neg", ["c"], [f"o{tag}"])], tag, [],
        [helper.make_tensor_value_info(f"o{tag}", TensorProto.FLOAT, [1, 4, 8, 8])])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch("a"), else_branch=branch("b"))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                                       helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])
    m.ir_version = 8
    path = tmp_path / "if_conv.onnx"
    onnx.save(m, path)
    info = inspect_model(path, passes="width,kernel,int8")
    for name, p in info["passes"].items():
        assert not any("conv" in s["nodes"] for s in p["sites"]), name
    assert any("read inside an If/Loop/Scan subgraph" in r["why"] for r in info["passes"]["kernel"]["rejected"])


# ---------------------------------------------------------------- (d) dynamic batch and dims
def test_symbolic_batch_defaults_to_1_and_is_reported(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_bn_model(dynamic_batch=True), path)
    base = load_model(path)
    assert [s.shape for s in base.inputs] == [(1, 3, 16, 16)]
    assert base.defaulted_dims == [{"input": "x", "axis": 0, "dim": "N", "value": 1}]
    res = run_search(_cfg(path, tmp_path / "out"))
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["model"]["defaulted_dims"] == [{"input": "x", "axis": 0, "dim": "N", "value": 1}]
    assert res.exit_code == 0


def test_other_dynamic_dims_list_a_shape_flag_each(tmp_path):
    m = conv_bn_model(dynamic_batch=True)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    path = tmp_path / "hw.onnx"
    onnx.save(m, path)
    with pytest.raises(ModelError) as e:
        load_model(path)
    msg = str(e.value)
    assert "x[2] (height), x[3] (width): --shape x=1x3xHEIGHTxWIDTH" in msg and "\n" not in msg
    # inspect works without --shape: the dims are shown symbolic
    info = inspect_model(path)
    assert info["inputs"][0]["shape"] == [1, 3, "height", "width"]
    assert any("left symbolic" in n for n in info["notes"])
    # and the flag, filled in, works
    assert [s.shape for s in load_model(path, {"x": (1, 3, 16, 16)}).inputs] == [(1, 3, 16, 16)]


def test_cli_inspect_without_shape(tmp_path):
    m = conv_bn_model(dynamic_batch=True)
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    path = tmp_path / "w.onnx"
    onnx.save(m, path)
    r = run_cli("inspect", path)
    assert r.returncode == 0, r.stderr
    assert "x float32[1x3x16xW]" in r.stdout
    r = run_cli("run", path, "--target", "ort", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--shape x=1x3x16xW" in r.stderr


# ---------------------------------------------------------------------------- (e) --estimate
def test_estimate_flag(tmp_path, convbn_path):
    r = run_cli("run", convbn_path, "--target", "ort", "--estimate", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert "--estimate: target 'ort' has no cost model" in r.stderr and "rpi4" in r.stderr
    pytest.importorskip("tvm")
    r = run_cli("run", convbn_path, "--target", "rpi4", "--estimate", "--budget", "1", "--out", tmp_path / "e",
                "--json", "-q")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["latency_method"] == "estimated"


# ------------------------------------------- a crash from our own rewrite, found on PP-OCRv4 rec
def test_width_after_attention_move_does_not_crash(tmp_path):
    # PP-OCRv4's recogniser (SVTR): attention:*=window/linear/fused, then width on the same candidate
    # crashed in materialize (IndexError): the attention move leaves output-less nodes until cleanup,
    # and the width analysis read their outputs[0]
    from test_attention import classic_model

    from graphopt.driver import Search
    from graphopt.genotype import Genotype

    m = classic_model()  # attention block -> y; add an MLP after it, which width can prune
    hid = m.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    rng = np.random.default_rng(0)
    m.graph.initializer.extend([numpy_helper.from_array(rng.normal(0, 0.3, (hid, 32)).astype(np.float32), "mlp_w1"),
                                numpy_helper.from_array(rng.normal(0, 0.3, (32, hid)).astype(np.float32), "mlp_w2")])
    m.graph.node.extend([helper.make_node("MatMul", ["y", "mlp_w1"], ["h1"], name="/mlp1"),
                         helper.make_node("Relu", ["h1"], ["h1r"], name="/mlp_relu"),
                         helper.make_node("MatMul", ["h1r", "mlp_w2"], ["out"], name="/mlp2")])
    dims = [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, dims))
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    path = tmp_path / "attn.onnx"
    onnx.save(m, path)
    s = Search(_cfg(path, tmp_path / "out", passes=["attention", "width"]))
    s.setup()
    try:
        att = [x for x in s.space.sites if x.pass_name == "attention"]
        wid = [x for x in s.space.sites if x.pass_name == "width"]
        assert att and wid
        tried = 0
        for choice in att[0].choices[1:]:
            for w in wid:
                rec, _ = s.evaluate(Genotype({att[0].key: choice, w.key: w.choices[-1]}))
                assert rec.status != "failed" or "IndexError" not in (rec.error or ""), rec.error
                tried += 1
        assert tried
    finally:
        s.store.close()


def test_output_keeps_its_declared_shape_when_inference_loses_it(tmp_path, monkeypatch):
    # ddddocr's int8 model: symbolic shape inference stops at DynamicQuantizeLSTM and the loaded
    # graph output came back without a shape, so every candidate failed in materialize
    # ("ValidationError: Field 'shape' of 'type' is required but missing.")
    import graphopt.modelio.ir as ir

    def lossy(proto, notes):
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        for o in out.graph.output:
            o.type.tensor_type.ClearField("shape")
        notes.append("symbolic shape inference failed: Incomplete symbolic shape inference")
        return out

    monkeypatch.setattr(ir, "_has_unknown_dims", lambda proto: True)
    monkeypatch.setattr(ir, "_symbolic_shapes", lossy)
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), path)
    base = load_model(path)
    assert base.proto.graph.output[0].type.tensor_type.HasField("shape")
    onnx.checker.check_model(ir.export_graph(base.graph()))
