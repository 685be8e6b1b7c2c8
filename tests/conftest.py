"""Shared fixtures: tiny models built in code, and a CLI runner."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.testing import pass_contract

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models" / "efficientnet_lite0.onnx"
EXAMPLE_CALIB = ROOT / "models" / "efficientnet_lite0_calib.npz"

# TVM targets tune by default (minutes per model on 2 cores). Tests compile untuned unless a test
# asks for trials itself, and never touch the user's ~/.cache tuning databases. One database per
# pytest run, removed when it exits: subprocesses (run_cli), Ray workers and spawned children that
# import this module inherit it rather than each leaving a folder in /tmp (340 after a few runs).
os.environ["GRAPHOPT_TUNE_TRIALS"] = "0"
if "GRAPHOPT_TEST_TUNING_DB" not in os.environ:
    os.environ["GRAPHOPT_TEST_TUNING_DB"] = tempfile.mkdtemp(prefix="graphopt-test-tuning-")
    atexit.register(shutil.rmtree, os.environ["GRAPHOPT_TEST_TUNING_DB"], True)
os.environ["GRAPHOPT_TUNING_DB"] = os.environ["GRAPHOPT_TEST_TUNING_DB"]


def _const(name: str, arr: np.ndarray):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def float_init(name: str, arr) -> onnx.TensorProto:
    """A float32 initializer."""
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def make_model(nodes, inputs: dict[str, list[int]], outputs: list[str], inits) -> onnx.ModelProto:
    """Float graph at opset 17 (IR 8); output shapes filled in by onnx shape inference."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def conv_bn_model(channels: int = 8, size: int = 16, blocks: int = 2, seed: int = 0,
                  dynamic_batch: bool = False) -> onnx.ModelProto:
    """x -> [Conv -> BN -> Relu] * blocks -> GlobalAveragePool -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    cin, cur = 3, "x"
    for b in range(blocks):
        w, bn = f"w{b}", f"bn{b}"
        inits += [_const(w, rng.standard_normal((channels, cin, 3, 3)) * 0.3),
                  _const(f"{bn}_s", rng.uniform(0.5, 1.5, channels)), _const(f"{bn}_b", rng.standard_normal(channels) * 0.1),
                  _const(f"{bn}_m", rng.standard_normal(channels) * 0.1), _const(f"{bn}_v", rng.uniform(0.5, 2.0, channels))]
        nodes += [helper.make_node("Conv", [cur, w], [f"c{b}"], name=f"conv{b}", pads=[1, 1, 1, 1]),
                  helper.make_node("BatchNormalization", [f"c{b}", f"{bn}_s", f"{bn}_b", f"{bn}_m", f"{bn}_v"],
                                   [f"n{b}"], name=f"bn{b}", epsilon=1e-5),
                  helper.make_node("Relu", [f"n{b}"], [f"r{b}"], name=f"relu{b}")]
        cin, cur = channels, f"r{b}"
    inits += [_const("fc_w", rng.standard_normal((10, channels)) * 0.3), _const("fc_b", rng.standard_normal(10) * 0.1)]
    nodes += [helper.make_node("GlobalAveragePool", [cur], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    batch = "N" if dynamic_batch else 1
    g = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphopt-tests")
    m.ir_version = 8  # not the newest onnx's IR: an older onnxruntime (1.30 on the GPU host) refuses IR 14
    onnx.checker.check_model(m)
    return m


def file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def convbn_path(tmp_path: Path) -> Path:
    p = tmp_path / "convbn.onnx"
    onnx.save(conv_bn_model(), p)
    return p


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `graphopt` entry point in a subprocess (what a build system sees)."""
    return subprocess.run([sys.executable, "-m", "graphopt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def example_model() -> Path:
    """The bundled example (EfficientNet-Lite0 + real calibration images), built on first use."""
    if not (EXAMPLE.exists() and EXAMPLE_CALIB.exists()):
        subprocess.run([sys.executable, str(ROOT / "models" / "efficientnet_lite0.py")], check=True, cwd=ROOT)
    return EXAMPLE


# shared by test_depthwise and test_kernel
def net_model(seed: int = 0) -> onnx.ModelProto:
    """stem conv -> relu -> [dilated conv -> BN] + residual -> (depthwise || grouped 5x5) -> Concat
    -> strided conv -> SAME_UPPER conv -> 1x1 conv -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)

    def w(*shape):  # fan-in scaled, so activations stay O(1) and float32 error stays small
        return rng.normal(0, 1.0 / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 else 0.1, shape)

    inits = [
        float_init("stem_w", w(8, 4, 3, 3)), float_init("stem_b", w(8)),
        float_init("blk_w", w(8, 8, 3, 3)),
        float_init("bn_g", rng.uniform(0.5, 1.5, 8)), float_init("bn_b", w(8)), float_init("bn_m", w(8)),
        float_init("bn_v", rng.uniform(0.5, 2.0, 8)),
        float_init("dw_w", w(8, 1, 3, 3)), float_init("dw_b", w(8)),
        float_init("grp_w", w(8, 4, 5, 5)),
        float_init("down_w", w(16, 16, 3, 3)), float_init("down_b", w(16)),
        float_init("same_w", w(16, 16, 3, 3)),
        float_init("proj_w", w(12, 16, 1, 1)),
        float_init("fc_w", w(10, 12)), float_init("fc_b", w(10)),
    ]
    mk = helper.make_node
    nodes = [
        mk("Conv", ["x", "stem_w", "stem_b"], ["s"], name="/stem", pads=[1, 1, 1, 1]),
        mk("Relu", ["s"], ["a"], name="/stem_relu"),
        mk("Conv", ["a", "blk_w"], ["bc"], name="/block/conv", pads=[2, 2, 2, 2], dilations=[2, 2]),
        mk("BatchNormalization", ["bc", "bn_g", "bn_b", "bn_m", "bn_v"], ["bn"], name="/block/bn"),
        mk("Add", ["a", "bn"], ["res"], name="/block/add"),
        mk("Conv", ["res", "dw_w", "dw_b"], ["c"], name="/dw", group=8, pads=[1, 1, 1, 1]),
        mk("Conv", ["res", "grp_w"], ["d"], name="/grouped", group=2, pads=[2, 2, 2, 2]),
        mk("Concat", ["c", "d"], ["cat"], name="/concat", axis=1),
        mk("Conv", ["cat", "down_w", "down_b"], ["e"], name="/down", strides=[2, 2], pads=[1, 1, 1, 1]),
        mk("Relu", ["e"], ["er"], name="/down_relu"),
        mk("Conv", ["er", "same_w"], ["f"], name="/same", auto_pad="SAME_UPPER"),
        mk("Conv", ["f", "proj_w"], ["g"], name="/proj"),
        mk("GlobalAveragePool", ["g"], ["gap"], name="/gap"),
        mk("Flatten", ["gap"], ["flat"], name="/flatten"),
        mk("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="/fc", transB=1),
    ]
    return make_model(nodes, {"x": [2, 4, 12, 12]}, ["logits", "f"], inits)


# onnxruntime without its graph optimizations, and seeded random inputs: the pass contract's own
run_ort_unoptimized, random_feeds = pass_contract.run_unoptimized, pass_contract.random_feeds


def embedding_model(vocab: int = 1000, dim: int = 64, seq: int = 16):
    """ids [1, seq] int64 -> Gather(table [vocab, dim]) -> [1, seq, dim]: an embedding lookup."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((vocab, dim)).astype(np.float32), "table")
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)], "emb",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])], [table])
    return onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def matmul_model(k: int = 32, n: int = 16, rows: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x[1,rows,k] @ W[k,n] + b: one TVM tuning workload (fused matmul+add)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    inits = [float_init("W", rng.standard_normal((k, n)) * 0.1), float_init("b", rng.standard_normal(n))]
    return make_model(nodes, {"x": [1, rows, k]}, ["y"], inits)
