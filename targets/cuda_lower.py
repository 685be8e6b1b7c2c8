"""Lowering helpers of the CUDA target (graphopt.targets.cuda): BatchNormalization folded to an
affine op for TVM, and the Relax pipeline with its per-rule guard (DLight GPU schedules).

Importing this module does not import tvm."""

from __future__ import annotations

from . import tvm_common as tc


def bn_to_affine(model):
    """Inference BatchNormalization nodes with constant parameters -> Mul + Add by per-channel
    constants computed here in numpy (scale = gamma / sqrt(var + eps), shift = beta - mean * scale).

    TVM's own route (DecomposeOpsForInference, then the zero pipeline's FoldConstant) evaluates the
    BN parameter arithmetic as dozens of small compiled functions: 40 s of an 80 s EfficientNet-Lite0
    build on the 2-core build box; this takes milliseconds, and Relax still fuses the Mul/Add into
    the conv kernel before them. Returns a new ModelProto (or `model` when there is no such BN).
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return model
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - without shapes, no BN is rewritten
        typed = model
    ranks: dict[str, int] = {}
    for vi in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    out_nodes, new_inits, changed = [], [], 0
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "BatchNormalization" or n.domain not in ("", "ai.onnx") or len(n.output) != 1
                or attrs.get("training_mode", 0) or not all(i in inits for i in n.input[1:5])
                or ranks.get(n.input[0], 0) < 2):
            out_nodes.append(n)
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in n.input[1:5])
        scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        shift = beta - mean * scale
        bshape = [-1] + [1] * (ranks[n.input[0]] - 2)
        dtype = numpy_helper.to_array(inits[n.input[1]]).dtype
        base = f"{n.name or n.output[0]}/affine"
        s_name, b_name, mid = f"{base}/scale", f"{base}/shift", f"{base}/scaled"
        new_inits += [numpy_helper.from_array(scale.reshape(bshape).astype(dtype), s_name),
                      numpy_helper.from_array(shift.reshape(bshape).astype(dtype), b_name)]
        out_nodes += [helper.make_node("Mul", [n.input[0], s_name], [mid], name=f"{base}/mul"),
                      helper.make_node("Add", [mid, b_name], [n.output[0]], name=f"{base}/add")]
        changed += 1
    if not changed:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.node[:]
    m.graph.node.extend(out_nodes)
    m.graph.initializer.extend(new_inits)
    return m


def _guarded(rule, failures: list[str] | None):
    """A dlight rule that declines (returns None) where the wrapped rule raises, so the next rule
    (at worst gpu.Fallback) schedules the function instead of the whole build failing."""
    from tvm.s_tir import dlight as dl

    class Guarded(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except Exception as e:  # noqa: BLE001 - a rule bug must not fail the model
                if failures is not None:  # (the PrimFunc has no name yet at this point)
                    failures.append(f"{type(rule).__name__}: {tc._first_line(e, 160)}")
                return None

    return Guarded()


def default_pipeline(target, failures: list[str] | None = None, guard: bool = True, decompose: bool = False):
    """The GPU pipeline: "zero" (legalize + fuse; applies the MetaSchedule database in context, if
    any), dlight default schedules for what is not scheduled yet, CUDA lowering. A dlight rule
    that raises on a function is skipped for it (and noted in `failures`).

    `decompose`: DecomposeOpsForInference + CanonicalizeBindings first, as targets.tuning.prepare
    does (needed for the tuning database's workload keys to match). Off by default: it splits
    BatchNormalization into constant subexpressions that zero's FoldConstant then evaluates one by
    one, which took 40 s of an 80 s EfficientNet-Lite0 build on the 2-core build box (13 s without).
    """
    tvm = tc.load_tvm()
    # tvm.relax.pipeline.dataflow_lower_passes(cuda target) raises AttributeError in 0.27: use the backend's own
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as rp
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            prep = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
            seq = tvm.transform.Sequential([
                *(prep if decompose else []),
                relax.get_pipeline("zero"),
                dl.ApplyDefaultSchedule(*((_guarded(r, failures) if guard else r) for r in (
                    dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()))),
                *rp.dataflow_lower_passes(target),
                *rp.finalize_passes(target),
            ])
            return seq(mod)

    return _pipeline
