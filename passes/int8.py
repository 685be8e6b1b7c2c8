"""Static post-training int8 quantization (QDQ format) with onnxruntime.quantization.

An approximate move. Sites are the quantizable nodes (Conv, MatMul, Gemm with a constant float
weight), choices ("keep", "int8"), so the search can keep the layers that hurt fidelity most in
float, plus one global site `int8:*` with choices ("keep", "all") for whole-model int8 (every
op onnxruntime's QDQ quantizer handles, Add/pooling/... included).

`quantize_static` works on whole models, so apply() only checks that the chosen node still
exists (an earlier move may have replaced it) and `finalize()` quantizes once per candidate,
after every other pass, with

    quant_format=QDQ, per_channel=True, weight_type=QInt8, calibrate_method=MinMax,
    activation_type=QUInt8 (option int8_activations="int8" for QInt8),
    nodes_to_quantize=[the chosen nodes]   (None for int8:*=all),
    reduce_range=(option int8_reduce_range; default "auto": True on an x86 CPU without VNNI)

on the float graph passes/_int8_prep.py prepares (BatchNormalization and zero Pads folded into the
convs, exact; for per-layer int8 each chosen node's sole Relu/Clip consumer added to the node list,
so its output Q sits after the activation, as whole-model int8 places it; docs/int8.md: without
this int8 ran 2.2x slower than fp32 on EfficientNet-Lite0, and conv_bn + per-layer int8 lost 8.5
top-1 points), and ctx.calibration as the calibration data (the driver holds half of the samples out and
judges fidelity on them, since `uses_calibration` is set). MinMax is deterministic.
Activation ranges are cached per pre-quantization graph (calibration_cache_path), so
candidates that quantize different node sets of the same graph calibrate once.

Why reduce_range on x86 without VNNI: onnxruntime's AVX2 u8s8 kernels (vpmaddubsw) saturate
int16 pair sums with full 8-bit weights. Measured on this project's VM (AVX2, no VNNI) on a
tiny conv net: max |int8 - fp32| 0.26 with 8-bit weights, 0.017 with reduce_range (7-bit).
ONNX's reference QDQ semantics (ORT with graph optimizations off, and TVM) are unaffected.

On onnxruntime the QDQ pairs execute as integer kernels (QLinearConv, QLinearMatMul, QGemm);
on TVM targets targets/qdq_lower.py lowers them to integer conv2d/matmul.

Dynamic int8 (choice "dynamic": per MatMul site, or `int8:*`=dynamic for every MatMul and every
fused com.microsoft.Attention): onnxruntime.quantization.quantize_dynamic with **per-channel**
int8 weights; activations are quantized per tensor at run time, so there is no calibration
range to clip. On onnxruntime: DynamicQuantizeMatMul / MatMulInteger / QAttention. Measured on
MiniLM (40 held-out sentences): ORT's stock quantize_dynamic recipe (per-tensor weights)
gives embedding cosine 0.966; per-channel weights 0.991; per-channel + reduce_range 0.992
(the same "auto" rule as static: 7-bit weights on x86 without VNNI, where full-range
per-channel columns saturate the u8s8 int16 pair sums; on a toy MLP with outlier activations
per-channel without it was 3x worse than per-tensor). Per-tensor + reduce_range was 0.886.
Static int8 on MiniLM reached 0.94: a few post-GELU activations have outliers that one
calibrated range cannot cover.
TVM imports MatMulInteger / DynamicQuantizeLinear but not QAttention.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.errors import UsageError, first_line
from graphopt.genotype import Choice, Site
from graphopt.plugin import Fail, Match, MoveContext, Option, Pass

from ._graph import _const, _input, _static_size
from ._int8_prep import prepare, with_activations

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs

QUANT_OPS = ("Conv", "MatMul", "Gemm")
DYNAMIC_OPS = ("MatMul",)  # dynamic Conv (ConvInteger) is 10x slower than fp32 on ORT's CPU EP
GLOBAL_KEY = "int8:*"
log = logging.getLogger("graphopt")
ACTIVATION_TYPES = ("uint8", "int8")


def _reduce_range(value: Any) -> bool | str | None:
    """The pass option int8_reduce_range as True, False or "auto"; None when it is none of them."""
    if isinstance(value, bool) or value == "auto":
        return value
    word = str(value).strip().lower()
    return True if word in ("1", "true", "yes", "on") else False if word in ("0", "false", "no", "off") else None


class _AutoOrBool(Option):
    def problem(self, value: Any) -> str | None:
        return None if value is None or _reduce_range(value) is not None else "expected auto, true or false"


def host_has_vnni() -> bool:
    """True when /proc/cpuinfo lists AVX-512 VNNI or AVX-VNNI (int8 dot products without int16
    saturation); False when it lists neither or cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_vnni", "avx_vnni"} & flags)
    except OSError:
        pass
    return False


