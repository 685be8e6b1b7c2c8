"""Trim padding: run a transformer encoder on the tokens up to the last unmasked one (exact).

A sentence encoder exported for a fixed sequence length S (inputs [B, S], padded to S) spends
most of its time on padding: an STS-B sentence is 10-30 tokens of 128. Positions after the last
one where the attention mask is non-zero influence nothing the model outputs when (a) they are
masked keys (an additive mask -> exp() = 0 in every softmax) and (b) the outputs do not keep the
token axis (mask-weighted mean pooling, a [CLS] vector). So slicing every [B, S] token input to
[:, :L], L = (last index with mask != 0) + 1 (at least 1, the maximum over the batch), inside the
graph computes the same outputs for any mask pattern, with L/S of the token-wise work and (L/S)^2
of the attention matrices. This is the "remove padding" optimisation of FasterTransformer /
ByteTransformer and onnxruntime.transformers' packing mode, for one padded batch.

The site: the model's attention-mask input (a rank-2 graph input named like `*mask*`) and the
other [B, S] token inputs (input_ids, token_type_ids, position ids). One site, choices
("keep", "trim"); "trim" is exact, so by default it is one gene (graphopt.exact).

The rewrite (in the graph, so the model's inputs stay [B, S] and callers change nothing):
  L = Max(ReduceMax(Cast(Not(Equal(mask, 0))) * [1..S]), 1)          (int64 [1])
  each token input x  ->  Slice(x, 0, L, axis 1)
  a constant with an axis of size S (position ids, arange tables of the mask construction)
                      ->  Slice(constant, 0, L) on those axes
  a small 1-D / scalar integer constant holding S (Reshape / Expand shapes, Range limits)
                      ->  Where(constant == S, L, constant)
Constant weights of MatMul / Gemm / Conv are never sliced.

Not a site (`graphopt inspect` shows why):
  - no rank-2 graph input named like an attention mask, or its sequence axis is not static;
  - a graph output with a dimension of size S (it keeps the token axis: trimming changes it);
  - another graph input with the sequence length on an axis other than axis 1 of a [B, S] input;
  - the trial: the rewritten graph, run by onnxruntime on trimmed-length feeds (a few lengths
    and mask patterns, holes included), must match the original on the same feeds padded to S.
    A shape computation the rewrite does not reach (a Reshape to S * hidden, a weight with S
    rows, a dimension equal to S by coincidence) fails the trial, with the difference or the
    onnxruntime error as the reason.
apply() re-runs the trial on the candidate graph (after earlier passes, e.g. attention fusion)
and returns False (the move does not apply) when it fails, so an inexact trim is never built.

Runtime shapes then depend on the input values: targets that compile static shapes (TVM: x86,
rpi4, cuda) declare `static_shapes` and the driver drops this pass's sites for them with a
warning (graphopt.timing.static_shape_conflicts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.genotype import Choice, Site
from graphopt.plugin import MoveContext, Pass

from ._graph import _const, _fresh_name

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs

log = logging.getLogger("graphopt.passes.trim_padding")

_WEIGHT_SLOTS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "ConvTranspose": (1,), "MatMulInteger": (1,)}
_SHAPE_CONST_MAX_LEN = 8
TRIMMED_DIM = "trimmed_seq"  # the symbolic dim of token-axis tensors after the trim
_TRIAL_ATOL, _TRIAL_RTOL = 1e-4, 1e-3


@dataclass
class _Match:
    mask: str  # graph input name
    tokens: tuple[str, ...]  # all [B, S] inputs, the mask included
    seq: int  # S


def _dims(t) -> list | None:
    s = getattr(t, "shape", None)
    return None if s is None else list(s)


def _is_static(d) -> bool:
    return isinstance(d, (int, np.integer)) and int(d) > 0


def match(graph: "gs.Graph") -> _Match | str:
    """The model's padding-trim site, or why it has none (structure only; see trial())."""
    masks = [t for t in graph.inputs if "mask" in t.name.lower() and _dims(t) is not None and len(_dims(t)) == 2]
    if not masks:
        return ("no rank-2 graph input named like an attention mask ([B, S] 'attention_mask'): the padding to "
                "trim is not known")
    if len(masks) > 1:
        return f"several rank-2 mask inputs ({', '.join(t.name for t in masks)}): which one marks padding is ambiguous"
    mask = masks[0]
    seq = _dims(mask)[1]
    if not _is_static(seq):
        return (f"input {mask.name!r} has a symbolic sequence axis ({seq!r}): fix it with --shape "
                f"{mask.name}=B,S to trim padding")
    seq = int(seq)
    if seq < 2:
        return f"input {mask.name!r} has sequence length {seq}: nothing to trim"
    batch = _dims(mask)[0]
    tokens = []
    for t in graph.inputs:
        d = _dims(t)
        if d is None:
            return f"input {t.name!r} has no static shape: cannot tell whether it has a token axis"
        if len(d) == 2 and d[0] == batch and d[1] == seq:
            tokens.append(t.name)
        elif any(_is_static(x) and int(x) == seq for x in d):
            return (f"input {t.name!r} {d} has the sequence length {seq} on an axis that is not axis 1 of a "
                    f"[B, S] token input: trimming it is not supported")
    for t in graph.outputs:
        d = _dims(t)
        if d is None:
            return f"output {t.name!r} has no static shape: cannot tell whether it keeps the token axis"
        if any(_is_static(x) and int(x) == seq for x in d):
            return (f"output {t.name!r} {d} keeps the token axis (a dimension of size {seq}): trimming padding "
                    "would change its shape")
    return _Match(mask=mask.name, tokens=tuple(tokens), seq=seq)


