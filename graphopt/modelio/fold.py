"""Constant folding at load: Constant nodes as initializers, then onnx-graphsurgeon's folding
(graphopt.modelio.ir.load_model calls fold_constants; the TVM targets too, before importing a model).
graphopt.modelio.ir re-exports both public names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .graph_io import _gs_export, _initializers_as_inputs, import_graph

if TYPE_CHECKING:
    import onnx


_CONSTANT_ATTRS = {"value_float": "float32", "value_floats": "float32", "value_int": "int64", "value_ints": "int64"}


def normalize_constants(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """A copy with Constant(value_float/value_floats/value_int/value_ints) as Constant(value).

    TVM 0.27's importer only reads `value` ("no value in Constant"), and onnx-graphsurgeon
    folds value_float to a float64 tensor, which turns x*2.0 into a float32*float64 Mul.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    if not any(n.op_type == "Constant" and n.attribute and n.attribute[0].name in _CONSTANT_ATTRS
               for n in model.graph.node):
        return model
    out = type(model)()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name not in _CONSTANT_ATTRS:
            continue
        value = np.array(helper.get_attribute_value(attr), dtype=_CONSTANT_ATTRS[attr.name])
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))
    return out


def fold_constants(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """A copy of `model` with constant subgraphs folded (onnx-graphsurgeon + onnxruntime).

    TVM 0.27's importer cannot follow shape arithmetic it could fold: the torchscript export
    of EfficientNet-Lite0 (do_constant_folding=False) computes every Pad's pads through
    Shape/ConstantOfShape/Concat/Reshape, and from_onnx fails on that Reshape ("Reshape
    expects the input tensor to have known shape"). Folding leaves Conv/BN/activations alone
    (their inputs are not all constant), so the compiled graph is the candidate's graph.
    The folded model must pass strict ONNX type/shape inference; otherwise (or when folding
    fails) the model comes back with only its Constants normalized, and the importer reports
    what it cannot do.
    """
    model = _plain_pad_values(normalize_constants(model))
    try:
        import onnx

        graph = import_graph(_shape_slices_explicit(model))
        graph.fold_constants().cleanup().toposort()
        folded = _gs_export(graph)
        folded.ir_version = model.ir_version
        del folded.opset_import[:]
        folded.opset_import.extend(model.opset_import)
        onnx.shape_inference.infer_shapes(folded, check_type=True, strict_mode=True)
        return _initializers_as_inputs(folded)
    except Exception:  # noqa: BLE001 - folding is an optimisation of the import, not required
        return model


def _shape_slices_explicit(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """A copy with every Shape(x, start=, end=) written as Slice(Shape(x), [start], [end], [0]).

    onnx-graphsurgeon 0.6's shape folding ignores Shape's start/end attributes (opset 15): it folds
    Shape(x, start=1) of a [2, 3, 4] tensor to [2, 3, 4], not [3, 4], and folds a Gather or
    Slice of it from the wrong dimensions. The model then gives wrong results silently, or fails
    in onnxruntime when the wrongly sized shape reaches a Slice or Reshape (ONNX conformance:
    test_shape_start_*, test_group_normalization_*_expanded, test_causal_conv_with_state_*).
    Slice clamps start/end to [0, rank] (after adding rank to negatives) exactly as Shape does,
    and graphsurgeon folds a Shape -> Slice chain correctly. Subgraphs are rewritten too."""
    import onnx
    from onnx import helper, numpy_helper

    def has_sliced_shape(graph) -> bool:
        for n in graph.node:
            if n.op_type == "Shape" and n.domain in ("", "ai.onnx") and any(a.name in ("start", "end") for a in n.attribute):
                return True
            if any(has_sliced_shape(g) for a in n.attribute for g in ([a.g] if a.HasField("g") else list(a.graphs))):
                return True
        return False

    if not has_sliced_shape(model.graph):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    counter = [0]

    def rewrite(graph) -> None:
        nodes = []
        for n in graph.node:
            for a in n.attribute:
                for g in ([a.g] if a.HasField("g") else list(a.graphs)):
                    rewrite(g)
            attrs = {a.name: a.i for a in n.attribute}
            if n.op_type != "Shape" or n.domain not in ("", "ai.onnx") or not ({"start", "end"} & attrs.keys()):
                nodes.append(n)
                continue
            counter[0] += 1
            base = f"{n.output[0]}__graphopt_shape_slice{counter[0]}"
            full = n.__class__()
            full.CopyFrom(n)
            del full.attribute[:]
            full.output[0] = base + "_full"
            consts = []
            for what, value in (("starts", attrs.get("start", 0)), ("ends", attrs.get("end", 2**63 - 1)), ("axes", 0)):
                consts.append(helper.make_node("Constant", [], [f"{base}_{what}"], name=f"{base}_{what}",
                                               value=numpy_helper.from_array(np.array([value], np.int64))))
            nodes += [full, *consts, helper.make_node("Slice", [full.output[0]] + [c.output[0] for c in consts],
                                                      [n.output[0]], name=(n.name or base) + "_slice")]
        del graph.node[:]
        graph.node.extend(nodes)

    rewrite(out.graph)
    return out


def _plain_pad_values(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """A Pad's constant_value given as DequantizeLinear(constant), or DequantizeLinear(
    QuantizeLinear(constant)), replaced by its float value.

    onnxruntime's static quantizer quantizes a Pad's constant_value too (EfficientNet's static
    padding: DequantizeLinear(q=0 initializer, scale, zero point)). That keeps the Pad's constant
    inputs from folding, and TVM 0.27's importer then fails on the Pad ("'Call' object has no
    attribute 'value'"). The value is computed exactly as DequantizeLinear defines it, so the
    graph computes the same numbers."""
    import onnx
    from onnx import numpy_helper

    producers = {o: n for n in model.graph.node for o in n.output}
    consts = {i.name: i for i in model.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                   if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"})
    values: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "Pad" or len(node.input) < 3 or not node.input[2] or node.input[2] in values:
            continue
        dq = producers.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in consts for i in dq.input[1:] if i):
            continue
        if dq.input[0] in consts:
            q = numpy_helper.to_array(consts[dq.input[0]]).astype(np.float64)
        else:  # DequantizeLinear(QuantizeLinear(constant)): quantize it as ONNX defines (round half to even)
            qn = producers.get(dq.input[0])
            if qn is None or qn.op_type != "QuantizeLinear" or not all(i in consts for i in qn.input if i):
                continue
            qzp = numpy_helper.to_array(consts[qn.input[2]]) if len(qn.input) > 2 and qn.input[2] else np.uint8(0)
            info = np.iinfo(qzp.dtype)
            x = numpy_helper.to_array(consts[qn.input[0]]).astype(np.float64)
            q = np.clip(np.rint(x / numpy_helper.to_array(consts[qn.input[1]]).astype(np.float64))
                        + qzp.astype(np.float64), info.min, info.max)
        scale = numpy_helper.to_array(consts[dq.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(consts[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
        if q.size != 1 or np.size(scale) != 1:
            continue
        values[node.input[2]] = np.asarray(((q - zp) * scale).reshape(q.shape), dtype=np.float32)
    if not values:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "Pad" and len(node.input) > 2 and node.input[2] in values:
            node.input[2] = node.input[2] + "_value"
    for name, value in values.items():
        out.graph.initializer.append(numpy_helper.from_array(value, name + "_value"))
    return out
