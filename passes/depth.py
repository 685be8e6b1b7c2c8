"""Depth moves: remove a residual block (the branch goes, the skip stays) or a whole post-LN
transformer encoder layer.

Residual block. An `Add(x, y)` whose inputs have the same static shape (no broadcasting) and
where y = f(x): y's producers reach back to x. The branch is every node that lies on a path
from x to y (ancestors of y that are descendants of x); other inputs of the branch (an
attention mask, constants) may come from outside it. Removing the block means the Add's output
is taken over by x (its consumers read x; an Identity when it is a graph output) and the branch
becomes dead. Exact when f(x) == 0; otherwise approximate, judged by the driver's fidelity.
MBConv (EfficientNet), ResNet basic/bottleneck blocks, YOLO C2f/C3 bottlenecks and pre-LN
transformer sublayers (x + Attn(LN(x))) all have this form.

Encoder layer (post-LN, BERT / MiniLM). A layer is two post-LN residual units, y = LN1(x +
Attn(x)) then z = LN2(y + FFN(y)), the first holding the attention (a Softmax or a fused
Attention op). Removing the layer means the next layer (or the pooler) reads x instead of z: the
span from the layer's input hidden state to its second LayerNorm's output is bypassed. A single
post-LN unit is not a site: without its branch it would still compute LN(x), not x.

Sites are keyed by the node whose output is taken over (the residual Add, or the layer's last
LayerNormalization), choices ("keep", "remove"); the note names the block (the common prefix
of its node names). `rejections()` says why near misses are not sites: inputs of different
shapes, neither input computed from the other, a branch tensor read outside the block (side
outputs), a post-LN unit that is not part of a whole layer.

Repair (opt-in: pass option depth_repair=True, e.g. optimize(..., pass_options={"depth_repair":
True}); needs ctx.calibration; off with --no-repair): the layers that read the
removed block's output and are a Conv (group 1) or a constant-weight MatMul are refit by least
squares (graphopt.recovery.repair) so that, fed x, they reproduce what they computed from x + f(x) in the
original model. A reader of another kind (the next block's skip Add, a LayerNorm) is not changed,
so the repair is partial where the output also feeds a skip. Off by default because it measured
worse end to end although it lowers the refit layer's own error (EfficientNet-Lite0 block 2:
that layer's relative error 0.46 -> 0.39 on the eval images, yet logit cosine 0.969 -> 0.901;
worse on all 9 blocks; docs/depth.md). Residual blocks only: for a removed encoder layer,
refitting the next layer's Q/K/V (its skip still carries x) was worse too (MiniLM).

apply() matches the block again from its anchor node, so it still applies after an exact
fusion rewrote nodes inside the branch (conv_bn runs first, stage 10); later passes' sites inside
a removed block no longer apply (stage 15: before attention, width, kernel, int8).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from graphopt.genotype import Choice, Site
from graphopt.modelio.ir import node_by_name
from graphopt.plugin import MoveContext, Option, Pass

from ._graph import _const, _present, _static_size

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

_ATTENTION_OPS = ("Softmax", "Attention", "MultiHeadAttention")


@dataclass
class _Block:
    kind: str  # "residual" | "layer"
    anchor: "gs.Node"  # the Add (residual) or the last LayerNormalization (layer)
    skip: "gs.Variable"  # x: what takes over the anchor's output
    nodes: list = field(default_factory=list)  # every node removed with the block, anchor included

    @property
    def node_names(self) -> tuple[str, ...]:
        return (self.anchor.name,) + tuple(sorted(n.name for n in self.nodes if n is not self.anchor))

    def name(self) -> str:
        prefix = os.path.commonprefix([n.name for n in self.nodes])
        prefix = prefix[: prefix.rfind("/")] if "/" in prefix else prefix
        return prefix or self.anchor.name


# ----------------------------------------------------------------------------------- matching
def _producer(t):
    return t.inputs[0] if len(t.inputs) else None


def _descendants(x) -> set[int]:
    """ids of every node reachable forward from tensor x."""
    out: set[int] = set()
    stack = list(x.outputs)
    while stack:
        n = stack.pop()
        if id(n) in out:
            continue
        out.add(id(n))
        for t in n.outputs:
            stack.extend(t.outputs)
    return out


def _branch(x, y) -> list | None:
    """Nodes on a path from tensor x to tensor y (ancestors of y that descend from x), or None when
    y does not depend on x."""
    import onnx_graphsurgeon as gs

    down = _descendants(x)
    p = _producer(y)
    if p is None or id(p) not in down:
        return None
    nodes, seen, stack = [], set(), [y]
    while stack:
        t = stack.pop()
        if t is x or isinstance(t, gs.Constant) or not _present(t):
            continue
        p = _producer(t)
        if p is None or id(p) in seen or id(p) not in down:
            continue
        seen.add(id(p))
        nodes.append(p)
        stack.extend(p.inputs)
    return nodes


def _leak(nodes, allowed_readers, graph_outputs: set[str], keep: set[str] = frozenset()) -> str | None:
    """Why the block's tensors are needed outside it (side outputs), or None."""
    inside = {id(n) for n in nodes} | {id(n) for n in allowed_readers}
    for n in nodes:
        for t in n.outputs:
            if t.name in keep:
                continue
            if t.name in graph_outputs:
                return f"branch tensor {t.name} is a graph output (a side output)"
            for c in t.outputs:
                if id(c) not in inside:
                    return f"branch tensor {t.name} is also read by {c.op} {c.name} outside the block (a side output)"
    return None


