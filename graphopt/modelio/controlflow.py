"""Models graphopt did not export: control flow (If/Loop/Scan subgraphs) and already-quantized ops.

Three jobs, each called from a line or two elsewhere:

- `runtime_check` (ir.load_proto): onnxruntime must run the loaded model. When it cannot, the
  error says whose fault it is: the file itself (onnxruntime cannot run it as given), the input
  shapes (it runs with its dynamic shapes but not with the ones --shape or the batch default
  fixed), or graphopt's load rewrite (folding, shape inference: a graphopt bug). A model with
  subgraphs whose inputs cannot be fixed keeps its symbolic input shapes in the graph instead:
  onnxruntime's static shape inference runs into both branches of an If, and torch exports
  branches that are only valid for other shapes (`x.squeeze(-1)`, "is the input batched?"), so
  a fixed shape can make a branch that never runs fail to type-check (Silero VAD: "LSTM: First
  input tensor must have rank 3"). The static shapes still size the data; the note says so.
- `guard_sites` (driver, inspect): passes never act on a node that holds a subgraph, nor on a
  node whose outputs a subgraph reads (a rewrite cannot see or fix the uses inside it).
- `leave_alone` (inspect): the already-quantized nodes (ConvInteger, MatMulInteger,
  DynamicQuantizeLinear, QLinearConv, ...) no pass acts on, each with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..errors import GraphoptError, ModelError, first_line

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs

    from ..genotype import Site

# ops of models that are already integer: graphopt's passes rewrite float Conv/MatMul/Gemm/BN
QUANTIZED_OPS = frozenset({
    "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm",
    "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearConcat", "QLinearLeakyRelu", "QAttention", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QuantizeLinear", "DequantizeLinear",
})
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


def has_subgraphs(model: "onnx.ModelProto") -> bool:
    import onnx

    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


def _check_onnxruntime(proto: "onnx.ModelProto", where: str) -> None:
    """Raise the runtime's error (its first line) if onnxruntime cannot build a session for proto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _session_error(proto: "onnx.ModelProto") -> str | None:
    try:
        _check_onnxruntime(proto, "")
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
        return first_line(e)
    return None


def _input_shapes(proto: "onnx.ModelProto") -> str:
    inits = {i.name for i in proto.graph.initializer}
    return " ".join(f"{vi.name}=" + ("x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                                              for d in vi.type.tensor_type.shape.dim) or "scalar")
                    for vi in proto.graph.input if vi.name not in inits)


def runtime_check(proto: "onnx.ModelProto", original: "onnx.ModelProto", fixed: "onnx.ModelProto", where: str,
                  notes: list[str], finish: Callable[["onnx.ModelProto"], "onnx.ModelProto"]
                  ) -> tuple["onnx.ModelProto", bool]:
    """(model to use, whether its inputs stayed symbolic). `proto` is the loaded model, `original`
    the file as given, `fixed` the file with only the input shapes set; `finish` runs the rest of
    the load (naming, folding, shape inference) on a model. Raises with the blame when nothing runs."""
    import onnx

    ours = _session_error(proto)
    if ours is None:
        return proto, False
    as_given = _session_error(original)
    if as_given is not None:
        raise ModelError(f"onnxruntime cannot run {where} as given (before graphopt changed anything): {as_given}. "
                         "graphopt checks fidelity with onnxruntime, so every op must be one it implements "
                         "(see the op's domain and opset)")
    shapes = _input_shapes(fixed)
    fixed_err = _session_error(fixed)
    if has_subgraphs(original):
        keep = onnx.ModelProto()
        keep.CopyFrom(original)
        alt = finish(keep)
        if _session_error(alt) is None:
            notes.append(f"input shapes left symbolic in the graph: onnxruntime runs {where} as given, but its shape "
                         f"inference through the If/Loop subgraphs fails with the inputs fixed to {shapes} "
                         f"({fixed_err or ours}); those shapes size the data only")
            return alt, True
    if fixed_err is not None:
        raise ModelError(f"onnxruntime runs {where} with its dynamic input shapes but not with them fixed to {shapes}: "
                         f"{fixed_err}. Check the --shape sizes (a symbolic batch dimension defaults to 1)")
    raise GraphoptError(f"graphopt's load rewrite broke {where}: onnxruntime runs the file, also with its inputs fixed "
                        f"to {shapes}, but not after graphopt's constant folding and shape inference ({ours}). "
                        "This is a graphopt bug: please report it with the model")


# ---------------------------------------------------------------------------------- passes
def _subgraph_holders(graph: "gs.Graph") -> tuple[set[str], set[str]]:
    """(names of nodes holding subgraphs, names of tensors read inside any subgraph)."""
    import onnx_graphsurgeon as gs

    holders: set[str] = set()
    read: set[str] = set()

    def walk(g: "gs.Graph") -> None:
        for n in g.nodes:
            for t in n.inputs:
                read.add(t.name)
            for v in n.attrs.values():
                for sub in (v if isinstance(v, (list, tuple)) else [v]):
                    if isinstance(sub, gs.Graph):
                        walk(sub)

    for node in graph.nodes:
        subs = [s for v in node.attrs.values() for s in (v if isinstance(v, (list, tuple)) else [v])
                if isinstance(s, gs.Graph)]
        if subs:
            holders.add(node.name)
            for sub in subs:
                walk(sub)
    return holders, read


def guard_sites(graph: "gs.Graph", sites: list["Site"]) -> tuple[list["Site"], list[tuple[str, str]]]:
    """(sites passes may act on, [(node, why not)] for the sites dropped): no site on a node that
    holds a subgraph, or whose outputs a subgraph reads."""
    holders, read = _subgraph_holders(graph)
    if not holders:
        return sites, []
    outputs = {n.name: {t.name for t in n.outputs} for n in graph.nodes}
    kept, dropped = [], []
    for s in sites:
        why = None
        for name in s.nodes:
            if name in holders:
                why = f"{name} holds a subgraph (If/Loop/Scan): passes leave control flow alone"
            elif outputs.get(name, set()) & read:
                why = f"{name}'s output is read inside an If/Loop/Scan subgraph, which a rewrite cannot update"
            if why:
                break
        if why is None:
            kept.append(s)
        else:
            dropped.append((s.nodes[0] if s.nodes else s.key, why))
    return kept, dropped


def leave_alone(graph: "gs.Graph") -> list[tuple[str, str]]:
    """[(node, why)] for nodes every pass leaves as they are: already-quantized ops and control flow."""
    holders, _ = _subgraph_holders(graph)
    out = []
    for n in graph.nodes:
        if n.op in QUANTIZED_OPS:
            out.append((n.name, f"{n.op} is already quantized (passes rewrite float "
                                "Conv/MatMul/Gemm/BN): left as it is"))
        elif n.name in holders:
            out.append((n.name, f"{n.op} holds a subgraph: passes leave control flow alone"))
    return out
