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

and ctx.calibration as the calibration data (the driver holds half of the samples out and
judges fidelity on them, since `uses_calibration` is set). MinMax is deterministic.
Activation ranges are cached per pre-quantization graph (calibration_cache_path), so
candidates that quantize different node sets of the same graph calibrate once.

Why reduce_range on x86 without VNNI: onnxruntime's AVX2 u8s8 kernels (vpmaddubsw) saturate
int16 pair sums with full 8-bit weights. Measured on this project's VM (AVX2, no VNNI) on a
tiny conv net: max |int8 - fp32| 0.26 with 8-bit weights, 0.017 with reduce_range (7-bit).
ONNX's reference QDQ semantics (ORT with graph optimizations off, and TVM) are unaffected.

On onnxruntime the QDQ pairs execute as integer kernels (QLinearConv, QLinearMatMul, QGemm);
on TVM targets targets/qdq_lower.py lowers them to integer conv2d/matmul.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.errors import UsageError
from graphopt.genotype import Choice, Site
from graphopt.ir import node_by_name
from graphopt.plugin import MoveContext, Pass

from ._graph import _const, _input, _static_size

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs

QUANT_OPS = ("Conv", "MatMul", "Gemm")
GLOBAL_KEY = "int8:*"
ACTIVATION_TYPES = ("uint8", "int8")


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
    if reduce_range == "auto":
        reduce_range = _is_x86() and not host_has_vnni()
    if not isinstance(reduce_range, bool):
        raise UsageError(f"int8: int8_reduce_range={reduce_range!r}; use true, false or 'auto'")
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
                per_channel=True,
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


class Int8Quantize(Pass):
    """Static int8 quantization (QDQ) of chosen Conv/MatMul/Gemm nodes, or of the whole model."""

    name = "int8"
    description = "static int8 quantization (QDQ, per-channel weights, calibrated activations) per layer or whole model"
    stage = 90  # after every float rewrite: quantization sees the final float graph
    uses_calibration = True

    def sites(self, graph: gs.Graph) -> list[Site]:
        out = []
        for node in graph.nodes:
            if _why_not(node) is None:
                out.append(Site(key=f"int8:{node.name}", pass_name=self.name, nodes=(node.name,),
                                choices=("keep", "int8"), cost=_cost(node), note=f"{node.op} -> int8 (QDQ)"))
        if out:
            out.append(Site(key=GLOBAL_KEY, pass_name=self.name, nodes=tuple(s.nodes[0] for s in out),
                            choices=("keep", "all"), cost=sum(s.cost for s in out),
                            note="whole model int8 (every op the QDQ quantizer supports)"))
        return out

    def apply(self, graph: gs.Graph, site: Site, choice: Choice, ctx: MoveContext) -> bool:
        """Checks only; finalize() quantizes once, on the exported candidate."""
        if site.key == GLOBAL_KEY:
            if choice != "all":
                raise ValueError(f"int8: choice {choice!r} for site {site.key} is not 'all'")
            return True
        if choice != "int8":
            raise ValueError(f"int8: choice {choice!r} for site {site.key} is not 'int8'")
        node = node_by_name(graph, site.nodes[0])
        return node is not None and _why_not(node) is None

    def finalize(self, model: onnx.ModelProto, moves: list[tuple[Site, Choice]],
                 ctx: MoveContext) -> onnx.ModelProto:
        if not moves:
            return model
        whole = any(site.key == GLOBAL_KEY for site, _ in moves)
        nodes = None if whole else sorted({site.nodes[0] for site, _ in moves})
        cache_dir = ctx.cache.get("int8_ranges_dir")
        if cache_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="graphopt-int8-ranges-")
            ctx.cache["int8_ranges_tmp"] = tmp  # removed when the run's cache is dropped
            cache_dir = ctx.cache["int8_ranges_dir"] = tmp.name
        opts: dict[str, Any] = dict(ctx.options)
        return quantize(model, dict(ctx.calibration), nodes,
                        activations=str(opts.get("int8_activations", "uint8")),
                        reduce_range=opts.get("int8_reduce_range", "auto"), cache_dir=cache_dir)

    def rejections(self, graph: gs.Graph) -> list[tuple[str, str]]:
        out = []
        for node in graph.nodes:
            if node.op in QUANT_OPS:
                why = _why_not(node)
                if why:
                    out.append((node.name, why))
        return out
