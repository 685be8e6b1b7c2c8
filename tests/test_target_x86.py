"""x86 target (TVM Relax + LLVM, untuned) on models of a few nodes built in code."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

if importlib.util.find_spec("tvm") is None:  # find_spec: importing tvm here would size its
    pytest.skip("apache-tvm not installed", allow_module_level=True)  # thread pool too early
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from graphopt.errors import CompileError, DataError  # noqa: E402

pytestmark = pytest.mark.tvm


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def conv_model() -> onnx.ModelProto:
    """Conv -> Relu -> Add(skip conv) -> GlobalAveragePool -> Flatten -> Gemm: two outputs."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.2  # noqa: E731
    inits = [
        numpy_helper.from_array(f(8, 3, 3, 3), "w1"),
        numpy_helper.from_array(f(8), "b1"),
        numpy_helper.from_array(f(8, 3, 1, 1), "w2"),
        numpy_helper.from_array(f(10, 8), "wg"),
        numpy_helper.from_array(f(10), "bg"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["r1", "c2"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["fl"], name="flatten"),
        helper.make_node("Gemm", ["fl", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10]),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )


@pytest.fixture(scope="module")
def target():
    from graphopt.targets.x86 import X86Target

    t = X86Target(threads=1, number=2, repeat=3)
    yield t
    t.close()


@pytest.fixture(scope="module")
def compiled(target, tmp_path_factory):
    model = conv_model()
    return model, target.compile(model, tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def x():
    return {"x": np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)}


def _ort(model, inputs):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def test_compile_matches_onnxruntime(target, compiled, x):
    model, art = compiled
    assert art.target == "x86"
    assert art.info["import_s"] > 0 and art.info["build_s"] > 0
    assert art.info["tuned"] is False
    got = target.run_once(art, x)
    want = _ort(model, x)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_measure(target, compiled, x):
    _, art = compiled
    m = target.measure(art, x)
    assert m.method == "measured" and m.tuned is False
    assert m.threads == 1
    assert m.latency.repeats == 3 and m.latency.runs_per_repeat == 2
    assert 0 < m.latency.min_ms <= m.latency.median_ms <= m.latency.max_ms
    assert "untuned" in m.extra["note"]
    assert m.to_dict()["latency"]["median_ms"] > 0


def test_measure_rejects_wrong_inputs(target, compiled):
    _, art = compiled
    with pytest.raises(DataError, match="shape"):
        target.measure(art, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(DataError, match="match"):
        target.measure(art, {"z": np.zeros((1, 3, 16, 16), np.float32)})


def test_export_is_loadable(target, compiled, x, tmp_path):
    import tvm
    from tvm import relax

    model, art = compiled
    paths = target.export(art, tmp_path)
    assert paths == [tmp_path / "model.so"] and paths[0].stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.so"]  # no temp file left
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(paths[0])), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x["x"]))
    np.testing.assert_allclose(y[0].numpy(), _ort(model, x)[0], rtol=1e-4, atol=1e-4)


def test_vm_exec_compiled_by_default_and_bytecode_on_request(target, compiled, x, tmp_path):
    """vm_exec: the model's main compiled to native code (the default) or interpreted bytecode; same outputs."""
    from graphopt.errors import UsageError
    from graphopt.targets.rpi4 import Rpi4Target
    from graphopt.targets.x86 import X86Target

    model, art = compiled
    assert target.options["vm_exec"] == "compiled" and "vm_tir_func" in art.handle.as_text()
    interp = X86Target(threads=1, vm_exec="bytecode")
    try:
        art_b = interp.compile(model, tmp_path)
        assert "vm_tir_func" not in art_b.handle.as_text() and "vm.builtin.alloc_storage" in art_b.handle.as_text()
        for a, b in zip(interp.run_once(art_b, x), target.run_once(art, x)):
            np.testing.assert_array_equal(a, b)
    finally:
        interp.close()
    with pytest.raises(UsageError, match="vm_exec='native': choose compiled or bytecode"):
        X86Target(threads=1, vm_exec="native")
    assert Rpi4Target.vm_exec == "bytecode"  # a device over RPC: the interpreted form, as before