# ----------------------------------------------------------------------------------- rewrite
def _rewrite(graph: "gs.Graph", m: _Match) -> None:
    """Slice the token inputs to L inside `graph` (in place); see the module docstring."""
    import onnx_graphsurgeon as gs

    taken = {t for t in graph.tensors()} | {n.name for n in graph.nodes}
    new_nodes: list = []

    def var(base: str, dtype=None):
        return gs.Variable(_fresh_name(taken, f"trim_padding/{base}"), dtype=dtype)

    def node(op: str, inputs: list, out, attrs: dict | None = None):
        new_nodes.append(gs.Node(op=op, name=_fresh_name(taken, f"/trim_padding/{op}"), inputs=inputs,
                                 outputs=[out], attrs=attrs or {}))
        return out

    def const(base: str, value: np.ndarray):
        return gs.Constant(_fresh_name(taken, f"trim_padding/{base}"), np.asarray(value))

    inputs = {t.name: t for t in graph.inputs}
    mask = inputs[m.mask]
    mdt = np.dtype(mask.dtype) if mask.dtype is not None else np.dtype(np.int64)
    # L = max(1, max over batch and positions of (index + 1) * (mask != 0)), int64 [1]
    eq = node("Equal", [mask, const("zero", np.zeros((), dtype=mdt))], var("is_pad", np.bool_))
    keep = node("Not", [eq], var("is_token", np.bool_))
    k64 = node("Cast", [keep], var("is_token_i64", np.int64), {"to": 7})
    pos = node("Mul", [k64, const("positions", np.arange(1, m.seq + 1, dtype=np.int64))], var("end", np.int64))
    red = node("ReduceMax", [pos], var("max_end", np.int64), {"keepdims": 1})
    flat = node("Reshape", [red, const("shape_1", np.array([1], dtype=np.int64))], var("max_end_1", np.int64))
    length = node("Max", [flat, const("one", np.array([1], dtype=np.int64))], var("length", np.int64))

    def trimmed_length(dtype) -> Any:
        if np.dtype(dtype) == np.int64:
            return length
        key = f"length_{np.dtype(dtype).name}"
        if key not in cache:
            cache[key] = node("Cast", [length], var(key, dtype),
                              {"to": int(__import__("onnx").helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))})
        return cache[key]

    cache: dict[str, Any] = {}
    zero1 = const("start_0", np.array([0], dtype=np.int64))
    # each token input -> Slice(x, 0, L, axis 1), for every consumer but the length computation
    for name in m.tokens:
        x = inputs[name]
        sl = node("Slice", [x, zero1, length, const("axis_1", np.array([1], dtype=np.int64))],
                  var(f"{name}_trimmed", x.dtype))
        sl.shape = [_dims(x)[0], TRIMMED_DIM]
        ours = {id(n) for n in new_nodes}
        for consumer in list(x.outputs):
            if id(consumer) in ours:
                continue
            for i, t in enumerate(consumer.inputs):
                if t is x:
                    consumer.inputs[i] = sl
    # constants that carry the sequence length
    replaced: dict[str, Any] = {}
    ours = {id(n) for n in new_nodes}
    for n in list(graph.nodes):
        if id(n) in ours:
            continue
        for i, t in enumerate(n.inputs):
            if i in _WEIGHT_SLOTS.get(n.op, ()):
                continue
            v = _const(t)
            if v is None or t.name in replaced and replaced[t.name] is None:
                continue
            if t.name in replaced:
                n.inputs[i] = replaced[t.name]
                continue
            if n.op == "Reshape" and i == 1 and not n.attrs.get("allowzero", 0) and v.ndim == 1 and np.any(v == m.seq):
                d = _dims(n.inputs[0])  # the base graph's static shape of the data: S at the same positions?
                at = np.nonzero(v == m.seq)[0]
                if d is not None and len(d) > int(at.max()) and all(d[a] == m.seq for a in at):
                    n.inputs[i] = const("reshape_shape", np.where(v == m.seq, 0, v).astype(v.dtype))  # 0: copy the dim
                    continue
            new = None
            axes = [a for a, d in enumerate(v.shape) if d == m.seq]
            if axes:
                k = len(axes)
                ends = node("Concat", [length] * k, var(f"ends_{k}", np.int64), {"axis": 0}) if k > 1 else length
                new = node("Slice", [t, const("starts", np.zeros(k, dtype=np.int64)), ends,
                                     const("axes", np.array(axes, dtype=np.int64))], var("const_trimmed", v.dtype))
                new.shape = [TRIMMED_DIM if a in axes else int(d) for a, d in enumerate(v.shape)]
            elif np.issubdtype(v.dtype, np.integer) and v.ndim <= 1 and v.size <= _SHAPE_CONST_MAX_LEN \
                    and np.any(v == m.seq):
                ln = trimmed_length(v.dtype)
                if v.ndim == 0:
                    new = node("Squeeze", [ln], var("length_scalar", v.dtype))
                else:
                    new = node("Where", [const("is_seq", v == m.seq), ln, t], var("shape_trimmed", v.dtype))
            replaced[t.name] = new
            if new is not None:
                n.inputs[i] = new
    graph.nodes.extend(new_nodes)
    # tensor shapes recorded for length S are stale: shapes are inferred anew at export
    outs = {t.name for t in graph.outputs}
    trimmed = {id(nd.outputs[0]) for nd in new_nodes if nd.op == "Slice"}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in inputs and t.name not in outs and id(t) not in trimmed:
            t.shape = None