def _residual(graph, add) -> _Block | str:
    """The residual block ending at `add`, or why it is not one."""
    a, b = (add.inputs + [None, None])[:2]
    if len(add.inputs) != 2 or _const(a) is not None or _const(b) is not None:
        return "not an Add of two computed tensors"
    sa, sb = tuple(a.shape or ()), tuple(b.shape or ())
    if _static_size(sa) is None or _static_size(sb) is None:
        return "input shapes are not static"
    if sa != sb:
        return f"inputs differ in shape {list(sa)} vs {list(sb)}: without the branch the output shape would change"
    if a is b:
        return "both inputs are the same tensor (x + x)"
    for x, y in ((a, b), (b, a)):
        nodes = _branch(x, y)
        if nodes is not None:
            break
    else:
        return "neither input is computed from the other (not x + f(x))"
    if not nodes:
        return "empty branch"
    outs = {t.name for t in graph.outputs}
    leak = _leak(nodes, [add], outs)
    if leak:
        return leak
    return _Block("residual", add, x, nodes + [add])


def _post_ln(add):
    """The LayerNormalization that is the Add's only reader (post-LN residual), else None."""
    out = add.outputs[0]
    readers = list(out.outputs)
    if len(readers) == 1 and readers[0].op == "LayerNormalization" and readers[0].inputs[0] is out:
        return readers[0]
    return None


def _unit(graph, ln) -> tuple[_Block, "gs.Node"] | str:
    """A post-LN unit LN(x + f(x)) ending at `ln`: (residual block of its Add, the Add)."""
    add = _producer(ln.inputs[0]) if ln.inputs else None
    if add is None or add.op != "Add" or _post_ln(add) is not ln:
        return "not LayerNormalization(Add)"
    r = _residual(graph, add)
    return r if isinstance(r, str) else (r, add)


def _layer(graph, ln2) -> _Block | str:
    """The post-LN encoder layer whose last LayerNormalization is `ln2`, or why not."""
    u2 = _unit(graph, ln2)
    if isinstance(u2, str):
        return u2
    b2, add2 = u2
    ln1 = _producer(b2.skip)
    if ln1 is None or ln1.op != "LayerNormalization":
        return "the unit's input is not a LayerNormalization output (no attention unit before it)"
    u1 = _unit(graph, ln1)
    if isinstance(u1, str):
        return f"the unit before it: {u1}"
    b1, add1 = u1
    if not any(n.op in _ATTENTION_OPS for n in b1.nodes):
        return "the unit before it has no attention (Softmax / Attention): not an encoder layer"
    if any(n.op in _ATTENTION_OPS for n in b2.nodes):
        return "this unit holds attention itself: it starts a layer, it does not end one"
    nodes = b1.nodes + [ln1] + b2.nodes + [ln2]
    outs = {t.name for t in graph.outputs}
    leak = _leak(nodes, [], outs, keep={ln2.outputs[0].name})
    if leak:
        return leak
    return _Block("layer", ln2, b1.skip, nodes)


