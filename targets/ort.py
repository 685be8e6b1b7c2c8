"""onnxruntime on this CPU: the runtime users compare against.

Sessions use ORT_ENABLE_ALL graph optimizations and an explicit intra-op thread count (stated
in the report). Latency = median over `repeat` timed repeats of `number` runs each, after
`warmup` untimed runs.

Per-layer latency: a measurement told TargetContext(profile_layers=True) (the driver's per-layer
measurement of the best at the end of a run), or every measurement with `--target-opt profile=1`,
adds Measurement.extra["layers"] (see profile_layers: onnxruntime's own per-node kernel times,
from a separate profiling session, so the timed runs carry no profiling overhead).
`OrtTarget.profile(model, inputs)` gives the same table for one model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from graphopt.errors import CompileError, UsageError
from graphopt.plugin import Artifact, LatencyStats, Measurement, Option, Target

from .host import cpu_model_name

# ops ORT folds into the Conv/Gemm/MatMul before them (Conv+BN, FusedConv activations, NCHWc)
_FOLDED_INTO_PRODUCER = {"BatchNormalization", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu",
                         "Tanh", "Add", "Mul", "Sum"}
_ORT_SUFFIXES = ("_nchwc", "_token")
LAYERS_KEPT = 200  # slowest layers kept in a measurement (the HTML report shows the top 20)


def _ort_node_origin(name: str, nodes: dict[str, Any], producer: dict[str, Any],
                     consumers: dict[str, int]) -> list[str]:
    """The model nodes one ORT (optimized graph) node stands for, best effort.

    ORT names a fused or re-laid-out node after a node or a tensor of the model ("conv0",
    "r0_nchwc" = the node that produces tensor r0). From there, walk up through the ops ORT
    folds into their producer (BN, activations, bias adds) while each link has one consumer,
    stopping after the first op that is not foldable (the Conv/Gemm that absorbed them).
    """
    base = name
    for suf in _ORT_SUFFIXES:
        i = base.find(suf)
        if i > 0:
            base = base[:i]
    node = nodes.get(base) or producer.get(base)
    if node is None:
        return []
    out = [node.name]
    while node.op_type in _FOLDED_INTO_PRODUCER and node.input:
        prev = producer.get(node.input[0])
        if prev is None or consumers.get(node.input[0], 0) != 1:
            break
        out.append(prev.name)
        node = prev
    return out


def profile_layers(model, inputs: Mapping[str, np.ndarray], session_options, warmup: int = 3,
                   runs: int = 10) -> dict[str, Any]:
    """Per-node latency under onnxruntime: {"layers": [{"node", "op", "ms", "nodes"}], ...}.

    A fresh session with SessionOptions.enable_profiling runs `warmup` + `runs` times; each
    node's "ms" is the mean of its kernel time over the last `runs` runs (ORT's trace event
    "<node>_kernel_time", in microseconds). "node"/"op" are ORT's optimized-graph node and op
    (a fused Conv+BN+Relu is one node); "nodes" are the model nodes it stands for (best effort,
    see _ort_node_origin). Layers are sorted slowest first.
    """
    import json
    import tempfile

    import onnxruntime as ort

    feed = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
    with tempfile.TemporaryDirectory(prefix="graphopt-ort-profile-") as tmp:
        so = session_options
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            sess.run(None, feed)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for ev in trace:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        name = ev["name"][: -len("_kernel_time")]
        per_node.setdefault(name, []).append(float(ev.get("dur", 0)) / 1000.0)
        ops[name] = str((ev.get("args") or {}).get("op_name", ""))
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    layers = []
    for name, durs in per_node.items():
        kept = durs[-runs:] if len(durs) > runs else durs
        layers.append({"node": name, "op": ops[name], "ms": sum(kept) / len(kept),
                       "nodes": _ort_node_origin(name, nodes, producer, consumers)})
    layers.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in layers)
    return {"layers": layers[:LAYERS_KEPT], "layers_total_ms": total, "layers_count": len(layers),
            "layers_how": (f"onnxruntime per-node kernel times (SessionOptions.enable_profiling), mean of {runs} runs "
                           f"after {warmup} warm-up runs, in a separate profiling session; fused nodes as ORT runs them")}


# the host CPU's name (targets/host.py: "model name" of /proc/cpuinfo, or the ARM board's Model/Hardware)
cpu_name = cpu_model_name


class OrtTarget(Target):
    name = "ort"
    description = "onnxruntime CPU (ORT_ENABLE_ALL), timed on this machine"
    OPTIONS = (
        Option("threads", int, None, "intra-op threads (default: the CPUs here)", minimum=1),
        Option("warmup", int, 5, "untimed runs first", minimum=0),
        Option("number", int, 10, "runs per timed repeat", minimum=1),
        Option("repeat", int, 7, "timed repeats (median reported)", minimum=1),
        Option("profile", bool, False, "per-layer latency of the best candidate"),
    )

    def __init__(self, threads: int | None = None, warmup: int = 5, number: int = 10, repeat: int = 7,
                 profile: bool | int | str = False, **options: Any) -> None:
        super().__init__(**options)
        self.threads = int(threads or os.cpu_count() or 1)
        self.warmup, self.number, self.repeat = int(warmup), int(number), int(repeat)
        flag = str(profile).strip().lower()
        if flag not in ("0", "1", "true", "false", "yes", "no", "on", "off", ""):
            raise UsageError(f"ort target: profile={profile!r}: expected 1 (per-layer latency) or 0")
        self.per_layer = flag in ("1", "true", "yes", "on")

    def _options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        return so

    def compile(self, model, workdir: Path) -> Artifact:
        import onnxruntime as ort

        t0 = time.perf_counter()
        try:
            sess = ort.InferenceSession(model.SerializeToString(), self._options(), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CompileError(f"onnxruntime could not create a session: {str(e).strip().splitlines()[0]}") from None
        info: dict[str, Any] = {"compile_s": time.perf_counter() - t0}
        info["model"] = model  # for a per-layer profile (profile=1 or TargetContext.profile_layers), in a session of its own
        return Artifact(target=self.name, handle=sess, info=info)

    def profile(self, model, inputs: Mapping[str, np.ndarray], runs: int | None = None) -> dict[str, Any]:
        """Per-layer latency of `model` (a ModelProto) with this target's session options: see
        profile_layers. Merge the result into a Measurement's extra to show it in the report."""
        return profile_layers(model, inputs, self._options(), warmup=min(self.warmup, 3),
                              runs=runs or max(self.number, 5))

    def measure(self, artifact: Artifact, inputs: Mapping[str, np.ndarray]) -> Measurement:
        return self.measure_feeds(artifact, [inputs])

    def measure_feeds(self, artifact: Artifact, feeds: list[Mapping[str, np.ndarray]]) -> Measurement:
        """Time the artifact cycling through `feeds` (graphopt.timing): each timed repeat runs every
        feed (number runs, rounded up to a multiple of len(feeds)); sample = mean ms per run."""
        sess = artifact.handle
        feeds = [{k: np.ascontiguousarray(v) for k, v in f.items()} for f in feeds]
        inputs = feeds[0]
        runs = -(-max(self.number, len(feeds)) // len(feeds)) * len(feeds)
        for i in range(max(self.warmup, len(feeds))):
            sess.run(None, feeds[i % len(feeds)])
        samples = []
        for _ in range(self.repeat):
            t0 = time.perf_counter()
            for i in range(runs):
                sess.run(None, feeds[i % len(feeds)])
            samples.append((time.perf_counter() - t0) * 1000.0 / runs)
        extra: dict[str, Any] = {"runtime": "onnxruntime", "graph_optimization": "ORT_ENABLE_ALL"}
        if (self.per_layer or self.context.profile_layers) and artifact.info.get("model") is not None:
            extra.update(self.profile(artifact.info["model"], inputs))
        return Measurement(latency=LatencyStats.from_samples(samples, runs), method="measured",
                           tuned=None, threads=self.threads, device=cpu_name(), extra=extra)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"name": self.name, "compiler": f"onnxruntime {ort.__version__} (ORT_ENABLE_ALL)",
                "device": cpu_name(), "threads": self.threads, "tuned": None,
                "timing": f"median of {self.repeat} repeats x {self.number} runs after {self.warmup} warm-up runs"}