def _auto_reduce_range(value: Any) -> bool:
    """int8_reduce_range as a bool ("auto": True on an x86 CPU without VNNI)."""
    rr = _reduce_range(value)
    if rr is None:
        raise UsageError(f"int8: int8_reduce_range={value!r}; use true, false or 'auto'")
    return (_is_x86() and not host_has_vnni()) if rr == "auto" else rr


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _why_not(node: gs.Node) -> str | None:
    """None when `node` is a quantizable site; else why not."""
    if node.op not in QUANT_OPS:
        return f"{node.op} is not one of {'/'.join(QUANT_OPS)}"
    w = _const(_input(node, 1))
    if w is None:
        return "weight (input 1) is not a constant"
    if not np.issubdtype(w.dtype, np.floating):
        return f"weight dtype {w.dtype} is not floating point"
    if node.op == "Conv" and w.ndim != 4:
        return f"not a 2-D conv (weight has rank {w.ndim})"
    if node.op == "MatMul" and w.ndim != 2:
        return f"MatMul weight has rank {w.ndim}, not 2"
    return None


def _cost(node: gs.Node) -> float:
    """FLOPs of the node (2 * MACs), 0 when a shape is unknown."""
    w = _const(_input(node, 1))
    out = _static_size(node.outputs[0].shape) if node.outputs else None
    if w is None or out is None:
        return 0.0
    if node.op == "Conv":
        return 2.0 * out * float(np.prod(w.shape[1:]))
    k = w.shape[1] if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else w.shape[0]
    return 2.0 * out * float(k)


class _Reader:
    """onnxruntime CalibrationDataReader over ctx.calibration ({name: [samples, *shape]})."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.n = next(iter(arrays.values())).shape[0] if arrays else 0
        self._it: Iterator[dict[str, np.ndarray]] = self._samples()

    def _samples(self):
        for i in range(self.n):
            yield {k: np.ascontiguousarray(v[i]) for k, v in self.arrays.items()}

    def get_next(self):
        return next(self._it, None)

    def __len__(self) -> int:
        return self.n

    def rewind(self) -> None:
        self._it = self._samples()

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = ({k: np.ascontiguousarray(v[i]) for k, v in self.arrays.items()}
                    for i in range(start_index, min(end_index, self.n)))


def quantize(model: onnx.ModelProto, calibration: dict[str, np.ndarray], nodes: Sequence[str] | None, *,
             activations: str = "uint8", reduce_range: bool | str = "auto",
             cache_dir: str | Path | None = None) -> onnx.ModelProto:
    """QDQ-quantize `model` (static, per-channel int8 weights, MinMax-calibrated activations).

    `nodes`: names of the nodes to quantize (None: every op the QDQ quantizer supports).
    `calibration`: input name -> array [samples, *input shape]. `cache_dir`: where activation
    ranges are cached per pre-quantization graph. Returns a checked ModelProto.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if activations not in ACTIVATION_TYPES:
        raise UsageError(f"int8: int8_activations={activations!r}; choose one of {', '.join(ACTIVATION_TYPES)}")
    reduce_range = _auto_reduce_range(reduce_range)
    if not calibration:
        raise UsageError("int8: static quantization needs calibration data; pass --data samples.npz "
                         "(or let graphopt synthesize samples)")
    graph_inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    missing = sorted(graph_inputs - set(calibration))
    if missing:
        raise UsageError(f"int8: calibration data has no array for input(s) {missing}")

    class Reader(_Reader, CalibrationDataReader):
        pass

    reader = Reader({k: v for k, v in calibration.items() if k in graph_inputs})
    model, per_channel = opset_for_qdq(model)
    # BN and Pad folded (else float ops between the int8 kernels: 2.2x slower than fp32), and each
    # chosen node's Relu/Clip quantized with it (else its output range is the pre-activation's);
    # passes/_int8_prep.py, docs/int8.md
    model = prepare(model)
    if nodes is not None:
        nodes = with_activations(model, nodes)
    with tempfile.TemporaryDirectory(prefix="graphopt-int8-") as tmp:
        out = Path(tmp) / "qdq.onnx"
        # Pass a path, never the ModelProto: given a proto, quantize_static re-saves it with external
        # data *in place*, leaving the caller's proto pointing at a deleted temp file.
        src = Path(tmp) / "fp32.onnx"
        onnx.save_model(model, str(src), save_as_external_data=model.ByteSize() > 1_800_000_000)
        cache = None
        if cache_dir is not None:
            h = hashlib.sha256(model.SerializeToString(deterministic=True))
            h.update(repr(sorted((k, v.shape, str(v.dtype)) for k, v in reader.arrays.items())).encode())
            for k in sorted(reader.arrays):
                h.update(np.ascontiguousarray(reader.arrays[k]).tobytes())
            cache = Path(cache_dir) / f"ranges-{h.hexdigest()[:24]}.json"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_static logs "please pre-process" warnings at root
        try:
            quantize_static(
                src, out, reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=list(nodes) if nodes is not None else None,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=cache,
            )
        finally:
            root.setLevel(level)
        q = onnx.load(str(out))
    onnx.checker.check_model(q)
    return q


