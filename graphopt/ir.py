"""Loading, checking and (re)exporting models. onnx-graphsurgeon is the IR.

`load_model` is the one door a user's file comes through: every way it can be wrong becomes a
ModelError naming the problem and the fix. The file itself is only ever read.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from .errors import ModelError, UsageError
from .errors import first_line as _first_line

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  # numpy dtype


@dataclass
class LoadedModel:
    """The base model: static shapes, inferred value infos, unique node names."""

    path: Path | None
    proto: "onnx.ModelProto"
    sha256: str
    inputs: list[InputSpec]
    output_names: list[str]
    notes: list[str] = field(default_factory=list)
    # symbolic leading (batch) dimensions graphopt set to 1: [{"input", "axis", "dim", "value"}]
    defaulted_dims: list[dict] = field(default_factory=list)
    # True when the graph keeps its inputs' symbolic dims (control flow: see controlflow.py);
    # `inputs` still holds the static shapes the data is made with
    symbolic_inputs: bool = False

    def graph(self) -> "gs.Graph":
        """A fresh gs.Graph of the base model (callers may edit it)."""
        return import_graph(self.proto)


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'input=1x3x224x224' -> ('input', (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name:
        raise UsageError(f"--shape {text!r}: expected NAME=D1xD2x..., e.g. input=1x3x224x224")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise UsageError(f"--shape {text!r}: dimensions must be integers, e.g. input=1x3x224x224") from None
    if any(d <= 0 for d in shape):
        raise UsageError(f"--shape {text!r}: dimensions must be positive")
    return name, shape


def load_model(path: str | Path, shapes: Mapping[str, tuple[int, ...]] | None = None,
               check_runtime: bool = True, symbolic_ok: bool = False) -> LoadedModel:
    import onnx

    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a directory; pass the path of an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None
    if not data:
        raise ModelError(f"{path} is empty; export the model again")
    try:
        proto = onnx.load_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX model ({type(e).__name__}: {_first_line(e)}); "
                         "is the file truncated or not ONNX? Export it again with torch.onnx.export") from None
    if path.parent and any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as e:
            raise ModelError(f"{path}: external weight data could not be loaded ({_first_line(e)}); "
                             "keep the .data file next to the model") from None
    return load_proto(proto, shapes=shapes, sha256=hashlib.sha256(data).hexdigest(), path=path,
                      check_runtime=check_runtime, symbolic_ok=symbolic_ok)


def load_proto(proto: "onnx.ModelProto", shapes: Mapping[str, tuple[int, ...]] | None = None,
               sha256: str | None = None, path: Path | None = None,
               check_runtime: bool = True, fold: bool = True, symbolic_ok: bool = False) -> LoadedModel:
    """symbolic_ok (`graphopt inspect`): dynamic dimensions other than a leading batch dimension
    stay symbolic instead of being an error (and onnxruntime is not asked to run the model)."""
    import onnx

    where = str(path) if path else "model"
    proto_in = proto
    proto = onnx.ModelProto()
    proto.CopyFrom(proto_in)  # never edit the caller's object
    if len(proto.graph.node) == 0:
        raise ModelError(f"{where} has no nodes (graph is empty, or this is not an ONNX model)")
    # --shape first: onnx.checker refuses an input without a declared shape ("Field 'shape' of 'type' is
    # required but missing"), which --shape gives it (or the error below names the input and the flag)
    defaulted = _fix_input_shapes(proto, dict(shapes or {}), where, symbolic_ok=symbolic_ok)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ModelError(f"{where} fails onnx.checker: {_first_line(e)}") from None

    notes: list[str] = []
    for d in defaulted:
        notes.append(f"input {d['input']!r}: symbolic batch dimension {d['dim']!r} (axis {d['axis']}) set to 1; "
                     f"pass --shape {d['input']}=... to choose another batch size")
    unknown = _symbolic_dims(proto) if symbolic_ok else []
    if unknown:
        notes.append("dynamic dimensions left symbolic: " + ", ".join(unknown)
                     + " (graphopt run needs --shape for them; shapes and FLOPs below them are unknown)")
    fixed = proto
    proto = _finish_load(proto, notes, fold)
    inputs = graph_inputs(proto)
    symbolic_inputs = False
    if check_runtime and not unknown:
        from .controlflow import runtime_check

        proto, symbolic_inputs = runtime_check(proto, proto_in, fixed, where, notes,
                                               lambda p: _finish_load(p, notes, fold))
    if sha256 is None:
        sha256 = hashlib.sha256(proto_in.SerializeToString(deterministic=True)).hexdigest()
    return LoadedModel(path=path, proto=proto, sha256=sha256, inputs=inputs,
                       output_names=[o.name for o in proto.graph.output], notes=list(dict.fromkeys(notes)),
                       defaulted_dims=defaulted, symbolic_inputs=symbolic_inputs)


def _finish_load(proto: "onnx.ModelProto", notes: list[str], fold: bool) -> "onnx.ModelProto":
    """Name nodes, fold constants, infer shapes: the load steps after the inputs' shapes are set."""
    import onnx

    declared = {o.name: o.type for o in proto.graph.output}
    _name_nodes(proto)
    if fold:
        n_before = len(proto.graph.node)
        proto = fold_constants(proto)
        if len(proto.graph.node) < n_before:
            notes.append(f"constant subgraphs folded: {n_before} -> {len(proto.graph.node)} nodes")
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:
        notes.append(f"shape inference incomplete: {_first_line(e)}")
    if _has_unknown_dims(proto):
        proto = _symbolic_shapes(proto, notes)
    for o in proto.graph.output:  # an output whose shape inference lost (an incomplete symbolic pass over
        tt = o.type.tensor_type  # contrib ops) keeps its declared one: an output without shape fails onnx.checker
        if o.type.WhichOneof("value") == "tensor_type" and not tt.HasField("shape") and o.name in declared \
                and declared[o.name].tensor_type.HasField("shape"):
            tt.shape.CopyFrom(declared[o.name].tensor_type.shape)
    return proto


