"""Fuse scaled dot-product attention blocks into one com.microsoft.Attention op; prune heads; cheaper
block-local (windowed) and linear attention forms.

Recognised forms (each a self-attention block whose Q, K and V are constant-weight projections
of one input X [B, S, hidden]):

  classic   MatMul(Q, K^T) -> Mul/Div(scale) -> Add(mask) -> Softmax -> MatMul(., V)
            (transformers' eager path, torch.onnx dynamo=False)
  sdpa      the scale split as Mul(sqrt(scale)) on Q and on K^T, and Where(IsNaN(P), 0, P) after
            the Softmax (transformers' sdpa path)
  qkv       one fused qkv projection, Reshape [B, S, 3, H, D] -> Transpose(2, 0, 3, 1, 4) ->
            Gather / Slice+Squeeze per Q, K, V (SVTR / ViT style)
  onnx23    the ONNX opset-23 `Attention` op on 4-D Q, K, V (torch.onnx dynamo=True, opset 23)

Per head Q/V are Transpose(0, 2, 1, 3)(Reshape(proj, [B, S, H, D])); K^T is Transpose(0, 2, 3, 1)
of the same, or Transpose(0, 1, 3, 2) of a per-head K. After the attention, Transpose(0, 2, 1, 3)
and Reshape back to [B, S, H * D] end the block; the tensor that Reshape writes is replaced.

Choices per site:
  "fused"    exact. One com.microsoft.Attention node: packed weights [hidden, 3 * H * D] and bias,
             the mask (additive float, or a bool mask turned into 0 / float32-min) as its
             `attention_bias` input (broadcast to [., ., S, T] with an Expand when needed). The
             scale is folded into the Q weights when it is not the default 1/sqrt(D), because
             TVM's importer rejects the `scale` attribute. A mask that calibration data shows
             to be a padding mask of a [B, T] graph input (see padding_masks) is passed instead
             as `mask_index` (that input cast to int32), the form onnxruntime's QAttention
             keeps when int8 dynamic quantization quantizes the fused op.
             com.microsoft.Attention is the one
             contrib attention op that both onnxruntime and TVM 0.27 import
             (TVM -> R.nn.attention); MultiHeadAttention and the opset-23 op fail in TVM.
  "prune_k"  approximate: the fused op with the k least important heads removed, and the rows
             of the output projection (a constant-weight MatMul right after the block, required)
             that read them. Head importance = mean L2 norm, over the calibration samples and
             positions, of the head's contribution to the output projection
             (context_h @ W_o[h rows]); computed once per run with onnxruntime on the base model.
             Fidelity is measured by the driver (uses_calibration: held-out half).

  "window_W" approximate, a cheaper form for long sequences: block-local attention. The sequence is
             cut into S/W blocks of W tokens and each query attends only to the keys of its own
             block (scores [B, H, S/W, W, W] instead of [B, H, S, S]: the two attention matmuls
             and the softmax cost W/S of the original). Plain ONNX ops (one packed qkv MatMul,
             Reshape/Transpose, MatMul, Softmax), so every target compiles it. Offered for
             W = S/2, S/4, S/8 (W >= 4, S % W == 0) when there is no mask or the mask does not
             depend on the query: a key-padding mask [., ., 1, T], or a [., ., S, T] mask that
             calibration data shows to be a padding mask (see padding_masks; the bias is then
             rebuilt from that [B, T] input, else the move does not apply); clamped at -1e4
             (onnxruntime's mask_filter_value) so a block whose keys are all masked gives finite
             rows (attention within the block) instead of NaN.
             Exact for a query whose unmasked keys all lie in its own block (a padded sentence
             no longer than W tokens); otherwise its fidelity is measured like any other choice.
  "linear"   approximate: linear attention, softmax(QK^T)V replaced by
             phi(Q) (phi(K)^T V) / (phi(Q) sum_t phi(K_t)) with phi = elu + 1 (Katharopoulos et al.
             2020), masked keys zeroed in phi(K). Cost O(S D^2) instead of O(S^2 D). Without
             retraining the pretrained weights it is a different function; it is offered so
             the search measures that, not assumed (see the README for what it measured).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from graphopt.genotype import Choice, Site
from graphopt.plugin import Fail, Match, MoveContext, Pass

from ._graph import _const
# the pattern matching and the rewrites live in two modules (split for size)
from ._attention_match import (_can_prune, _candidates, _match, _Match, _out_proj, _prune_counts,
                               _shape)
from ._attention_rewrite import _local_ok, _query_free_mask, _rewrite, _rewrite_local, _window_sizes

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

_MAX_IMPORTANCE_SAMPLES = 16


# -------------------------------------------------------------------------------- importance
def _importance(ctx: MoveContext, site_key: str) -> np.ndarray:
    """Per-head importance of every site, from one onnxruntime run of the base model."""
    cache = ctx.cache.setdefault("attention_importance", {})
    if site_key in cache:
        return cache[site_key]
    import onnx
    import onnxruntime as ort

    from graphopt.errors import DataError
    from graphopt.modelio.ir import import_graph

    if not ctx.calibration:
        raise DataError("attention prune: head importance needs calibration data; pass --data samples.npz")
    base = import_graph(ctx.base_model)
    matches = {}
    for n in _candidates(base):
        mm = _match(n)
        if isinstance(mm, _Match) and _can_prune(mm):
            matches[f"attention:{n.name}"] = mm
    model = onnx.ModelProto()
    model.CopyFrom(ctx.base_model)
    have = {o.name for o in model.graph.output}
    for mm in matches.values():
        if mm.context.name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(mm.context.name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [mm.context.name for mm in matches.values()]
    feeds = {i.name for i in sess.get_inputs()}
    n = min(_MAX_IMPORTANCE_SAMPLES, next(iter(ctx.calibration.values())).shape[0])
    sums = {k: np.zeros(mm.heads) for k, mm in matches.items()}
    for i in range(n):
        outs = sess.run(names, {k: v[i] for k, v in ctx.calibration.items() if k in feeds})
        for (key, mm), c in zip(matches.items(), outs):
            wo = _const(_out_proj(mm).inputs[1]).astype(np.float64)  # [H*D, hidden]
            c = c.astype(np.float64)  # [B, H, S, D]
            for hh in range(mm.heads):
                contrib = c[:, hh] @ wo[hh * mm.head_dim:(hh + 1) * mm.head_dim]  # [B, S, hidden]
                sums[key][hh] += float(np.linalg.norm(contrib, axis=-1).mean())
    for key, total in sums.items():
        cache[key] = total / max(n, 1)
    if site_key not in cache:
        raise ValueError(f"attention: no head importance for site {site_key}")
    return cache[site_key]


def _ancestor_inputs(graph: gs.Graph, t) -> set[str]:
    """Names of the graph inputs that tensor `t` depends on."""
    inputs = {x.name for x in graph.inputs}
    seen, stack, found = set(), [t], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if x.name in inputs:
            found.add(x.name)
        for p in x.inputs:  # producer nodes
            stack.extend(p.inputs)
    return found


def padding_masks(ctx: MoveContext) -> dict[str, str]:
    """Mask tensors of the base model's attention blocks that are padding masks: tensor name ->
    the rank-2 integer/bool graph input [B, T] they are computed from.

    A mask qualifies when (a) the only graph input it depends on is that [B, T] input, and (b) on
    every calibration sample (up to 16) the mask, broadcast to [B, ., S, T], is exactly 0 where
    the input is non-zero and <= -1e4 where it is zero, for every query row (a bool mask: True
    and False); and at least one
    zero was seen. Such a mask can be passed as com.microsoft.Attention's `mask_index` (ORT adds
    mask_filter_value -1e4 at zeros; after the softmax that is the same 0 weight as -3.4e38),
    which onnxruntime's quantizer keeps when it turns Attention into QAttention (it drops an
    `attention_bias` input, so quantized attention would attend to padding). Cached per run.
    """
    if "attention_padding_masks" in ctx.cache:
        return ctx.cache["attention_padding_masks"]
    out: dict[str, str] = {}
    ctx.cache["attention_padding_masks"] = out
    if not ctx.calibration or ctx.base_model is None:
        return out
    import onnx
    import onnxruntime as ort

    from graphopt.modelio.ir import import_graph

    base = import_graph(ctx.base_model)
    masks, mask_dtypes = {}, {}
    for n in _candidates(base):
        mm = _match(n)
        if isinstance(mm, _Match) and mm.mask is not None and mm.mask.name:
            ms = _shape(mm.mask)
            srcs = _ancestor_inputs(base, mm.mask)
            if ms is None or len(srcs) != 1:
                continue
            src = next(x for x in base.inputs if x.name in srcs)
            ss = src.shape
            if (ss is None or len(ss) != 2 or ss[1] != ms[-1] or src.dtype is None
                    or not (np.issubdtype(np.dtype(src.dtype), np.integer) or np.dtype(src.dtype) == np.bool_)):
                continue
            if mm.mask.dtype is None:
                continue
            masks[mm.mask.name] = src.name
            mask_dtypes[mm.mask.name] = mm.mask.dtype
    if not masks:
        return out
    model = onnx.ModelProto()
    model.CopyFrom(ctx.base_model)
    have = {o.name for o in model.graph.output}
    names = sorted(masks)
    for nm in names:
        if nm not in have:
            dt = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(mask_dtypes[nm]))
            model.graph.output.append(onnx.helper.make_tensor_value_info(nm, dt, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - an unverifiable mask keeps the exact bias form
        return out
    feeds = {i.name for i in sess.get_inputs()}
    if not feeds <= set(ctx.calibration):
        return out
    n = min(_MAX_IMPORTANCE_SAMPLES, next(iter(ctx.calibration.values())).shape[0])
    ok = {nm: True for nm in names}
    zeros = {nm: False for nm in names}
    for i in range(n):
        feed = {k: ctx.calibration[k][i] for k in feeds}
        for nm, val in zip(names, sess.run(names, feed)):
            keep = np.asarray(feed[masks[nm]]) != 0  # [B, T]
            is_bool = np.asarray(val).dtype == np.bool_  # bool masks: True = attend
            v = np.asarray(val, dtype=np.float64)
            if v.ndim > 4:
                ok[nm] = False
                continue
            v = v.reshape((1,) * (4 - v.ndim) + v.shape)
            try:
                v = np.broadcast_to(v, (keep.shape[0],) + v.shape[1:3] + (keep.shape[1],))
            except ValueError:
                ok[nm] = False
                continue
            kb = np.broadcast_to(keep[:, None, None, :], v.shape)
            zeros[nm] |= bool((~keep).any())
            if is_bool:
                ok[nm] &= bool(np.all(v[kb] == 1.0) and np.all(v[~kb] == 0.0))
            else:
                ok[nm] &= bool(np.all(v[kb] == 0.0) and np.all(v[~kb] <= -1e4))
    out.update({nm: masks[nm] for nm in names if ok[nm] and zeros[nm]})
    return out


# ------------------------------------------------------------------------------------- the pass
class AttentionFusion(Pass):
    name = "attention"
    description = ("fuse attention blocks into com.microsoft.Attention (exact); prune least important heads; "
                   "block-local (window_W) or linear attention")
    fidelity = "fusion exact; head pruning, windowed and linear attention approximate (calibrated)"
    OPTIONS = ()  # reads no pass options
    stage = 20
    uses_calibration = True  # prune_k ranks heads on calibration data

    anchor_ops = ("Softmax", "Attention")

    def match(self, graph: gs.Graph, n: gs.Node) -> Match | Fail | None:
        if n.op == "Attention" and (n.domain or "") not in ("", "ai.onnx"):
            return None  # com.microsoft.Attention: already fused
        m = _match(n)
        if isinstance(m, str):
            return Fail(m)
        choices: tuple = ("keep", "fused")
        if _can_prune(m):
            choices += tuple(f"prune_{k}" for k in _prune_counts(m.heads))
        choices += tuple(f"window_{w}" for w in _window_sizes(m))
        if _local_ok(m):
            choices += ("linear",)
        s, hid = _shape(m.q.x)[1], m.heads * m.head_dim
        cost = 2.0 * _shape(m.q.x)[0] * (2 * s * s * hid + 3 * s * _shape(m.q.x)[2] * hid)
        nodes = {x.name: x for x in [n] + m.core + m.q.nodes + m.k.nodes + m.v.nodes}  # the anchor first
        return Match(*nodes.values(), choices=choices, exact_choice="fused", cost=cost, block=m,
                     note=f"{m.form} attention, {m.heads} heads x {m.head_dim}, seq {s}"
                          + (", masked" if m.mask is not None else ""))

    def check_choice(self, site: Site, choice: Choice) -> None:
        """fused, linear, prune_k, window_W (a k or W the block cannot take does not apply)."""
        if choice not in ("fused", "linear") and not (
                isinstance(choice, str) and choice.startswith(("prune_", "window_"))):
            raise ValueError(f"attention: unknown choice {choice!r} for site {site.key}")

    def rewrite(self, graph: gs.Graph, match: Match, choice: Choice, ctx: MoveContext) -> bool:
        m = match.block
        src = padding_masks(ctx).get(m.mask.name) if m.mask is not None else None
        if choice == "linear" or str(choice).startswith("window_"):
            w = int(str(choice).split("_", 1)[1]) if choice != "linear" else 0
            if (w and w not in _window_sizes(m)) or not _local_ok(m):
                return False
            if m.mask is not None and src is None and (m.mask_is_bool or _query_free_mask(m) is None):
                return False  # a query-dependent mask (causal, per-pair) has no block-local form here
            _rewrite_local(graph, m, "window" if w else "linear", w, mask_source=src)
            return True
        if choice == "fused":
            _rewrite(graph, m, mask_source=src)
            return True
        k = int(str(choice).split("_", 1)[1])
        if not 0 < k < m.heads or not _can_prune(m):
            return False
        imp = _importance(ctx, self.site_key(match.nodes[0]))
        keep = sorted(np.argsort(-imp, kind="stable")[: m.heads - k].tolist())
        _rewrite(graph, m, keep_heads=keep, mask_source=src)
        return True

    def data_moves(self, sites: list[Site], options) -> str | None:
        prune = any(str(c).startswith("prune_") for s in sites for c in s.choices)
        return "head importance ranked on calibration data (prune_k)" if prune else None
