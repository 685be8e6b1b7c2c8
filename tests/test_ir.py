"""graphopt/modelio/ir.py: the load path, the one door a user's file comes through.

Every way a file can be wrong is a ModelError (exit 2) whose one line names the problem and the
fix; the file and the caller's ModelProto are only read. (Shape/If/Loop folding is tested with
the control-flow work, not here.)
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import conv_bn_model, file_sha, float_init, run_cli
from graphopt.errors import ModelError, UsageError
from graphopt.modelio.ir import load_model, load_proto, model_hash, parse_shape


def _relu_model(input_shape, name: str = "x") -> onnx.ModelProto:
    """x -> Relu -> y; input_shape None: x declares no shape at all (the output's is symbolic)."""
    vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, input_shape)
    out_shape = input_shape if input_shape is not None else ["a", "b"]
    g = helper.make_graph([helper.make_node("Relu", [name], ["y"], name="relu")], "g", [vi],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _ort(model: onnx.ModelProto, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


# ------------------------------------------------------------------------------ bad files
def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelError, match=r"^model file not found: .*nope\.onnx$"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is a directory; pass the path of an .onnx file"):
        load_model(tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty\.onnx is empty; export the model again"):
        load_model(p)


@pytest.mark.parametrize("content", ["text", "truncated"])
def test_not_onnx_or_truncated(tmp_path, content):
    p = tmp_path / "m.onnx"
    if content == "text":
        p.write_text("[build-system]\nrequires = ['setuptools']\n")
    else:  # a real model cut in the middle of its weights
        data = conv_bn_model().SerializeToString()
        p.write_bytes(data[: len(data) // 2])
    sha = file_sha(p)
    with pytest.raises(ModelError) as e:
        load_model(p)
    msg = str(e.value)
    assert "is not a readable ONNX model" in msg and "torch.onnx.export" in msg and "\n" not in msg, msg
    assert file_sha(p) == sha


def test_protobuf_that_is_not_a_model(tmp_path):
    """A valid protobuf of another kind (a tensor) parses as an empty ModelProto: still refused, by name."""
    p = tmp_path / "tensor.onnx"
    p.write_bytes(float_init("w", np.ones((2, 2))).SerializeToString())
    with pytest.raises(ModelError, match="has no nodes|not a readable ONNX model"):
        load_model(p)


def test_model_failing_the_checker_or_onnxruntime(tmp_path):
    m = _relu_model([1, 4])
    m.graph.node[0].input[0] = "undefined"  # reads a tensor nothing produces
    with pytest.raises(ModelError, match=r"^model fails onnx\.checker: "):
        load_proto(m)
    m = _relu_model([1, 4])
    m.graph.node[0].op_type = "Frobnicate"
    m.graph.node[0].domain = "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    p = tmp_path / "custom.onnx"
    onnx.save(m, p)
    with pytest.raises(ModelError, match=r"onnxruntime cannot run .*custom\.onnx.*(Frobnicate|com\.example)"):
        load_model(p)
    assert load_model(p, check_runtime=False).proto.graph.node[0].op_type == "Frobnicate"


def test_cli_bad_file_is_one_line_exit_2(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_text("not a model")
    res = run_cli("run", p, "--target", "ort", "--out", tmp_path / "o")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is not a readable ONNX model" in lines[0] and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------- shapes
def test_input_without_shape_needs_shape_flag():
    m = _relu_model(None)
    with pytest.raises(ModelError, match=r"input 'x' has no declared shape; give one with --shape x=D1xD2x\.\.\."):
        load_proto(m)
    loaded = load_proto(m, shapes={"x": (2, 5)})
    assert [(i.name, i.shape, i.dtype) for i in loaded.inputs] == [("x", (2, 5), np.dtype(np.float32))]
    x = -np.arange(10, dtype=np.float32).reshape(2, 5)
    np.testing.assert_array_equal(_ort(loaded.proto, {"x": x})[0], np.maximum(x, 0))
    assert not m.graph.input[0].type.tensor_type.HasField("shape")  # the caller's proto is untouched


def test_shape_flag_fixes_dynamic_dims_and_is_checked():
    m = _relu_model(["N", 3, "H", 8])
    loaded = load_proto(m, shapes={"x": (4, 3, 6, 8)})
    assert loaded.inputs[0].shape == (4, 3, 6, 8)
    dims = loaded.proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 3, 6, 8] and not any(d.dim_param for d in dims)
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim] == ["N", "", "H", ""]
    with pytest.raises(UsageError, match=r"--shape names input 'y', but the model's inputs are \['x'\]"):
        load_proto(m, shapes={"y": (1, 3, 6, 8)})
    with pytest.raises(UsageError, match=r"--shape x=1x3x6: input 'x' has rank 4 \(\[N, 3, H, 8\]\)"):
        load_proto(m, shapes={"x": (1, 3, 6)})
    with pytest.raises(UsageError, match=r"dimension 1 of 'x' is fixed at 3 in the model"):
        load_proto(m, shapes={"x": (1, 4, 6, 8)})


def test_parse_shape():
    assert parse_shape("input=1x3x224x224") == ("input", (1, 3, 224, 224))
    assert parse_shape("a=b=2X3") == ("a=b", (2, 3))  # the last '=' splits; X as well as x
    for bad, why in (("1x3", "expected NAME=D1xD2"), ("=1x3", "expected NAME=D1xD2"),
                     ("x=1xN", "must be integers"), ("x=1x0", "must be positive")):
        with pytest.raises(UsageError, match=why):
            parse_shape(bad)


# ------------------------------------------------------------------------- external data
def _save_external(model: onnx.ModelProto, path) -> None:
    model = onnx.ModelProto.FromString(model.SerializeToString())  # save_model moves a proto's weights out in place
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)


def test_model_with_external_data_loads_its_weights(tmp_path):
    m = conv_bn_model()
    p = tmp_path / "ext.onnx"
    _save_external(m, p)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 1000
    onnx_sha, data_sha = file_sha(p), file_sha(tmp_path / "ext.onnx.data")
    loaded = load_model(p)
    assert all(t.data_location != TensorProto.EXTERNAL for t in loaded.proto.graph.initializer)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_ort(loaded.proto, {"x": x})[0], _ort(m, {"x": x})[0], rtol=1e-5, atol=1e-6)
    assert loaded.sha256 == onnx_sha  # the model's identity is its file
    assert file_sha(p) == onnx_sha and file_sha(tmp_path / "ext.onnx.data") == data_sha  # only read


def test_external_data_file_missing(tmp_path):
    p = tmp_path / "ext.onnx"
    _save_external(conv_bn_model(), p)
    (tmp_path / "ext.onnx.data").rename(tmp_path / "elsewhere.data")
    with pytest.raises(ModelError, match=r"ext\.onnx: external weight data could not be loaded .*keep the \.data "
                                         r"file next to the model"):
        load_model(p)


# ------------------------------------------------------------------------------ node names
def test_unnamed_and_duplicate_nodes_get_unique_deterministic_names():
    nodes = [helper.make_node("Relu", ["x"], ["a"]),                      # unnamed
             helper.make_node("Neg", ["a"], ["b"], name="Relu_0"),        # takes the name the Relu would get
             helper.make_node("Relu", ["b"], ["c"], name="dup"),
             helper.make_node("Relu", ["c"], ["d"], name="dup"),          # a duplicate name
             helper.make_node("Abs", ["d"], ["y"])]                       # unnamed
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    names = [n.name for n in load_proto(m).proto.graph.node]
    assert len(names) == 5 and all(names) and len(set(names)) == 5, names
    # unnamed: "<op>_<index>"; a clash (with a given or a generated name) gets "__<n>", first come first served
    assert names == ["Relu_0", "Relu_0__1", "dup", "dup__1", "Abs_4"]
    assert names == [n.name for n in load_proto(m).proto.graph.node]  # the same names every load
    assert [n.name for n in m.graph.node] == ["", "Relu_0", "dup", "dup", ""]  # the caller's proto is untouched
    # the site keys of a pass are these names: the graph view has them too
    assert sorted(n.name for n in load_proto(m).graph().nodes) == sorted(names)


def test_loading_never_edits_the_file_or_the_proto(tmp_path):
    m = conv_bn_model()
    m.graph.node[0].name = ""
    before = m.SerializeToString()
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    sha = file_sha(p)
    a, b = load_model(p), load_proto(m)
    assert m.SerializeToString() == before and file_sha(p) == sha
    assert a.sha256 == sha and model_hash(a.proto) == model_hash(b.proto)
    assert a.output_names == ["logits"] and a.inputs[0].shape == (1, 3, 16, 16)
