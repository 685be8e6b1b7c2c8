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

from ..errors import ModelError, UsageError
from ..errors import first_line as _first_line
# the graph IR helpers (graphopt.modelio.graph_io), re-exported: this module is where passes and callers find them
from .fold import fold_constants, normalize_constants  # noqa: F401 (re-exported)
from .graph_io import export_graph, import_graph, model_hash, op_histogram  # noqa: F401
from ..rewrite import node_by_name  # noqa: F401 (the pass helper, graphopt/rewrite.py)

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
        why = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())[:600] or type(e).__name__
        raise ModelError(f"{where} fails onnx.checker: {why} (fix the exporter's output, or check it with "
                         "onnx.checker.check_model(onnx.load(path), full_check=True))") from None

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

        from ..runstore.rundir import in_temp_cwd

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
