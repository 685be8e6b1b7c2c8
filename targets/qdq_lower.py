"""Lower QDQ (fake-quantized) conv2d / matmul in a Relax module to integer arithmetic.

TVM 0.27's ONNX importer turns QuantizeLinear/DequantizeLinear into `R.quantize` /
`R.dequantize` and runs the conv or matmul between them in float32 (fake quantization, slower
than plain fp32). `lower_qdq(mod)` rewrites, in every Relax function,

    conv2d(dequantize(x_q, sx, zx), W)          W = dequantize(W_q, sw, 0) (per-channel or not),
    matmul(dequantize(x_q, sx, zx), W)          or permute_dims of it (a Gemm with transB=1),
                                                or a float constant that is exactly sw * W_q
into
    acc = conv2d(pad(x_q, zx), W_q, out_dtype="int32")     # int8/uint8 x int8 -> int32
    acc = acc - zx * sum(W_q)                                # zero-point correction (int32)
    y   = float32(acc) * (sx * sw)                           # back to the float domain

so the heavy loop multiplies integers. Whatever follows stays as the importer made it: a bias
add in float, and the next QuantizeLinear (`R.quantize`: scale, round, clip, cast) is the
requantize step; without one (the graph output, a float op) the result stays float.
The input is padded with its zero point explicitly (a zero in the float domain is `zx` in the
quantized one), so borders are exact; the conv itself then runs unpadded.

What is not lowered is left alone and counted in the stats with the reason (activation
quantized per channel, non-zero weight zero point, layouts other than NCHW/OIHW, ...).
Importing this module does not import tvm.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_INT_DTYPES = ("int8", "uint8")


def _np_const(expr) -> np.ndarray | None:
    """The value of a Relax constant (tvm.ir.expr.GenericConst in 0.27), else None."""
    import tvm

    const_types = tuple(t for t in (getattr(tvm.ir.expr, "GenericConst", None),
                                    getattr(tvm.relax, "Constant", None)) if t is not None)
    if isinstance(expr, const_types):
        data = getattr(expr, "value", None)
        data = data if hasattr(data, "numpy") else getattr(expr, "data", None)
        return data.numpy() if hasattr(data, "numpy") else None
    return None


def _ty(expr):
    """The tensor type of a Relax expr (`ty` in TVM 0.27, `struct_info` before)."""
    ty = getattr(expr, "ty", None)
    return ty if ty is not None else expr.struct_info


class _Dequant:
    """A dequantize(q, scale, zp, axis) call with a constant scale and zero point."""

    def __init__(self, q, scale: np.ndarray, zp: np.ndarray, axis: int):
        self.q, self.scale, self.zp, self.axis = q, scale, zp, axis


def _dtype(expr) -> str:
    """The element dtype of a tensor-typed expr ("" for shapes, tuples, ...)."""
    d = getattr(_ty(expr), "dtype", None)
    return "" if d is None else str(getattr(d, "dtype", d))


def _ndim(expr) -> int:
    return int(_ty(expr).ndim)


def lower_qdq(mod, kernels: str = "generic", nhwc: bool = False) -> tuple[Any, dict[str, Any]]:
    """(lowered IRModule, stats). stats: {"conv2d": n, "matmul": n, "packed": n, "skipped": {reason: n}}.

    Run it on the module `from_onnx` returns, before the default pipeline or tuning.
    Functions without dequantize are returned unchanged. `kernels`: "generic" emits Relax's
    integer conv2d/matmul; "avx2" emits matmuls with a constant weight and 1x1 convolutions
    (stride 1, no groups) as the packed int16-weight matmul of targets/x86_int8.py, which
    MetaSchedule tensorizes with `vpmaddwd` (count in stats["packed"]); other convs stay generic.
    "vnni" does the same, with the uint8-activation ones on `vpdpbusd` (count in stats["vnni"]).
    `nhwc`: the module is converted to NHWC next (targets/int8_nhwc.py), which packs the 1x1 convs
    itself, so they stay Relax convs here; and a padded conv takes x_q - zx (int16) with zero padding
    instead of an explicit pad with zx, an op ConvertLayout cannot carry (the same integers).
    """
    if kernels not in ("generic", "avx2", "vnni"):
        raise ValueError(f"kernels={kernels!r}: 'generic', 'avx2' or 'vnni'")
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    tvm_ir_op = tvm.ir.Op
    stats: dict[str, Any] = {"conv2d": 0, "matmul": 0, "packed": 0, "skipped": {}}

    def skip(why: str) -> None:
        stats["skipped"][why] = stats["skipped"].get(why, 0) + 1

    @mutator
    class _Lower(PyExprMutator):
        def __init__(self, mod_):
            super().__init__(mod_)
            self.mod_ = mod_

        # ---------------------------------------------------------------- matching helpers
        def _value(self, expr):
            """The bound value of a dataflow var (one level), else the expr itself."""
            if isinstance(expr, relax.Var):
                v = self.lookup_binding(expr)
                if v is not None:
                    return v
            return expr

        def _dequant(self, expr) -> _Dequant | None:
            call = self._value(expr)
            if not (isinstance(call, relax.Call) and isinstance(call.op, tvm_ir_op) and call.op.name == "relax.dequantize"):
                return None
            scale, zp = _np_const(call.args[1]), _np_const(call.args[2])
            if scale is None or zp is None:
                return None
            return _Dequant(call.args[0], scale.astype(np.float64), zp.astype(np.int64), int(call.attrs.axis))

        def _act(self, expr) -> tuple[Any, float, int] | str:
            """(x_q, sx, zx) for a per-tensor dequantized activation, else why not."""
            d = self._dequant(expr)
            if d is None:
                return "input is not dequantize(...)"
            if _dtype(d.q) not in _INT_DTYPES:
                return f"activation is {_dtype(d.q)}, not int8/uint8"
            if d.scale.size != 1 or d.zp.size != 1:
                return "activation quantized per channel"
            return d.q, float(d.scale.reshape(-1)[0]), int(d.zp.reshape(-1)[0])

        def _weight(self, expr, out_axis: int) -> tuple[np.ndarray, np.ndarray] | str:
            """(W_q int8 array, per-output-channel scale [n_out] float64) or why not.

            `out_axis`: the axis of W holding output channels (0 for OIHW, -1 for matmul)."""
            transpose = None
            val = self._value(expr)
            if isinstance(val, relax.Call) and isinstance(val.op, tvm_ir_op) and val.op.name == "relax.permute_dims":
                axes = val.attrs.axes
                transpose = None if axes is None else [int(a) for a in axes]
                if transpose is None:
                    transpose = list(range(_ndim(val.args[0])))[::-1]
                expr = val.args[0]
            d = self._dequant(expr)
            if d is not None:
                wq = _np_const(d.q)
                if wq is None or str(wq.dtype) != "int8":
                    return "weight is not a constant int8 tensor"
                if np.any(d.zp != 0):
                    return "weight zero point is not 0"
                scale = np.broadcast_to(d.scale.reshape(-1), (wq.shape[d.axis],)) if d.scale.size > 1 else None
                if scale is not None:
                    shp = [1] * wq.ndim
                    shp[d.axis] = -1
                    full = np.broadcast_to(scale.reshape(shp), wq.shape)
                else:
                    full = np.full(wq.shape, float(d.scale.reshape(-1)[0]))
            else:
                wf = _np_const(self._value(expr))
                if wf is None:
                    return "weight is neither dequantize(constant) nor a constant"
                if wf.dtype != np.float32:
                    return f"weight dtype {wf.dtype}"
                got = _requantize_folded(wf, out_axis if transpose is None else transpose[out_axis])
                if got is None:
                    return "float weight is not an exact int8 grid (not a folded dequantize)"
                wq, full = got
            if transpose is not None:
                wq, full = np.transpose(wq, transpose), np.transpose(full, transpose)
            ax = out_axis % wq.ndim
            moved = np.moveaxis(full, ax, 0).reshape(wq.shape[ax], -1)
            if not np.all(moved == moved[:, :1]):
                return "weight scale varies along a non-output axis"
            return np.ascontiguousarray(wq), moved[:, 0].copy()

        # ---------------------------------------------------------------------- rewrites
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm_ir_op):
                return call
            if call.op.name == "relax.nn.conv2d":
                out = self._conv(call)
            elif call.op.name == "relax.matmul":
                out = self._matmul(call)
            else:
                return call
            if isinstance(out, str):
                if out != "not quantized":
                    skip(f"{call.op.name.split('.')[-1]}: {out}")
                return call
            return out

        def _conv(self, call):
            a = call.attrs
            act = self._act(call.args[0])
            if isinstance(act, str):
                return "not quantized" if act == "input is not dequantize(...)" else act
            if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW":
                return f"layout {a.data_layout}/{a.kernel_layout} (only NCHW/OIHW)"
            if _dtype(call) != "float32":
                return f"output dtype {_dtype(call)}"
            w = self._weight(call.args[1], 0)
            if isinstance(w, str):
                return w
            xq, sx, zx = act
            wq, sw = w
            if kernels != "generic" and not nhwc and wq.shape[2:] == (1, 1) and int(a.groups) == 1 \
                    and all(int(v) == 1 for v in (*a.strides, *a.dilation)) and not any(int(p) for p in a.padding):
                return self._conv1x1_packed(xq, sx, zx, wq, sw)
            pad = [int(p) for p in a.padding]  # top, left, bottom, right
            bb = self.builder_
            x = xq
            shifted = nhwc and zx != 0 and any(pad)
            if shifted:
                x = bb.emit(relax.op.subtract(relax.op.astype(xq, "int16"), relax.const(zx, "int16")))
            elif zx != 0 and any(pad):
                x = bb.emit(relax.op.nn.pad(xq, [0, 0, 0, 0, pad[0], pad[2], pad[1], pad[3]], pad_value=float(zx)))
                pad = [0, 0, 0, 0]
            acc = bb.emit(relax.op.nn.conv2d(x, relax.const(wq, "int8"), strides=a.strides, padding=pad,
                                             dilation=a.dilation, groups=int(a.groups), data_layout="NCHW",
                                             kernel_layout="OIHW", out_layout="NCHW", out_dtype="int32"))
            if zx != 0 and not shifted:
                corr = (zx * wq.astype(np.int64).reshape(wq.shape[0], -1).sum(axis=1)).astype(np.int32)
                acc = bb.emit(relax.op.subtract(acc, relax.const(corr.reshape(1, -1, 1, 1), "int32")))
            scale = (sx * sw).astype(np.float32).reshape(1, -1, 1, 1)
            stats["conv2d"] += 1
            return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale, "float32"))

        def _matmul(self, call):
            if kernels != "generic" and _dtype(call) == "int32":
                return self._matmul_integer(call)
            act = self._act(call.args[0])
            if isinstance(act, str):
                return "not quantized" if act == "input is not dequantize(...)" else act
            if _dtype(call) != "float32":
                return f"output dtype {_dtype(call)}"
            if _ndim(call.args[1]) != 2:
                return "weight is not 2-D"
            w = self._weight(call.args[1], -1)
            if isinstance(w, str):
                return w
            xq, sx, zx = act
            wq, sw = w
            bb = self.builder_
            if kernels != "generic":
                acc = self._packed(xq, wq)
                stats["packed"] += 1
            else:
                acc = bb.emit(relax.op.matmul(xq, relax.const(wq, "int8"), out_dtype="int32"))
            if zx != 0:
                corr = (zx * wq.astype(np.int64).sum(axis=0)).astype(np.int32)
                acc = bb.emit(relax.op.subtract(acc, relax.const(corr, "int32")))
            stats["matmul"] += 1
            return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const((sx * sw).astype(np.float32), "float32"))

        def _const_eval(self, expr) -> np.ndarray | None:
            """The value of a constant expression of astype / subtract / expand_dims over constants."""
            expr = self._value(expr)
            val = _np_const(expr)
            if val is not None or not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm_ir_op)):
                return val
            name = expr.op.name
            args = [self._const_eval(a) for a in expr.args[:2 if name == "relax.subtract" else 1]]
            if any(a is None for a in args):
                return None
            if name == "relax.astype":
                return args[0].astype(str(expr.attrs.dtype))
            if name == "relax.subtract":
                return args[0] - args[1]
            if name == "relax.expand_dims":
                return np.expand_dims(args[0], tuple(int(a) for a in expr.attrs.axis))
            return None

        def _matmul_integer(self, call):
            """ONNX MatMulInteger as TVM imports it, matmul(astype(x, i32) - zx, astype(W, i32) - zw) with
            W and zw constant and x int8/uint8 (onnxruntime's quantize_dynamic): W - zw is packed as
            int16 (exact for any zero point) and zx (a runtime value) is corrected after."""
            a = self._value(call.args[0])
            zx = None
            if isinstance(a, relax.Call) and isinstance(a.op, tvm_ir_op) and a.op.name == "relax.subtract":
                a, zx = self._value(a.args[0]), a.args[1]
            if not (isinstance(a, relax.Call) and isinstance(a.op, tvm_ir_op) and a.op.name == "relax.astype"
                    and _dtype(a.args[0]) in _INT_DTYPES):
                return "integer matmul input is not a widened int8/uint8 tensor"
            if zx is not None and _ndim(zx) not in (0,) and int(_ty(zx).shape[-1]) != 1:
                return "activation zero point is not per tensor or per row"
            w = self._const_eval(call.args[1])
            if w is None or w.ndim != 2:
                return "integer matmul weight is not a constant matrix"
            if np.abs(w).max(initial=0) > 32767:
                return "integer matmul weight does not fit int16"
            bb = self.builder_
            acc = self._packed(a.args[0], w.astype(np.int64))
            if zx is not None:
                colsum = w.astype(np.int64).sum(axis=0).astype(np.int32)
                acc = bb.emit(relax.op.subtract(acc, relax.op.multiply(zx, relax.const(colsum, "int32"))))
            stats["matmul"] += 1
            stats["packed"] += 1
            return acc

        def _packed(self, xq, wq):
            acc, vnni = emit_packed(self.builder_, xq, wq, kernels)
            stats["vnni"] = stats.get("vnni", 0) + vnni
            return acc

        def _conv1x1_packed(self, xq, sx, zx, wq, sw):
            """A 1x1 conv as a matmul over channels in NHWC (acc[B, H, W, O]), its epilogue, then back to NCHW."""
            bb = self.builder_
            o = wq.shape[0]
            xt = bb.emit(relax.op.permute_dims(xq, [0, 2, 3, 1]))  # NHWC: a row per pixel
            acc = self._packed(xt, np.ascontiguousarray(wq[:, :, 0, 0].T))  # [B, H, W, O]
            if zx != 0:
                corr = (zx * wq.astype(np.int64).reshape(o, -1).sum(axis=1)).astype(np.int32)
                acc = bb.emit(relax.op.subtract(acc, relax.const(corr, "int32")))
            y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"),
                                          relax.const((sx * sw).astype(np.float32), "float32")))
            stats["conv2d"] += 1
            stats["packed"] += 1
            return relax.op.permute_dims(y, [0, 3, 1, 2])

    lower = _Lower(mod)
    changed = False
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        text = func.script(show_meta=False)
        if "R.dequantize" not in text and not (kernels != "generic" and 'out_dtype="int32"' in text):
            continue
        before = stats["conv2d"] + stats["matmul"]
        new = lower.visit_expr(func)
        if stats["conv2d"] + stats["matmul"] > before:
            new = relax.analysis.remove_all_unused(new)
            lower.builder_.update_func(gv, new)
            changed = True
    if not changed:
        return mod, stats
    return lower.builder_.get(), stats


def emit_packed(bb, xq, wq: np.ndarray, kernels: str) -> tuple[Any, bool]:
    """(int32 acc, on vpdpbusd?): acc = xq [..., K] @ wq [K, N] through x86_int8's packed matmul, on
    vpdpbusd (kernels "vnni") for a uint8 activation and weights within int8, else on vpmaddwd. No
    reshape around it (N a multiple of the tile's lanes: none at all), so the epilogue fuses into its PrimFunc."""
    from tvm import relax

    from . import x86_int8

    rank = _ndim(xq)
    k, n = wq.shape
    vnni = (kernels == "vnni" and _dtype(xq) == "uint8"
            and -128 <= int(wq.min(initial=0)) and int(wq.max(initial=0)) <= 127)
    tile = x86_int8.VNNI if vnni else x86_int8.AVX2
    group = tile[1]
    if k % group:
        xq = bb.emit(relax.op.nn.pad(xq, [0, 0] * (rank - 1) + [0, group - k % group], pad_value=0.0))
    acc = bb.emit_te(x86_int8.packed_matmul_te, xq, relax.const(x86_int8.pack_weight(wq, tile), tile[2]),
                     primfunc_name_hint="packed_int8_matmul")
    if int(_ty(acc).shape[-1]) != n:
        acc = bb.emit(relax.op.strided_slice(acc, axes=[rank - 1], begin=[0], end=[n]))
    return acc, vnni


def _requantize_folded(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Recover (W_q int8, full scale array) from a float weight that constant folding made out
    of dequantize(W_q, s) with a symmetric int8 scale (onnxruntime: s = max|W| / 127 per
    channel along `axis`, or per tensor). None unless every element lies on that grid."""
    ax = axis % w.ndim
    for per_channel in (True, False):
        if per_channel:
            absmax = np.abs(np.moveaxis(w, ax, 0).reshape(w.shape[ax], -1)).max(axis=1).astype(np.float64)
            shp = [1] * w.ndim
            shp[ax] = -1
            scale = np.broadcast_to((absmax / 127.0).reshape(shp), w.shape)
        else:
            scale = np.full(w.shape, float(np.abs(w).max()) / 127.0)
        safe = np.where(scale > 0, scale, 1.0)
        q = np.rint(w.astype(np.float64) / safe)
        if np.all(np.abs(q) <= 127) and np.allclose(q * safe, w, rtol=1e-6, atol=0.0):
            if np.any(np.abs(q - w / safe) > 1e-3):
                continue
            return q.astype(np.int8), scale.astype(np.float64)
    return None
