"""Exact rewrites of a model before the TVM CPU targets import it (docs/compiler.md, the
2026-11-28 section).

onnxruntime folds BatchNormalization into the Conv before it and a zero constant Pad into the
Conv after it at session creation. TVM 0.27's Relax import does neither: each BN becomes a
per-element subtract/divide/multiply/add epilogue of its conv kernel (DecomposeOpsForInference),
and each Pad a kernel of its own that copies the activation. On EfficientNet-Lite0 that is 49 BNs
and 17 Pads, 47 MetaSchedule workloads instead of 35: more to tune, and more work per run.
`canonicalize()` does both folds in ONNX (graphopt's exact conv_bn rewrite and the Pad fold that
int8 uses, passes/_int8_prep.py), so the tuned target is compared with onnxruntime on the same graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx


def canonicalize(model: "onnx.ModelProto") -> tuple["onnx.ModelProto", dict[str, Any]]:
    """(model with BN and zero Pads folded into its convs, {"bn_folded": n, "pads_folded": m}).

    Exact (the folds are checked against onnxruntime by tests/test_int8_prep.py and the conv_bn
    tests). The given model is not modified; a model with nothing to fold is returned as is."""
    from graphopt.passes._int8_prep import prepare

    def count(m, op: str) -> int:
        return sum(1 for n in m.graph.node if n.op_type == op)

    out = prepare(model)
    return out, {"bn_folded": count(model, "BatchNormalization") - count(out, "BatchNormalization"),
                 "pads_folded": count(model, "Pad") - count(out, "Pad")}


def convert_layout(mod, layout: str, target):
    """`mod` with its 2-D convolutions in `layout` ("nhwc": data NHWC, weights OHWI), by Relax's
    ConvertLayout (which inserts the transposes it needs at the model's edges, and between ops it
    cannot convert). Exact."""
    from graphopt.targets import tvm_common as tc

    tc.load_tvm()
    from tvm import relax

    desired = {"nhwc": ["NHWC", "OHWI"]}[layout]
    with target:
        return relax.transform.ConvertLayout({"relax.nn.conv2d": desired})(mod)