def _cost(nodes) -> float:
    """FLOPs of the block's Conv / MatMul / Gemm nodes (2 per multiply-add)."""
    total = 0.0
    for n in nodes:
        if n.op not in ("Conv", "MatMul", "Gemm") or not n.outputs:
            continue
        out = _static_size(n.outputs[0].shape)
        w = _const(n.inputs[1]) if len(n.inputs) > 1 else None
        if out is None:
            continue
        if n.op == "Conv" and w is not None:
            total += 2.0 * out * int(np.prod(w.shape[1:]))
        elif n.op == "Gemm" and w is not None:
            total += 2.0 * out * int(w.shape[1] if int(n.attrs.get("transB", 0)) else w.shape[0])
        elif n.op == "MatMul":
            a = n.inputs[0].shape
            if a and isinstance(a[-1], (int, np.integer)):
                total += 2.0 * out * int(a[-1])
    return total


def _blocks(graph) -> tuple[list[_Block], list[tuple[str, str]]]:
    """(sites' blocks, rejections) in graph order."""
    blocks, rejected = [], []
    in_layer: dict[str, str] = {}  # post-LN Add name -> the layer site that covers it
    layers = []
    for n in graph.nodes:
        if n.op == "LayerNormalization":
            m = _layer(graph, n)
            if isinstance(m, _Block):
                layers.append(m)
                for x in m.nodes:
                    if x.op == "Add" and _post_ln(x) is not None:
                        in_layer[x.name] = m.anchor.name
    layer_of = {m.anchor.name: m for m in layers}
    for n in graph.nodes:
        if n.name in layer_of:
            blocks.append(layer_of[n.name])
        if n.op != "Add":
            continue
        if _const(n.inputs[0] if n.inputs else None) is not None or \
                (len(n.inputs) > 1 and _const(n.inputs[1]) is not None):
            continue  # a bias Add: not a near miss
        m = _residual(graph, n)
        if isinstance(m, str):
            rejected.append((n.name, m))
            continue
        ln = _post_ln(n)
        if ln is not None:
            where = (f"the encoder layer ending at {in_layer[n.name]} is the site" if n.name in in_layer
                     else "and it is not part of a whole post-LN encoder layer")
            rejected.append((n.name, f"post-LN residual (read only by LayerNormalization {ln.name}): without the "
                                     f"branch it computes LN(x), not x; {where}"))
            continue
        blocks.append(m)
    return blocks, rejected


# ------------------------------------------------------------------------------------- the pass
class DepthRemoval(Pass):
    """Keeps its own sites / rejections / apply, not match(): a site is a block of many nodes, and
    whether a residual Add is a site depends on the encoder layers found over the whole graph."""

    name = "depth"
    description = "remove a residual block (x + f(x) -> x) or a whole post-LN transformer encoder layer"
    fidelity = "approximate: the removed block's contribution is lost (optionally repaired on calibration data)"
    OPTIONS = (
        Option("depth_repair", bool, False, "refit the layer that reads a removed residual block"),
        Option("repair", bool, True, "least-squares repair of new weights on calibration data (--no-repair: 0)"),
    )
    stage = 15  # after exact fusions (conv_bn), before the passes that act inside blocks
    uses_calibration = True  # the opt-in least-squares repair (depth_repair) fits the readers to data

    def data_moves(self, sites, options) -> str | None:
        return ("least-squares repair of the readers (depth_repair)"
                if options.get("depth_repair", False) and options.get("repair", True) else None)

    def sites(self, graph: "gs.Graph") -> list[Site]:
        blocks, _ = _blocks(graph)
        out = []
        for b in blocks:
            what = "encoder layer" if b.kind == "layer" else "residual block"
            out.append(Site(key=f"depth:{b.anchor.name}", pass_name=self.name, nodes=b.node_names,
                            choices=("keep", "remove"), cost=_cost(b.nodes),
                            note=f"{what} {b.name()} ({len(b.nodes)} nodes): its output becomes its input "
                                 f"{b.skip.name}"))
        return out

    def apply(self, graph: "gs.Graph", site: Site, choice: Choice, ctx: MoveContext) -> bool:
        if choice != "remove":
            raise ValueError(f"depth: unknown choice {choice!r} for site {site.key}")
        anchor = node_by_name(graph, site.nodes[0])
        if anchor is None:
            return False
        m = _layer(graph, anchor) if anchor.op == "LayerNormalization" else \
            _residual(graph, anchor) if anchor.op == "Add" else "anchor changed"
        if isinstance(m, str):
            return False
        readers = _bypass(graph, m)
        # opt-in (pass option depth_repair): measured worse than no repair on EfficientNet-Lite0 and MiniLM
        # (docs/depth.md); encoder layers never (the next layer's skip still carries x)
        if m.kind == "residual" and ctx.options.get("depth_repair", False) and ctx.options.get("repair", True) \
                and ctx.calibration:
            _repair(graph, ctx, m.skip.name, m.anchor.outputs[0].name if m.anchor.outputs else None, readers)
        return True

    def rejections(self, graph: "gs.Graph") -> list[tuple[str, str]]:
        return _blocks(graph)[1]