def _has_unknown_dims(proto: "onnx.ModelProto") -> bool:
    for vi in list(proto.graph.value_info) + list(proto.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or any(not d.HasField("dim_value") for d in tt.shape.dim):
            return True
    return False


def _symbolic_shapes(proto: "onnx.ModelProto", notes: list[str]) -> "onnx.ModelProto":
    """onnxruntime's symbolic shape inference resolves shapes computed in the graph
    (Shape -> Gather -> Concat -> Pad, as "same" padding exports do) that onnx's cannot."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        from .rundir import in_temp_cwd

        with in_temp_cwd():  # when incomplete, it saves sym_shape_infer_temp.onnx into the current directory
            out = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
        return out if out is not None else proto
    except Exception as e:
        notes.append(f"symbolic shape inference failed: {_first_line(e)}; some shapes stay unknown")
        return proto


def graph_inputs(proto: "onnx.ModelProto") -> list[InputSpec]:
    import onnx

    inits = {i.name for i in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


def _fix_input_shapes(proto: "onnx.ModelProto", shapes: dict, where: str,
                      symbolic_ok: bool = False) -> list[dict]:
    """Give each input the static shape --shape names, in place. A symbolic leading (batch)
    dimension defaults to 1 (and so does any other dimension with the same symbolic name);
    any other symbolic dimension needs --shape: the error lists each, with a flag to paste.
    Returns the defaulted dimensions [{"input", "axis", "dim", "value"}]."""
    inits = {i.name for i in proto.graph.initializer}
    real_inputs = [vi for vi in proto.graph.input if vi.name not in inits]
    names = [vi.name for vi in real_inputs]
    for name in shapes:
        if name not in names:
            raise UsageError(f"--shape names input {name!r}, but the model's inputs are {names}")
    defaulted: list[dict] = []
    batch_names: set[str] = set()
    for vi in real_inputs:  # the leading dimensions first, so a batch name shared by inputs is known
        tt = vi.type.tensor_type
        if vi.name in shapes or not tt.HasField("shape") or not tt.shape.dim:
            continue
        d0 = tt.shape.dim[0]
        if not (d0.HasField("dim_value") and d0.dim_value >= 0):
            if d0.dim_param:
                batch_names.add(d0.dim_param)
    missing: list[tuple[str, list[str], str]] = []  # (input, its symbolic dims, a --shape flag)
    for vi in real_inputs:
        if vi.type.WhichOneof("value") != "tensor_type":  # nothing to give a shape to: say so
            raise ModelError(f"input {vi.name!r} is {type_str(vi.type)}, not a tensor: graphopt optimizes models "
                             "whose inputs are tensors; export the model with tensor inputs")
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            if vi.name not in shapes:
                if symbolic_ok:
                    continue
                raise ModelError(f"input {vi.name!r} has no declared shape; give one with "
                                 f"--shape {vi.name}=D1xD2x...")
            for d in shapes[vi.name]:
                tt.shape.dim.add().dim_value = d
            continue
        dims = tt.shape.dim
        # a declared 0 is a static (empty) dimension, as onnxruntime reads it: ReduceSum's empty `axes`
        cur = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in dims)
        want = shapes.get(vi.name)
        if want is not None:
            if len(want) != len(cur):
                raise UsageError(f"--shape {vi.name}={'x'.join(map(str, want))}: input {vi.name!r} has rank "
                                 f"{len(cur)} ({_fmt(cur, dims)})")
            for i, (c, w) in enumerate(zip(cur, want)):
                if c is not None and c != w:
                    raise UsageError(f"--shape {vi.name}={'x'.join(map(str, want))}: dimension {i} of "
                                     f"{vi.name!r} is fixed at {c} in the model ({_fmt(cur, dims)})")
            for d, w in zip(dims, want):
                d.ClearField("dim_param")
                d.dim_value = w
            continue
        left, flag = [], []
        for i, (c, d) in enumerate(zip(cur, dims)):
            if c is not None:
                flag.append(str(c))
            elif i == 0 or (d.dim_param and d.dim_param in batch_names):
                defaulted.append({"input": vi.name, "axis": i, "dim": d.dim_param or "?", "value": 1})
                d.ClearField("dim_param")
                d.dim_value = 1
                flag.append("1")
            else:
                label = _placeholder(d.dim_param, i)
                left.append(f"{vi.name}[{i}] ({d.dim_param or '?'})")
                flag.append(label)
        if left:
            missing.append((vi.name, left, f"--shape {vi.name}={'x'.join(flag)}"))
    if missing and not symbolic_ok:
        parts = "; ".join(f"{', '.join(left)}: {flag}" for _, left, flag in missing)
        raise ModelError(f"dynamic input dimensions graphopt cannot guess: {parts} (replace each capital letter "
                         "by a size; graphopt compiles for static shapes, and a symbolic leading batch dimension "
                         "already defaults to 1)")
    return defaulted


def _placeholder(dim_param: str, axis: int) -> str:
    """A capital letter (or short name) standing for a size the user must give."""
    p = (dim_param or "").strip()
    if p and p.isidentifier() and len(p) <= 8 and not p.startswith("unk"):
        return p.upper()
    return "HW"[axis - 2] if axis in (2, 3) else f"D{axis}"


def _symbolic_dims(proto: "onnx.ModelProto") -> list[str]:
    """'input[axis] (name)' for every dimension of a graph input that is still symbolic."""
    inits = {i.name for i in proto.graph.initializer}
    out = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            out.append(f"{vi.name} (no declared shape)")
            continue
        for i, d in enumerate(tt.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value >= 0):
                out.append(f"{vi.name}[{i}] ({d.dim_param or '?'})")
    return out


def type_str(tp) -> str:
    """An ONNX TypeProto as text: 'a sequence (seq(tensor(float)))', 'an optional (optional(...))'."""
    def txt(t) -> str:
        kind = t.WhichOneof("value")
        if kind == "tensor_type":
            import onnx

            return f"tensor({onnx.helper.tensor_dtype_to_string(t.tensor_type.elem_type).split('.')[-1].lower()})"
        if kind == "sequence_type":
            return f"seq({txt(t.sequence_type.elem_type)})"
        if kind == "optional_type":
            return f"optional({txt(t.optional_type.elem_type)})"
        if kind == "map_type":
            return f"map({t.map_type.key_type}, {txt(t.map_type.value_type)})"
        return kind or "untyped"

    kind = {"sequence_type": "a sequence", "optional_type": "an optional", "map_type": "a map",
            "sparse_tensor_type": "a sparse tensor"}.get(tp.WhichOneof("value"), "a value")
    return f"{kind} ({txt(tp)})"


def _fmt(cur, dims) -> str:
    return "[" + ", ".join(str(c) if c is not None else (d.dim_param or "?") for c, d in zip(cur, dims)) + "]"


def _name_nodes(proto: "onnx.ModelProto") -> None:
    """Give every node a unique, deterministic name (site keys are node names)."""
    seen: Counter = Counter()
    for i, node in enumerate(proto.graph.node):
        base = node.name or f"{node.op_type}_{i}"
        name = base
        while seen[name]:
            name = f"{base}__{seen[base]}"
            seen[base] += 1
        seen[name] += 1
        node.name = name


# ------------------------------------------------------------------------------ constant folding
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


# ------------------------------------------------------------------------------ graph IR helpers
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


def node_by_name(graph: "gs.Graph", name: str):
    for n in graph.nodes:
        if n.name == name:
            return n
    return None


def model_hash(model: "onnx.ModelProto") -> str:
    """Content hash of a graph (dedups genotypes that materialize to the same graph)."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def op_histogram(proto: "onnx.ModelProto") -> dict[str, int]:
    return dict(Counter(n.op_type for n in proto.graph.node).most_common())