def test_a_model_the_compiled_form_cannot_take_is_built_as_bytecode(monkeypatch, caplog):
    import logging

    from tvm import relax

    from graphopt.targets import tvm_common as tc

    real = relax.build

    def build(mod, target=None, *args, exec_mode="bytecode", **kw):
        if exec_mode == "compiled":
            raise RuntimeError("VMTIRCodegen: not supported here")
        return real(mod, target, *args, exec_mode=exec_mode, **kw)

    monkeypatch.setattr(relax, "build", build)
    bb = relax.BlockBuilder()
    v = relax.Var("v", relax.TensorType([2, 3], "float32"))
    with bb.function("main", [v]):
        bb.emit_func_output(bb.emit(relax.op.add(v, v)))
    with caplog.at_level(logging.WARNING, logger="graphopt.tvm"):
        ex = tc.build(bb.get(), "llvm", exec_mode="compiled")
    assert "vm_tir_func" not in ex.as_text()
    assert "vm_exec=compiled: the build failed (RuntimeError: VMTIRCodegen: not supported here); building " \
           "bytecode instead" in caplog.text


def test_export_after_a_run_prints_no_tvm_scope_warnings(target, x, tmp_path, capfd):
    """TVM 0.27 logs `Warning: Scope Saving:` for each constant when an executable that has run is
    saved (EfficientNet-Lite0: 102 lines at the end of every x86 run); export keeps stderr clean of them."""
    model = conv_model()
    art = target.compile(model, tmp_path / "w")
    target.run_once(art, x)
    capfd.readouterr()
    (path,) = target.export(art, tmp_path / "out")
    err = capfd.readouterr().err
    assert "Scope Saving" not in err, err[:300]
    from tvm import relax
    import tvm

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x["x"]))[0].numpy(), _ort(model, x)[0], rtol=1e-4, atol=1e-4)


def test_describe(target):
    d = target.describe()
    assert d["name"] == "x86" and d["tuned"] is False and d["threads"] == 1
    assert d["compiler"].startswith("tvm relax 0.")
    assert d["target"]["kind"] == "llvm" and d["target"]["mcpu"] == d["mcpu"] and d["mcpu"]
    assert d["target"]["num-cores"] == 1


def test_unsupported_op_names_the_op(target, tmp_path):
    m = _model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Celu", ["r"], ["y"], name="celu0")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [],
    )
    with pytest.raises(CompileError, match="Celu"):
        target.compile(m, tmp_path)


def test_constant_value_float(target, tmp_path):
    # TVM 0.27 reads only Constant(value) ("no value in Constant"); graphsurgeon folds
    # value_float to float64. normalize_constants fixes both.
    m = _model(
        [helper.make_node("Constant", [], ["c"], name="const0", value_float=2.0),
         helper.make_node("Mul", ["x", "c"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [],
    )
    art = target.compile(m, tmp_path)
    xx = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
    np.testing.assert_allclose(target.run_once(art, xx)[0], xx["x"] * 2)


def test_converter_failure_names_the_node(tmp_path):
    # Pad with a non-constant `pads` input: the importer of the pinned TVM (pyproject: apache-tvm==0.27.0.post1)
    # raises inside the Pad converter, and the CompileError names the op and the node
    from graphopt.targets import tvm_common as tc

    m = _model(
        [helper.make_node("Pad", ["x", "p"], ["y"], name="pad0")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("p", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [],
    )
    with pytest.raises(CompileError) as e:
        tc.import_onnx(m)
    msg = str(e.value)
    assert "Pad" in msg and "pad0" in msg, msg
    assert "\n" not in msg.strip(), msg  # one line


def test_dynamic_shape_is_a_compile_error(target, tmp_path):
    m = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [],
    )
    with pytest.raises(CompileError, match="static shape"):
        target.compile(m, tmp_path)


def test_registry_and_options():
    from graphopt.errors import UsageError
    from graphopt.registry import TARGETS
    from graphopt.targets.x86 import X86Target

    assert TARGETS.get("x86") is X86Target
    with pytest.raises(UsageError, match="unknown x86 target option"):
        X86Target(thread=2)
    with pytest.raises(UsageError):
        X86Target(threads=0)


def test_import_does_not_import_tvm():
    code = (
        "import sys, graphopt.targets.x86, graphopt.targets.tvm_common as tc\n"
        "tc.tvm_version(); graphopt.targets.x86.X86Target(threads=2)\n"
        "assert 'tvm' not in sys.modules, 'tvm imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
