"""onnx-graphsurgeon in and out: import a model as a gs.Graph, export a graph back as a checked
ModelProto (keeping what graphsurgeon drops), and small graph helpers. graphopt.modelio.ir re-exports
every public name here.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs


def import_graph(proto: "onnx.ModelProto") -> "gs.Graph":
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    _keep_non_tensor_types(proto.graph, graph, graph)
    return graph


def _subgraphs(node_proto):
    for a in node_proto.attribute:
        if a.HasField("g"):
            yield a.name, a.g


def _keep_non_tensor_types(gp, graph, top) -> None:
    """What onnx-graphsurgeon's IR drops, kept for export_graph: the full type of every value
    that is not a plain tensor (optional(seq(tensor)), optional(tensor), map: graphsurgeon
    keeps only an element type, and its exporter crashes on an optional output with
    UnboundLocalError), and TYPE_PROTO attributes (Optional's `type`, which it skips). Without
    them `If` branches returning an Optional cannot be exported (ONNX conformance: test_if_opt).
    Walks subgraphs; graphsurgeon imports nodes in proto order."""
    types = top.__dict__.setdefault("_graphopt_value_types", {})
    for vi in list(gp.input) + list(gp.output) + list(gp.value_info):
        if vi.type.WhichOneof("value") not in ("tensor_type", None):
            types[vi.name] = vi.type
    if len(gp.node) != len(graph.nodes):
        return
    for pn, gn in zip(gp.node, graph.nodes):
        for a in pn.attribute:
            if a.type == a.TYPE_PROTO and a.name not in gn.attrs:
                gn.attrs[a.name] = a.tp
        for name, sub in _subgraphs(pn):
            if name in gn.attrs and hasattr(gn.attrs[name], "nodes"):
                _keep_non_tensor_types(sub, gn.attrs[name], top)


def _graphs(graph):
    yield graph
    for node in graph.nodes:
        for v in node.attrs.values():
            if hasattr(v, "nodes") and hasattr(v, "inputs"):
                yield from _graphs(v)


def _gs_export(graph: "gs.Graph") -> "onnx.ModelProto":
    """gs.export_onnx, with the non-tensor value types import_graph kept put back."""
    import onnx_graphsurgeon as gs

    types = graph.__dict__.get("_graphopt_value_types", {})
    hidden = []  # values graphsurgeon cannot write a type for: exported untyped, typed afterwards
    for g in _graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Variable) and t.dtype is not None and (
                    t.name in types or getattr(t, "type", "tensor_type") not in ("tensor_type", "sequence_type")):
                hidden.append((t, t.dtype))
                t.dtype = None
    try:
        model = gs.export_onnx(graph, do_type_check=not hidden)
    finally:
        for t, dtype in hidden:
            t.dtype = dtype
    if types or hidden:
        _restore_types(model.graph, types)
    return model


def _restore_types(gp, types) -> None:
    for vi in list(gp.input) + list(gp.output) + list(gp.value_info):
        if vi.name in types:
            vi.type.CopyFrom(types[vi.name])
    keep = [vi for vi in gp.value_info if vi.type.WhichOneof("value") is not None]
    if len(keep) != len(gp.value_info):
        del gp.value_info[:]
        gp.value_info.extend(keep)
    for node in gp.node:
        for _, sub in _subgraphs(node):
            _restore_types(sub, types)


def export_graph(graph: "gs.Graph") -> "onnx.ModelProto":
    """cleanup + toposort + export + shape inference + onnx.checker: the one finalize step.

    Raises on an invalid graph; materialize turns that into a failed candidate.
    """
    import onnx
    import onnx_graphsurgeon as gs

    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = _gs_export(graph)
    have = {o.domain for o in model.opset_import}
    for node in model.graph.node:  # a pass that emits a contrib op needs its domain declared
        if node.domain not in have and node.domain not in ("", "ai.onnx"):
            model.opset_import.append(onnx.helper.make_opsetid(node.domain, 1))
            have.add(node.domain)
    # value_info of edited tensors may be stale (a pruned conv keeps its old shape): infer anew.
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    model = _initializers_as_inputs(model)
    onnx.checker.check_model(model)
    return model


def _initializers_as_inputs(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """IR version < 4 requires every initializer to be a graph input too; graphsurgeon's export
    (and folding, which makes new initializers) lists only the real inputs, so every model
    exported before ONNX 1.3 (IR 3: opset <= 8, e.g. the onnx test suite's resnet50 and
    squeezenet) failed onnx.checker: "w in initializer but not in graph input". Edits in place."""
    from onnx import helper

    if model.ir_version >= 4:
        return model
    listed = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name not in listed:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return model


def model_hash(model: "onnx.ModelProto") -> str:
    """Content hash of a graph (dedups genotypes that materialize to the same graph), and of the
    compiler hints it carries (graphopt.modelio.hints: a layout move changes how a target compiles
    the same graph, so it is not a duplicate). A model without hints hashes as its graph alone."""
    from .hints import HINTS, get_hint

    h = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    for key in HINTS:
        value = get_hint(model, key)
        if value is not None:
            h.update(f"\0{key}={value}".encode())
    return h.hexdigest()


def op_histogram(proto: "onnx.ModelProto") -> dict[str, int]:
    return dict(Counter(n.op_type for n in proto.graph.node).most_common())