def annotate(model: "onnx.ModelProto", base: "onnx.ModelProto | None" = None, seq: int | None = None) \
        -> "onnx.ModelProto":
    """Shapes with the trimmed length as one symbolic dim (TRIMMED_DIM): on the Slices this pass made,
    and (given the shape-inferred `base` model and its sequence length `seq`) on every tensor of the
    same name whose base shape has `seq` on an axis; then inferred through the rest of the graph.
    onnxruntime's fusions (SkipLayerNormalization, MatMul + bias) need to see that the token-axis
    tensors they add have the same shape; inferred alone, the shapes are lost at the first Reshape
    or mask broadcast."""
    import onnx
    from onnx import helper, numpy_helper

    shapes = {vi.name: vi.type.tensor_type for vi in model.graph.input}
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for nd in model.graph.node:
        if nd.op_type == "Constant" and nd.attribute and nd.attribute[0].name == "value":
            values[nd.output[0]] = numpy_helper.to_array(nd.attribute[0].t)
    infos = []
    for nd in model.graph.node:
        if nd.op_type != "Slice" or not nd.name.startswith("/trim_padding/Slice") or len(nd.input) < 4:
            continue
        axes = values.get(nd.input[3])
        src = nd.input[0]
        if axes is None:
            continue
        if src in shapes:
            tt = shapes[src]
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            elem = tt.elem_type
        elif src in values:
            dims, elem = list(values[src].shape), helper.np_dtype_to_tensor_dtype(values[src].dtype)
        else:
            continue
        dims = [TRIMMED_DIM if a in {int(x) % len(dims) for x in np.ravel(axes)} else d for a, d in enumerate(dims)]
        infos.append(helper.make_tensor_value_info(nd.output[0], elem, dims))
    if base is not None and seq:
        have = {vi.name for vi in infos} | {o.name for o in model.graph.output}
        produced = {o for nd in model.graph.node for o in nd.output}
        for vi in base.graph.value_info:
            tt = vi.type.tensor_type
            if vi.name in have or vi.name not in produced or not tt.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            if seq in dims:
                infos.append(helper.make_tensor_value_info(
                    vi.name, tt.elem_type, [TRIMMED_DIM if d == seq else d for d in dims]))
    if not infos:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(infos)
    out = onnx.shape_inference.infer_shapes(out, check_type=False, strict_mode=False, data_prop=True)
    onnx.checker.check_model(out)
    return out