QDQ_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (their `axis`) need opset 13
_said: set[str] = set()  # log each opset decision once per model per process


def opset_for_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """(model, per_channel). Per-channel QDQ needs opset >= 13: an older model is converted with
    onnx.version_converter, and kept converted only if the result passes onnx.checker and
    onnxruntime runs it; otherwise the model stays at its opset and weights are quantized per
    tensor. Either way the decision is logged (and recorded in the model's metadata_props)."""
    import onnx

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), QDQ_OPSET)
    if opset >= QDQ_OPSET:
        return model, True
    key = hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()[:16]
    try:
        from onnx import version_converter

        conv = version_converter.convert_version(model, QDQ_OPSET)
        onnx.checker.check_model(conv)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(conv.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds
        why = first_line(e, 200)
        if key + "/per-tensor" not in _said:
            _said.add(key + "/per-tensor")
            log.info("int8: opset %d < %d and onnx.version_converter failed (%s): quantizing weights per tensor",
                     opset, QDQ_OPSET, why)
        _note(model, f"opset {opset}: version conversion failed ({why}); per-tensor weights")
        return model, False
    if key + "/converted" not in _said:
        _said.add(key + "/converted")
        log.info("int8: opset %d < %d: converted to opset %d with onnx.version_converter (checked) for per-channel "
                 "QDQ", opset, QDQ_OPSET, QDQ_OPSET)
    _note(conv, f"opset {opset} converted to {QDQ_OPSET} (onnx.version_converter) for per-channel weights")
    return conv, True


def _note(model: onnx.ModelProto, text: str) -> None:
    from graphopt.modelio.hints import set_hint  # a metadata entry like a hint (not one: no target reads it)

    set_hint(model, "graphopt.int8", text)


def quantize_dynamic_nodes(model: onnx.ModelProto, nodes: Sequence[str], *, per_channel: bool = True,
                           reduce_range: bool | str = "auto") -> onnx.ModelProto:
    """Dynamic int8 for the named MatMul / com.microsoft.Attention nodes (per-channel int8 weights,
    activations quantized at run time). Returns a checked ModelProto; `model` is not modified."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not nodes:
        return model
    reduce_range = _auto_reduce_range(reduce_range)
    with tempfile.TemporaryDirectory(prefix="graphopt-int8d-") as tmp:
        src, out = Path(tmp) / "fp32.onnx", Path(tmp) / "dyn.onnx"
        onnx.save_model(model, str(src), save_as_external_data=model.ByteSize() > 1_800_000_000)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(src, out, weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=reduce_range,
                             nodes_to_quantize=list(nodes), op_types_to_quantize=["MatMul", "Attention"],
                             # shape inference stops at contrib ops (com.microsoft.Attention)
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            root.setLevel(level)
        q = onnx.load(str(out))
    onnx.checker.check_model(q)
    return q


def _dynamic_candidates(model: onnx.ModelProto) -> list[str]:
    """Nodes dynamic int8 can take in `model`: MatMul with a 2-D float initializer weight, and
    com.microsoft.Attention (its packed qkv weight is an initializer)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.input) > 1 and n.input[1] in inits:
            w = inits[n.input[1]]
            if len(w.dims) == 2 and w.data_type in (1, 10, 16):  # float, float16, bfloat16
                out.append(n.name)
        elif n.op_type == "Attention" and n.domain == "com.microsoft" and len(n.input) > 1 and n.input[1] in inits:
            out.append(n.name)
    return out