def _bypass(graph, b: _Block) -> None:
    """The block's output is taken over by its input x; the block's nodes are left dead for
    cleanup (an Identity keeps the name when the output is a graph output)."""
    import onnx_graphsurgeon as gs

    out = b.anchor.outputs[0]
    x = b.skip
    if any(t is out for t in graph.outputs):
        b.anchor.outputs = []
        graph.nodes.append(gs.Node("Identity", name=f"{b.anchor.name}/depth_removed", inputs=[x], outputs=[out]))
        return []
    readers = list(out.outputs)
    for reader in readers:
        for i, t in enumerate(reader.inputs):
            if t is out:
                reader.inputs[i] = x
    b.anchor.outputs = []
    return readers


def _repair(graph, ctx: MoveContext, x_name: str, _out_name, readers) -> int:
    """Least-squares repair of the layers that read the removed block's output: each reader that
    is a Conv (group 1) or a MatMul with a constant weight, still holding the original model's
    weight, is refit so that, fed the block's input x, it reproduces what it computed from the
    block's output in the original model (activations on the fit data; bias refit too for a
    Conv). Readers of other kinds (the next block's skip Add, a LayerNorm) are left as they are.
    Returns the number of layers refit."""
    import onnx_graphsurgeon as gs
    from onnx import numpy_helper

    from graphopt.recovery.repair import activations, base_tensor_names, refit_conv, refit_linear

    from ._graph import _fresh_name, _input

    act = activations(ctx)
    names = base_tensor_names(ctx)
    if act is None or x_name not in names:
        return 0
    inits = ctx.cache.get("depth_base_inits")
    if inits is None:
        inits = ctx.cache["depth_base_inits"] = {t.name: t for t in ctx.base_model.graph.initializer}
    taken = {t.name for t in graph.tensors().values()}
    done = 0
    for n in readers:
        if n.op not in ("Conv", "MatMul") or len(n.inputs) < 2 or not isinstance(n.inputs[1], gs.Constant):
            continue
        if n.inputs[0].name != x_name or not n.outputs or n.outputs[0].name not in names:
            continue
        if n.op == "Conv" and int(n.attrs.get("group", 1) or 1) != 1:
            continue
        w0 = np.asarray(n.inputs[1].values)
        orig = inits.get(n.inputs[1].name)
        if orig is None or not np.array_equal(numpy_helper.to_array(orig), w0) or w0.ndim not in (2, 4):
            continue  # an earlier move changed this layer: the original's activations no longer describe it
        a = act.get([x_name, n.outputs[0].name])
        feats, target = a[x_name], a[n.outputs[0].name]
        if n.op == "Conv":
            b0 = _const(_input(n, 2))
            w, b = refit_conv(feats, target, w0, n.attrs, b0=b0, intercept=True)
        else:
            if w0.ndim != 2:
                continue
            w, b = refit_linear(feats.reshape(-1, feats.shape[-1]), target.reshape(-1, target.shape[-1]),
                                w0.T).T, None
        base = n.name.strip("/").replace("/", "_") or n.op
        n.inputs[1] = gs.Constant(_fresh_name(taken, f"{base}_weight_depth_refit"),
                                  np.ascontiguousarray(w.astype(w0.dtype)))
        if b is not None:
            bias = gs.Constant(_fresh_name(taken, f"{base}_bias_depth_refit"), np.ascontiguousarray(b.astype(w0.dtype)))
            if _input(n, 2) is not None:
                n.inputs[2] = bias
            else:
                n.inputs.append(bias)
        done += 1
    return done
