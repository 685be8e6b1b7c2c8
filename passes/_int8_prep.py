"""The float graph static int8 quantizes: exact rewrites that let onnxruntime run it as integer
kernels, and the node list for per-layer int8 (docs/int8.md).

Measured on EfficientNet-Lite0 (onnxruntime, ORT_ENABLE_ALL, 2 threads; docs/int8.md):

- An unfused BatchNormalization after a quantized Conv stays a float op between a QLinearConv and
  the next QuantizeLinear; onnxruntime's NHWC layout transform then wraps every such BN in
  Transposes (98 of them). int8 ran 2.2x slower than fp32. `prepare()` folds every BN into its
  Conv/Gemm/MatMul first (graphopt's exact conv_bn rewrite; node names are kept, so per-layer
  sites still match).
- A zero constant Pad in front of a Conv (EfficientNet's "static same" padding) is folded into
  the Conv's `pads`, as onnxruntime.quantization.quant_pre_process does, so no uint8 Pad with
  its own Q/DQ pair runs between the QLinearConvs.
- Per-layer int8 (nodes_to_quantize = a few Conv names) quantizes each chosen Conv's *output*
  with the range calibrated on that tensor. After BN folding that tensor is the pre-activation
  (EfficientNet: [-100, 100], a step of 0.77), and the Relu6 (Clip) after it keeps 8 of the 256
  levels: -8.5 top-1 points held out. Whole-model int8 does not lose them because the quantizer
  fuses the Clip (the Q goes after it, range [0, 6]). `with_activations()` adds each chosen
  node's sole Relu/Clip consumer to the node list so per-layer int8 gets the same placement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

ACTIVATIONS = ("Relu", "Clip")  # onnxruntime's QDQ "removable activations"


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every BatchNormalization that conv_bn can fold folded, and zero constant Pads
    folded into the Conv they feed. Exact; the input model is not modified; node names kept."""
    try:
        model = _fold_bn(model)
    except Exception as e:  # noqa: BLE001 - an export failure leaves the BNs float (slower), never fails int8
        import logging

        logging.getLogger("graphopt").info("int8: BatchNormalization not folded before quantizing (%s)",
                                           str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
    return _fold_pads(model)


def _fold_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return model
    from graphopt.modelio.ir import export_graph, import_graph

    from .conv_bn import ConvBnFusion

    p = ConvBnFusion()
    graph = import_graph(model)
    done = 0
    for site in p.sites(graph):
        done += bool(p.apply(graph, site, "fuse", None))  # apply() does not use its context
    if not done:
        return model
    out = export_graph(graph)
    out.metadata_props.extend(model.metadata_props)
    return out


def _fold_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    plan = {}  # pad node name -> (pads to add [h_b, w_b, h_e, w_e], its consumer convs)
    for n in g.node:
        if n.op_type != "Pad" or not n.name or n.output[0] in outputs:
            continue
        mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), "constant")
        if mode != "constant" or len(n.input) < 2 or n.input[1] not in inits or (len(n.input) > 3 and n.input[3]):
            continue
        if len(n.input) > 2 and n.input[2]:
            if n.input[2] not in inits or np.any(numpy_helper.to_array(inits[n.input[2]]) != 0):
                continue
        pads = numpy_helper.to_array(inits[n.input[1]]).astype(np.int64).ravel()
        if pads.size != 8 or np.any(pads < 0) or np.any(pads[[0, 1, 4, 5]] != 0):
            continue
        cons = consumers.get(n.output[0], [])
        if not cons or not all(c.op_type == "Conv" and c.input[0] == n.output[0] and n.output[0] not in c.input[1:]
                                and next((a.s.decode() for a in c.attribute if a.name == "auto_pad"), "NOTSET")
                                == "NOTSET" for c in cons):
            continue
        plan[n.name] = ([int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])], cons)
    if not plan:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_name = {n.name: n for n in out.graph.node}
    for pad_name, (add, cons) in plan.items():
        pad = by_name[pad_name]
        for c in cons:
            conv = by_name[c.name] if c.name in by_name else None
            if conv is None:  # an unnamed Conv: find it by its output
                conv = next(x for x in out.graph.node if list(x.output) == list(c.output))
            old = next((a for a in conv.attribute if a.name == "pads"), None)
            cur = list(old.ints) if old is not None else [0, 0, 0, 0]
            new = [a + b for a, b in zip(cur, add)]
            if old is not None:
                conv.attribute.remove(old)
            conv.attribute.append(onnx.helper.make_attribute("pads", new))
            conv.input[0] = pad.input[0]
        out.graph.node.remove(pad)
    live = {i for n in out.graph.node for i in n.input}
    keep = [i for i in out.graph.initializer if i.name in live or i.name in {x.name for x in out.graph.input}]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    onnx.checker.check_model(out)
    return out


def with_activations(model: onnx.ModelProto, nodes: Sequence[str]) -> list[str]:
    """`nodes` plus, for each, its output's only consumer when that is a Relu or Clip (so the
    quantizer puts the output Q after the activation and fuses it, as whole-model int8 does)."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    chosen = set(nodes)
    out = list(nodes)
    for n in model.graph.node:
        if n.name not in chosen or not n.output or n.output[0] in outputs:
            continue
        cons = consumers.get(n.output[0], [])
        if len(cons) == 1 and cons[0].op_type in ACTIVATIONS and cons[0].name and cons[0].name not in chosen:
            out.append(cons[0].name)
            chosen.add(cons[0].name)
    return out
