"""Static cost of a model: parameters and FLOPs per node, from inferred shapes (no execution).

These numbers are *estimated by formula*, never measured: they say how much arithmetic the
graph asks for, not how fast a compiler makes it run.

FLOP convention (one multiply-add = 2 FLOPs; numel(T) = number of elements of tensor T):
  Conv           2 * numel(Y) * (Cin/groups) * prod(kernel)  (+ numel(Y) with a bias)
                 = 2 * N * Cout * Hout * Wout * (Cin/groups) * kh * kw for 2-D
  ConvTranspose  2 * numel(X) * (Cout/groups) * prod(kernel) (+ numel(Y) with a bias)
  Gemm           2 * M * N * K                                (+ M * N with a C input)
  MatMul         2 * numel(Y) * K, i.e. 2 * batch * M * N * K (broadcast batch dims)
  (QLinear/Integer conv and matmul variants count like their float forms)
  Attention      2 * S * (Dqk + Dv) + 5 * S, S = batch * q_heads * q_len * kv_len scores
  elementwise, activation, quantize/dequantize, Resize      numel(Y)
                 (variadic Sum/Max/Min/Mean: (inputs - 1) * numel(Y))
  normalisation  numel(Y); BatchNormalization 2 * numel(Y)
  pooling        numel(Y) * prod(kernel_shape); global pooling and Reduce*/ArgMax/ArgMin numel(X)
  Softmax, LogSoftmax, Hardmax                              5 * numel(Y)
  data movement (Reshape, Transpose, Concat, Slice, Pad, Gather, Cast, Shape, ...)   0
Any other op, or a node whose needed shapes are unknown, counts 0 FLOPs and is listed in
`ModelStats.unknown_flops_ops` (op types) and flagged `flops_known=False` on its NodeStats.

Parameters of a node = elements of its inputs that are initializers or Constant-node outputs,
except int64 tensors (shapes, axes, indices: data about the graph, not weights). The model
total counts each tensor once, however many nodes share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import onnx

Shape = Optional[tuple[Optional[int], ...]]  # None: unknown rank; an inner None: unknown dim


@dataclass(frozen=True)
class NodeStats:
    name: str
    op_type: str
    params: int
    flops: int
    flops_known: bool = True
    output_shape: Shape = None


@dataclass
class ModelStats:
    nodes: list[NodeStats]
    total_params: int  # unique constant tensors, counted once
    total_flops: int
    unknown_flops_ops: list[str] = field(default_factory=list)  # sorted distinct op types

    @property
    def gflops(self) -> float:
        return self.total_flops / 1e9

    def by_op(self) -> dict[str, tuple[int, int]]:
        """op_type -> (node count, FLOPs), most FLOPs first."""
        acc: dict[str, list[int]] = {}
        for n in self.nodes:
            a = acc.setdefault(n.op_type, [0, 0])
            a[0] += 1
            a[1] += n.flops
        return {k: (v[0], v[1]) for k, v in sorted(acc.items(), key=lambda kv: (-kv[1][1], kv[0]))}

    def to_dict(self) -> dict:
        return {"total_params": self.total_params, "total_flops": self.total_flops,
                "unknown_flops_ops": list(self.unknown_flops_ops),
                "how": "estimated by formula from inferred shapes (multiply-add = 2 FLOPs)",
                "nodes": [{"name": n.name, "op_type": n.op_type, "params": n.params, "flops": n.flops,
                           "flops_known": n.flops_known,
                           "output_shape": list(n.output_shape) if n.output_shape is not None else None}
                          for n in self.nodes]}


# ------------------------------------------------------------------------------ node view
@dataclass
class _Node:
    """What a FLOP handler sees: the node, its attributes and the shapes of its tensors."""

    proto: "onnx.NodeProto"
    attrs: dict
    shapes: dict[str, Shape]

    def in_shape(self, i: int) -> Shape:
        names = self.proto.input
        return self.shapes.get(names[i]) if i < len(names) and names[i] else None

    def out_shape(self, i: int = 0) -> Shape:
        names = self.proto.output
        return self.shapes.get(names[i]) if i < len(names) and names[i] else None

    def has_input(self, i: int) -> bool:
        return i < len(self.proto.input) and bool(self.proto.input[i])

    def n_inputs(self) -> int:
        return sum(1 for x in self.proto.input if x)


class _Unknown(Exception):
    """A handler cannot count this node (a shape it needs is not known)."""


def _numel(shape: Shape) -> int:
    if shape is None or any(d is None for d in shape):
        raise _Unknown
    return math.prod(shape)


def _dims(shape: Shape, *idx: int) -> list[int]:
    if shape is None or any(d is None for d in shape):
        raise _Unknown
    return [shape[i] for i in idx]


# ------------------------------------------------------------------------------ FLOP handlers
def _zero(n: _Node) -> int:
    return 0


def _elementwise(n: _Node, factor: int = 1) -> int:
    return factor * _numel(n.out_shape())


def _variadic(n: _Node) -> int:  # Sum / Max / Min / Mean over k inputs: k - 1 ops per element
    return max(1, n.n_inputs() - 1) * _numel(n.out_shape())


def _input_elements(n: _Node) -> int:  # reductions and global pooling touch each input once
    return _numel(n.in_shape(0))


def _pool(n: _Node) -> int:
    kernel = n.attrs.get("kernel_shape")
    if not kernel:
        raise _Unknown
    return _numel(n.out_shape()) * math.prod(kernel)


def _conv(n: _Node, w: int = 1, b: Optional[int] = 2) -> int:
    wshape = n.in_shape(w)  # [Cout, Cin/groups, k...]
    y = _numel(n.out_shape())
    flops = 2 * y * _numel(wshape[1:] if wshape is not None else None)
    return flops + (y if b is not None and n.has_input(b) else 0)


def _conv_transpose(n: _Node) -> int:
    wshape = n.in_shape(1)  # [Cin, Cout/groups, k...]
    flops = 2 * _numel(n.in_shape(0)) * _numel(wshape[1:] if wshape is not None else None)
    return flops + (_numel(n.out_shape()) if n.has_input(2) else 0)


def _matmul(n: _Node, a: int = 0) -> int:
    ashape = n.in_shape(a)
    if ashape is None or len(ashape) == 0:
        raise _Unknown
    (k,) = _dims(ashape, -1)
    return 2 * _numel(n.out_shape()) * k


def _gemm(n: _Node) -> int:
    ashape = n.in_shape(0)
    if ashape is None or len(ashape) != 2:
        raise _Unknown
    (k,) = _dims(ashape, 0 if n.attrs.get("transA", 0) else 1)
    y = _numel(n.out_shape())  # M * N
    bias = y if n.has_input(2) and n.attrs.get("beta", 1.0) != 0 else 0
    return 2 * y * k + bias


def _attention(n: _Node) -> int:
    """ONNX Attention (opset 23): Q (B, Hq, Sq, D) or (B, Sq, Hq*D); K, V likewise."""
    q, k, v = n.in_shape(0), n.in_shape(1), n.in_shape(2)
    if q is None or k is None or v is None:
        raise _Unknown
    if len(q) == 4:
        b, hq, sq, dqk = _dims(q, 0, 1, 2, 3)
        (skv,) = _dims(k, 2)
        (dv,) = _dims(v, 3)
    elif len(q) == 3:
        hq, hkv = n.attrs.get("q_num_heads"), n.attrs.get("kv_num_heads")
        if not hq or not hkv:
            raise _Unknown
        b, sq, qw = _dims(q, 0, 1, 2)
        (skv,) = _dims(k, 1)
        (vw,) = _dims(v, 2)
        dqk, dv = qw // hq, vw // hkv
    else:
        raise _Unknown
    if n.has_input(4):  # past_key (B, Hkv, S_past, D)
        (past,) = _dims(n.in_shape(4), 2)
        skv += past
    scores = b * hq * sq * skv
    return 2 * scores * (dqk + dv) + 5 * scores


_ELEMENTWISE = """Add Sub Mul Div Pow Mod Neg Abs Reciprocal Sqrt Exp Log Erf Sin Cos Tan Tanh Sigmoid
    Relu LeakyRelu PRelu Elu Selu Celu Gelu Mish Softplus Softsign HardSigmoid HardSwish Swish ThresholdedRelu
    Clip Floor Ceil Round Sign IsNaN IsInf Not And Or Xor Equal Less LessOrEqual Greater GreaterOrEqual Where
    BitShift BitwiseAnd BitwiseOr BitwiseXor BitwiseNot QuantizeLinear DequantizeLinear DynamicQuantizeLinear
    Resize Upsample Trilu CumSum""".split()
_NORM = "LayerNormalization InstanceNormalization GroupNormalization LpNormalization RMSNormalization " \
        "MeanVarianceNormalization".split()
_REDUCE = """ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare ArgMax ArgMin GlobalAveragePool GlobalMaxPool GlobalLpPool""".split()
_DATA_MOVEMENT = """Reshape Transpose Flatten Squeeze Unsqueeze Concat Split Slice Gather GatherElements
    GatherND Scatter ScatterElements ScatterND Identity Shape Size Constant ConstantOfShape Expand Tile Pad
    Cast CastLike Dropout Range DepthToSpace SpaceToDepth EyeLike OneHot NonZero ReverseSequence Compress
    SplitToSequence ConcatFromSequence""".split()

_HANDLERS: dict[str, Callable[[_Node], int]] = {
    **{op: _elementwise for op in _ELEMENTWISE},
    **{op: _elementwise for op in _NORM},
    **{op: _input_elements for op in _REDUCE},
    **{op: _zero for op in _DATA_MOVEMENT},
    **{op: _variadic for op in ("Sum", "Max", "Min", "Mean")},
    **{op: partial(_elementwise, factor=5) for op in ("Softmax", "LogSoftmax", "Hardmax")},
    **{op: _pool for op in ("MaxPool", "AveragePool", "LpPool")},
    "BatchNormalization": partial(_elementwise, factor=2),
    "Conv": _conv,
    "ConvInteger": partial(_conv, w=1, b=None),
    "QLinearConv": partial(_conv, w=3, b=8),
    "ConvTranspose": _conv_transpose,
    "MatMul": _matmul,
    "MatMulInteger": _matmul,
    "QLinearMatMul": _matmul,
    "Gemm": _gemm,
    "Attention": _attention,
    # onnxruntime contrib ops that graphopt's own passes may emit
    "com.microsoft:FusedConv": _conv,
    "com.microsoft:FusedMatMul": _matmul,
    "com.microsoft:Gelu": _elementwise,
    "com.microsoft:FastGelu": _elementwise,
    "com.microsoft:QuickGelu": _elementwise,
    "com.microsoft:BiasGelu": _elementwise,
    "com.microsoft:SkipLayerNormalization": _elementwise,
}


def _op_key(node: "onnx.NodeProto") -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


# ------------------------------------------------------------------------------ analysis
def analyze(proto: "onnx.ModelProto") -> ModelStats:
    """Parameters and FLOPs per node and in total (see the module docstring for the convention).

    `proto` should have static input shapes; value_info is inferred here when it is missing.
    """
    import onnx

    g = _with_shapes(proto).graph
    shapes: dict[str, Shape] = {}
    for vi in (*g.input, *g.value_info, *g.output):
        shapes[vi.name] = _vi_shape(vi)
    consts: dict[str, tuple[int, int]] = {}  # name -> (elements, dtype)
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
        consts[t.name] = (math.prod(t.dims), t.data_type)
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            t = _constant_tensor(node)
            if t is not None:
                shapes[node.output[0]] = tuple(t.dims)
                consts[node.output[0]] = (math.prod(t.dims), t.data_type)

    nodes: list[NodeStats] = []
    counted: set[str] = set()
    unknown: set[str] = set()
    for node in g.node:
        param_inputs = [x for x in dict.fromkeys(node.input)
                        if x in consts and consts[x][1] != onnx.TensorProto.INT64]
        params = sum(consts[x][0] for x in param_inputs)
        counted.update(param_inputs)
        key = _op_key(node)
        handler = _HANDLERS.get(key)
        flops, known = 0, handler is not None
        if handler is not None:
            view = _Node(node, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}, shapes)
            try:
                flops = int(handler(view))
            except (_Unknown, IndexError, TypeError, ZeroDivisionError):
                known = False
        if not known:
            unknown.add(key)
        out = shapes.get(node.output[0]) if node.output and node.output[0] else None
        nodes.append(NodeStats(node.name, node.op_type, params, flops, known, out))

    return ModelStats(nodes=nodes, total_params=sum(consts[x][0] for x in counted),
                      total_flops=sum(n.flops for n in nodes), unknown_flops_ops=sorted(unknown))


def _with_shapes(proto: "onnx.ModelProto") -> "onnx.ModelProto":
    """`proto`, or a copy with more shapes inferred when some node output lacks a static one.

    onnx's inference first; where that leaves gaps (it cannot see through shape arithmetic such
    as the Shape -> ... -> Pad chains of TF-"same" padding), onnxruntime's symbolic shape
    inference, which evaluates such chains. Neither runs the model. Remaining gaps become
    unknown FLOPs, never an error.
    """
    import onnx

    if _shapes_complete(proto.graph):
        return proto
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        pass
    inits = {t.name for t in proto.graph.initializer}
    if _shapes_complete(proto.graph) or not all(
            _static(_vi_shape(vi)) for vi in proto.graph.input if vi.name not in inits):
        return proto  # a dynamic input dimension stays unknown whatever infers it
    from ..modelio.ir import _symbolic_shapes

    return _symbolic_shapes(proto, notes=[])


def _shapes_complete(g: "onnx.GraphProto") -> bool:
    known = {vi.name for vi in (*g.input, *g.value_info, *g.output) if _static(_vi_shape(vi))}
    known.update(t.name for t in g.initializer)
    return all(o in known for n in g.node if n.op_type != "Constant" for o in n.output if o)


def _static(shape: Shape) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _vi_shape(vi: "onnx.ValueInfoProto") -> Shape:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tt.shape.dim)


def _constant_tensor(node: "onnx.NodeProto"):
    import onnx

    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t
        if a.name in ("value_float", "value_int"):
            return onnx.helper.make_tensor("c", onnx.TensorProto.FLOAT if a.name == "value_float"
                                           else onnx.TensorProto.INT64, [], [0])
        if a.name in ("value_floats", "value_ints"):
            vals = list(a.floats) if a.name == "value_floats" else list(a.ints)
            return onnx.helper.make_tensor("c", onnx.TensorProto.FLOAT if a.name == "value_floats"
                                           else onnx.TensorProto.INT64, [len(vals)], vals)
    return None  # sparse or string constants: neither shape nor params are tracked


# ------------------------------------------------------------------------------ text table
def format_table(stats: ModelStats, top: int = 15) -> str:
    """The `top` most expensive nodes by FLOPs, then totals and FLOPs by op type."""
    total = stats.total_flops or 1
    ranked = sorted(stats.nodes, key=lambda n: (-n.flops, -n.params, n.name))[:max(0, top)]
    rows = [(n.name, n.op_type, _shape_text(n.output_shape), _si(n.params), _si(n.flops),
             f"{100.0 * n.flops / total:5.1f}%") for n in ranked]
    head = ("node", "op", "output", "params", "FLOPs", "share")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    widths[0] = min(widths[0], 60)

    def line(r) -> str:
        name = r[0] if len(r[0]) <= widths[0] else "..." + r[0][-(widths[0] - 3):]
        cells = [name.ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2]),
                 *(c.rjust(w) for c, w in zip(r[3:], widths[3:]))]
        return "  ".join(cells).rstrip()

    out = [f"top {len(rows)} of {len(stats.nodes)} nodes by FLOPs "
           "(estimated by formula from inferred shapes; multiply-add = 2 FLOPs)",
           line(head), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out.append(f"total: {stats.total_params:,} params ({stats.total_params / 1e6:.3f} M), "
               f"{stats.total_flops:,} FLOPs ({stats.gflops:.3f} GFLOPs)")
    by_op = [(op, c, f) for op, (c, f) in stats.by_op().items() if f]
    if by_op:
        out.append("by op: " + ", ".join(f"{op} x{c} {100.0 * f / total:.1f}%" for op, c, f in by_op))
    if stats.unknown_flops_ops:
        out.append("FLOPs not counted (unknown op or shape): " + ", ".join(stats.unknown_flops_ops))
    return "\n".join(out)


def _shape_text(shape: Shape) -> str:
    if shape is None:
        return "?"
    return "x".join("?" if d is None else str(d) for d in shape) or "scalar"


def _si(x: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return str(x)