class Int8Quantize(Pass):
    """Static int8 quantization (QDQ) of chosen Conv/MatMul/Gemm nodes, or of the whole model."""

    name = "int8"
    description = "static int8 quantization (QDQ, per-channel weights, calibrated activations) per layer or whole model"
    stage = 90  # after every float rewrite: quantization sees the final float graph
    fidelity = ("approximate: weights int8 per channel; static activations uint8 on calibrated ranges "
                "(fit split), dynamic activations quantized at run time; measured on select like any move")
    uses_calibration = True
    OPTIONS = (
        Option("int8_activations", str, "uint8", "static activations' type (int8: S8S8; prefer uint8 on x86)",
               choices=ACTIVATION_TYPES),
        _AutoOrBool("int8_reduce_range", str, "auto", "7-bit weights (auto: on an x86 CPU without VNNI)",
                    choices=("auto", "true", "false")),
    )
    anchor_ops = QUANT_OPS

    def match(self, graph: gs.Graph, node: gs.Node) -> Match | Fail:
        why = _why_not(node)
        if why:
            return Fail(why)
        dyn = node.op in DYNAMIC_OPS
        return Match(node, choices=("keep", "int8") + (("dynamic",) if dyn else ()), cost=_cost(node),
                     note=f"{node.op} -> int8 (QDQ" + (", or dynamic)" if dyn else ")"))

    def sites(self, graph: gs.Graph) -> list[Site]:
        """One site per quantizable node (from match()), plus the whole-model site int8:*."""
        out = super().sites(graph)
        if out:
            dyn = any("dynamic" in s.choices for s in out)
            out.append(Site(key=GLOBAL_KEY, pass_name=self.name, nodes=tuple(s.nodes[0] for s in out),
                            choices=("keep", "all") + (("dynamic",) if dyn else ()), cost=sum(s.cost for s in out),
                            note="whole model int8 (all: every op the QDQ quantizer supports; "
                                 "dynamic: every MatMul and fused Attention, dynamic int8)"))
        return out

    def check_choice(self, site: Site, choice: Choice) -> None:
        if site.key == GLOBAL_KEY and choice not in ("all", "dynamic"):
            raise ValueError(f"int8: choice {choice!r} for site {site.key} is not 'all' or 'dynamic'")
        if site.key != GLOBAL_KEY and choice not in ("int8", "dynamic"):
            raise ValueError(f"int8: choice {choice!r} for site {site.key} is not 'int8' or 'dynamic'")

    def apply(self, graph: gs.Graph, site: Site, choice: Choice, ctx: MoveContext) -> bool:
        """Checks only (the node is still there and takes the choice); finalize() quantizes once,
        on the exported candidate."""
        if site.key == GLOBAL_KEY:
            self.check_choice(site, choice)
            return True
        return super().apply(graph, site, choice, ctx)

    def rewrite(self, graph: gs.Graph, match: Match, choice: Choice, ctx: MoveContext) -> bool:
        return choice == "int8" or match.nodes[0].op in DYNAMIC_OPS

    def finalize(self, model: onnx.ModelProto, moves: list[tuple[Site, Choice]],
                 ctx: MoveContext) -> onnx.ModelProto:
        """Static QDQ first (the nodes chosen "int8", or everything for int8:*=all), then dynamic
        int8 on the nodes chosen "dynamic" (int8:*=dynamic: every MatMul / fused Attention not
        chosen "int8"). int8:*=all overrides per-node choices."""
        if not moves:
            return model
        glob = next((c for site, c in moves if site.key == GLOBAL_KEY), None)
        static = sorted({site.nodes[0] for site, c in moves if site.key != GLOBAL_KEY and c == "int8"})
        dynamic = sorted({site.nodes[0] for site, c in moves if site.key != GLOBAL_KEY and c == "dynamic"})
        if glob == "all":
            return self._static(model, None, ctx)
        if static:
            model = self._static(model, static, ctx)
        if glob == "dynamic":
            dynamic = [n for n in _dynamic_candidates(model) if n not in set(static)]
        else:
            present = set(_dynamic_candidates(model))
            dynamic = [n for n in dynamic if n in present]
        if not dynamic:
            return model
        return quantize_dynamic_nodes(model, dynamic, reduce_range=dict(ctx.options).get("int8_reduce_range", "auto"))

    def _static(self, model: onnx.ModelProto, nodes: list[str] | None, ctx: MoveContext) -> onnx.ModelProto:
        cache_dir = ctx.cache.get("int8_ranges_dir")
        if cache_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="graphopt-int8-ranges-")
            ctx.cache["int8_ranges_tmp"] = tmp  # removed when the run's cache is dropped
            cache_dir = ctx.cache["int8_ranges_dir"] = tmp.name
        opts: dict[str, Any] = dict(ctx.options)
        return quantize(model, dict(ctx.calibration), nodes,
                        activations=str(opts.get("int8_activations", "uint8")),
                        reduce_range=opts.get("int8_reduce_range", "auto"), cache_dir=cache_dir)

    def data_moves(self, sites: list[Site], options) -> str | None:
        static = any(c in ("int8", "all") for s in sites for c in s.choices)
        return "static int8 calibration (activation ranges)" if static else None
