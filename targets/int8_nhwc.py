"""Lowered int8 (QDQ) models in NHWC on x86: no transposes between the layers.

In NCHW each packed 1x1 conv (targets/qdq_lower.py) computes in NHWC between two transposes, and
those transposes were the top workload of tuned int8 EfficientNet-Lite0 (docs/compiler.md).
Relax's ConvertLayout cannot carry `R.quantize` / `R.dequantize` or `nn.pad`, so converting the
lowered module as it is made it worse (150 transposes). `convert(mod, kernels, to_nhwc)`, for a
module `lower_qdq(..., nhwc=True)` made (padded convs take x_q - zx with zero padding, 1x1 convs left
as Relax convs):

1. `decompose_qdq`: each per-tensor quantize / dequantize with constant parameters becomes the
   elementwise ops its legalization computes (quantize: clip(round(x / s) + zp) cast; dequantize:
   float(int32(q) - zp) * s), which ConvertLayout carries;
2. ConvertLayout to NHWC / HWIO (`to_nhwc`: targets/tvm_prep.convert_layout, which calls this
   module for an integer module), then FoldConstant (the weights' transposes);
3. `pack_1x1`: each NHWC 1x1 integer conv (stride 1, one group, constant weight) becomes the packed
   matmul of targets/x86_int8.py over its pixels (vpdpbusd / vpmaddwd), no reshape or transpose.

Exact: the same integer arithmetic. Importing this module does not import tvm.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def convert(mod, kernels: str, to_nhwc: Callable[[Any], Any]) -> tuple[Any, dict[str, int]]:
    """(NHWC module, stats {"decomposed": n, "packed": n}); `to_nhwc` converts a float-style module."""
    from graphopt.targets import tvm_common as tc

    tc.load_tvm()
    from tvm import relax

    mod, n_dec = decompose_qdq(mod)
    mod = to_nhwc(mod)
    mod = relax.transform.FoldConstant()(mod)
    mod, n_packed = pack_1x1(mod, kernels) if kernels != "generic" else (mod, 0)
    return mod, {"decomposed": n_dec, "packed": n_packed}


def _rewrite(mod, visit_call) -> tuple[Any, int]:
    """`mod` with every Relax function's calls passed through visit_call(mutator, call) -> new expr or
    None (unchanged); n the calls rewritten."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    count = [0]

    @mutator
    class _M(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            new = visit_call(self, call)
            if new is None:
                return call
            count[0] += 1
            return new

    m = _M(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            m.builder_.update_func(gv, relax.analysis.remove_all_unused(m.visit_expr(func)))
    return (m.builder_.get() if count[0] else mod), count[0]


def decompose_qdq(mod) -> tuple[Any, int]:
    """Per-tensor R.quantize / R.dequantize with constant scale and zero point -> elementwise ops."""
    from tvm import relax

    from .qdq_lower import _np_const

    def visit(_m, call):
        name = getattr(call.op, "name", "")
        if name not in ("relax.quantize", "relax.dequantize"):
            return None
        s, z = _np_const(call.args[1]), _np_const(call.args[2])
        if s is None or z is None or s.size != 1 or z.size != 1:
            return None
        x, sc = call.args[0], relax.const(np.float32(s.reshape(())), "float32")
        if name == "relax.quantize":
            dt = str(call.attrs.out_dtype)
            info = np.iinfo(dt)
            y = relax.op.add(relax.op.round(relax.op.divide(x, sc)), relax.const(np.float32(z.reshape(())), "float32"))
            y = relax.op.maximum(relax.op.minimum(y, relax.const(np.float32(info.max), "float32")),
                                 relax.const(np.float32(info.min), "float32"))
            return relax.op.astype(y, dt)
        if str(call.attrs.out_dtype) != "float32":
            return None
        d = relax.op.subtract(relax.op.astype(x, "int32"), relax.const(np.int32(z.reshape(())), "int32"))
        return relax.op.multiply(relax.op.astype(d, "float32"), sc)

    return _rewrite(mod, visit)


def pack_1x1(mod, kernels: str) -> tuple[Any, int]:
    """NHWC 1x1 integer convs with a constant HWIO weight -> x86_int8's packed matmul."""
    from .qdq_lower import _dtype, _np_const, emit_packed

    def visit(m, call):
        if getattr(call.op, "name", "") != "relax.nn.conv2d":
            return None
        a = call.attrs
        w = _np_const(call.args[1])
        if (str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "HWIO" or str(a.out_layout) != "NHWC"
                or str(a.out_dtype) != "int32" or _dtype(call.args[0]) not in ("uint8", "int8") or w is None
                or w.shape[:2] != (1, 1) or int(a.groups) != 1 or any(int(p) for p in a.padding)
                or any(int(v) != 1 for v in (*a.strides, *a.dilation))):
            return None
        acc, _ = emit_packed(m.builder_, call.args[0], w[0, 0].astype(np.int64), kernels)
        return acc

    return _rewrite(mod, visit)