def _export(graph: "gs.Graph") -> "onnx.ModelProto":
    from graphopt.modelio.ir import export_graph

    return export_graph(graph.copy())  # a private copy: export_graph cleans up in place


# ------------------------------------------------------------------------------------- trial
def _trial_feeds(graph_inputs: list, m: _Match, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Padded feeds of several true lengths and mask patterns (synthetic: exactness is structural)."""
    rng = np.random.default_rng(seed)
    s = m.seq
    patterns = []
    for length in sorted({1, max(1, s // 3 + 1), max(1, s - 1), s}):
        mk = np.zeros(s, dtype=np.int64)
        mk[:length] = 1
        patterns.append(mk)
    holes = np.zeros(s, dtype=np.int64)  # a mask with holes: zeros inside, last token at s // 2
    holes[: s // 2 + 1] = rng.integers(0, 2, size=s // 2 + 1)
    holes[0] = holes[s // 2] = 1
    patterns.append(holes)
    feeds = []
    for mk in patterns:
        feed = {}
        for t in graph_inputs:
            shape = [int(d) if _is_static(d) else 1 for d in _dims(t)]
            dt = np.dtype(t.dtype)
            if t.name == m.mask:
                feed[t.name] = np.broadcast_to(mk, shape).astype(dt)
            elif np.issubdtype(dt, np.integer):
                feed[t.name] = rng.integers(0, 2, size=shape).astype(dt)  # valid ids for any vocabulary
            elif dt == np.bool_:
                feed[t.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                feed[t.name] = rng.standard_normal(shape).astype(dt)
        feeds.append(feed)
    return feeds


def trial(original: "onnx.ModelProto", trimmed: "onnx.ModelProto", feeds: list[dict[str, np.ndarray]]) -> str | None:
    """None when `trimmed` matches `original` on every feed (onnxruntime); else why not."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    try:
        a = ort.InferenceSession(original.SerializeToString(), so, providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(trimmed.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - the reason is the message
        return f"the trimmed graph does not load in onnxruntime: {str(e).strip().splitlines()[0][:300]}"
    for feed in feeds:
        ends = np.nonzero(np.any(feed_mask(feed) != 0, axis=0))[0] if feed_mask(feed) is not None else []
        length = int(ends[-1]) + 1 if len(ends) else 1
        want = a.run(None, feed)
        try:
            got = b.run(None, feed)
        except Exception as e:  # noqa: BLE001
            return (f"the trimmed graph fails at true length {length}: {str(e).strip().splitlines()[0][:300]} "
                    "(a shape that hard-codes the sequence length where the rewrite does not reach)")
        for o, w, g in zip(a.get_outputs(), want, got):
            w, g = np.asarray(w), np.asarray(g)
            if w.shape != g.shape:
                return f"output {o.name!r} changes shape at true length {length}: {list(w.shape)} -> {list(g.shape)}"
            if np.issubdtype(w.dtype, np.floating):
                bad = not np.allclose(g, w, rtol=_TRIAL_RTOL, atol=_TRIAL_ATOL * max(1.0, float(np.abs(w).max())))
            else:
                bad = not np.array_equal(g, w)
            if bad:
                diff = float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max())
                return (f"output {o.name!r} differs from the original at true length {length} (max abs diff "
                        f"{diff:.3g}): the sequence length is used where trimming is not exact (a Reshape over "
                        "the token axis, a weight indexed by position, or an unmasked reduction)")
    return None


def feed_mask(feed: dict[str, np.ndarray]) -> np.ndarray | None:
    for k, v in feed.items():
        if "mask" in k.lower() and np.ndim(v) == 2:
            return np.asarray(v)
    return None


def check(graph: "gs.Graph") -> tuple[_Match | str, "onnx.ModelProto | None"]:
    """(match or why not, the trimmed model when the trial passed)."""
    m = match(graph)
    if isinstance(m, str):
        return m, None
    original = _export(graph)
    g2 = graph.copy()
    _rewrite(g2, m)
    try:
        trimmed = _export(g2)
    except Exception as e:  # noqa: BLE001
        return f"the trimmed graph is not valid ONNX: {str(e).strip().splitlines()[0][:300]}", None
    why = trial(original, trimmed, _trial_feeds(graph.inputs, m))
    return (m, trimmed) if why is None else (why, None)


# ------------------------------------------------------------------------------------- the pass
class TrimPadding(Pass):
    """Keeps its own sites / rejections / apply, not match(): its one site is the whole encoder
    (keyed by the attention-mask input), not a node, and apply() trial-checks the rewrite."""

    name = "trim_padding"
    description = ("run a padded transformer encoder on the tokens up to the last unmasked one (exact; output "
                   "must not keep the token axis)")
    stage = 85  # after the float rewrites that match fixed-length patterns (attention: 20), before int8 (90)
    fidelity = "exact"  # for outputs without the token axis; every site is trial-checked against the original
    dynamic_shapes = True  # the rewritten graph's shapes depend on input values (graphopt.timing)
    OPTIONS = ()  # reads no pass options

    def __init__(self, **options: Any) -> None:
        self._last: tuple[Any, Any] | None = None  # (graph, check result): sites() and rejections() share it

    def _check(self, graph: "gs.Graph"):
        if self._last is None or self._last[0] is not graph:
            self._last = (graph, check(graph)[0])
        return self._last[1]

    def sites(self, graph: "gs.Graph") -> list[Site]:
        m = self._check(graph)
        if isinstance(m, str):
            return []
        return [Site(key=f"trim_padding:{m.mask}", pass_name=self.name, nodes=(),
                     choices=("keep", "trim"), exact_choice="trim", cost=0.0,
                     note=f"slice {', '.join(m.tokens)} to the last unmasked token of {m.seq} (exact)")]

    def rejections(self, graph: "gs.Graph") -> list[tuple[str, str]]:
        m = self._check(graph)
        return [("(graph inputs)", m)] if isinstance(m, str) else []

    def finalize(self, model, moves, ctx):
        """Symbolic token-axis shapes for onnxruntime's fusions (annotate), kept only when the
        annotated model still matches the candidate on the trial feeds."""
        import onnx_graphsurgeon as gs

        g = gs.import_onnx(model)
        m = match(g)
        if isinstance(m, str) or ctx.base_model is None:
            return model
        try:
            out = annotate(model, ctx.base_model, m.seq)
        except Exception as e:  # noqa: BLE001 - the shapes are an optimisation hint
            log.info("trim_padding: symbolic shapes not added: %s", e)
            return model
        why = trial(model, out, _trial_feeds(g.inputs, m))
        if why is not None:
            log.info("trim_padding: symbolic shapes not added: %s", why)
            return model
        return out

    def apply(self, graph: "gs.Graph", site: Site, choice: Choice, ctx: MoveContext) -> bool:
        if choice != "trim":
            raise ValueError(f"trim_padding: unknown choice {choice!r} for site {site.key}")
        m = match(graph)
        if isinstance(m, str):
            log.info("trim_padding does not apply: %s", m)
            return False
        original = _export(graph)
        import hashlib

        key = ("trim_padding_trial", hashlib.sha256(original.SerializeToString()).hexdigest())
        if key not in ctx.cache:  # candidates that differ only in later moves (int8) share the graph
            g2 = graph.copy()
            _rewrite(g2, m)
            ctx.cache[key] = trial(original, _export(g2), _trial_feeds(graph.inputs, m))
        why = ctx.cache[key]
        if why is not None:
            log.info("trim_padding does not apply to this candidate: %s", why)
            return False
        _rewrite(graph, m)
        return True
