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


def convert_layout(mod, layout: str, target, int8_kernels: str | None = None):
    """`mod` with its 2-D convolutions in `layout` ("nhwc": data NHWC, weights HWIO), by Relax's
    ConvertLayout (which inserts the transposes it needs at the model's edges, and between ops it
    cannot convert). Exact. HWIO, not OHWI: the x86 schedules vectorize an NHWC conv over its output
    channels, which OHWI puts outermost (each weight vector a strided gather; x1.8-1.9 per kernel,
    docs/compiler.md).

    The ONNX importer emits Clip (ReLU6) as `call_tir` to TOPI maximum/minimum kernels, which
    ConvertLayout cannot see through: it transposed back to NCHW around each of EfficientNet-Lite0's
    33 Clips (66 transposes; 13 stayed kernels of their own after fusion). `raise_elementwise` turns
    those calls into `R.maximum` / `R.minimum` first, so the whole conv chain stays NHWC.

    With `int8_kernels` given, a module with integer convs (lowered QDQ, `lower_qdq(nhwc=True)`) goes
    through targets/int8_nhwc.py instead (quantize/dequantize made elementwise, 1x1 convs packed after)."""
    from graphopt.targets import tvm_common as tc

    tc.load_tvm()
    from tvm import relax

    if int8_kernels is not None and layout == "nhwc" and 'out_dtype="int32"' in mod["main"].script(show_meta=False):
        from . import int8_nhwc

        return int8_nhwc.convert(mod, int8_kernels, lambda m: convert_layout(m, layout, target))[0]

    desired = {"nhwc": ["NHWC", "HWIO"]}[layout]
    mod, _ = raise_elementwise(mod)
    with target:
        return relax.transform.ConvertLayout({"relax.nn.conv2d": desired})(mod)


def raise_elementwise(mod):
    """(mod, n): `mod` with each `call_tir` to a binary maximum/minimum kernel replaced by the Relax
    op (`R.maximum` / `R.minimum`) whose legalization is that same kernel, n the calls replaced.

    Exact by construction: a call is replaced only when LegalizeOps of the Relax op on the call's
    argument types gives a PrimFunc whose body is structurally equal to the callee's; any other
    call_tir is left as it is. Kernels no longer called are removed."""
    from graphopt.targets import tvm_common as tc

    tc.load_tvm()
    import tvm_ffi
    from tvm import relax

    ops = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}
    legalized: dict[tuple, Any] = {}

    def legal_body(name, a_ty, b_ty):
        key = (name, str(a_ty), str(b_ty))
        if key not in legalized:
            bb = relax.BlockBuilder()
            x, c = relax.Var("x", a_ty), relax.Var("c", b_ty)
            with bb.function("main", [x, c]):
                bb.emit_func_output(bb.emit(ops[name](x, c)))
            funcs = [f for f in relax.transform.LegalizeOps()(bb.get()).functions.values()
                     if not isinstance(f, relax.Function)]
            legalized[key] = funcs[0].body if len(funcs) == 1 else None
        return legalized[key]

    @relax.expr_functor.mutator
    class _Raise(relax.PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.m, self.n = m, 0

        def visit_call_(self, call):
            op = getattr(call.op, "name", None)
            if op == "relax.call_tir" and len(call.args) >= 2 and hasattr(call.args[1], "fields"):
                gv, args = call.args[0], list(call.args[1].fields)
                name = next((k for k in ops if gv.name_hint.startswith(k)), None)
                if name and len(args) == 2 and len(call.args) == 2:
                    body = legal_body(name, args[0].ty, args[1].ty)
                    if body is not None and tvm_ffi.structural_equal(body, self.m[gv].body, map_free_vars=True):
                        self.n += 1
                        return ops[name](args[0], args[1])
            return super().visit_call_(call)

    mod = mod.clone()  # the caller's module stays as it was
    r = _Raise(mod)
    for gv, f in list(mod.functions.items()):
        if isinstance(f, relax.Function):
            mod[gv] = r.visit_expr(f)
    if r.n:
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod, r.n


def fast_sigmoid(x):
    """TE: 1 / (1 + fast_exp(-x)), the sigmoid fast_math uses (TOPI has no fast sigmoid)."""
    from tvm import te, topi

    e = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: 1.0 / (1.0 + e(*i)), name="T_fast_sigmoid")


FAST_MATH_OPS = ("relax.exp", "relax.erf", "relax.tanh", "relax.sigmoid", "relax.nn.softmax")


def fast_math(mod):
    """(mod, n): `mod` with its exp, erf, tanh, sigmoid and softmax computed by TOPI's fast_*
    polynomials (the rules of Relax's FastMathTransform, plus sigmoid as 1 / (1 + fast_exp(-x)),
    in one rewrite that also counts what it changed and leaves non-float32 calls alone), n the calls
    rewritten.

    LLVM lowers tir.exp / tir.erf on x86 to scalar libm calls: on this CPU erf over MiniLM's
    128x1536 GELU input took 2.4 ms single-threaded (fast_erf: 0.07 ms), exp 0.5 ms (fast_exp:
    0.08 ms), and libm's time depends on the values: on large values (MetaSchedule's runner fills
    every argument uniform in [1, 10), so a matmul's outputs are ~10^4) it was ~30% faster for erf
    and 3x slower for exp (scale 100), so the tuned records mis-stated those kernels in the model (bench/tvm_fast_math.py, docs/compiler.md). Not bit-exact: within 1e-6
    of onnxruntime over [-10, 10] (tests/test_tvm_prep.py); onnxruntime's MLAS uses the same kind
    of polynomials for its Erf, Gelu and Softmax. Only float32 calls are rewritten; an ONNX Gelu
    (relax.nn.gelu) keeps libm's erf."""
    from graphopt.targets import tvm_common as tc

    tc.load_tvm()
    from tvm import relax, topi

    rules = {"relax.exp": topi.fast_exp, "relax.erf": topi.fast_erf, "relax.tanh": topi.fast_tanh,
             "relax.sigmoid": fast_sigmoid}

    @relax.expr_functor.mutator
    class _Fast(relax.PyExprMutator):
        n = 0

        def visit_call_(self, call):
            name = getattr(call.op, "name", None)
            arg = call.args[0] if call.args else None
            if name in FAST_MATH_OPS and getattr(getattr(arg, "ty", None), "dtype", None) == "float32":
                self.n += 1
                if name == "relax.nn.softmax":
                    return self.builder_.call_te(topi.nn.fast_softmax, arg, call.attrs.axis)
                return self.builder_.call_te(rules[name], arg)
            return super().visit_call_(call)

    fast = _Fast(mod)
    for gv, f in list(mod.functions.items()):
        if isinstance(f, relax.Function):
            fast.builder_.update_func(gv, fast.visit_expr(f))
    if not fast.n:
        return mod, 0
    return fast.builder_.get(), fast.n
