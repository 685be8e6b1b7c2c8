"""onnxruntime on this CPU: the runtime users compare against.

Sessions use ORT_ENABLE_ALL graph optimizations and an explicit intra-op thread count (stated
in the report). Latency = median over `repeat` timed repeats of `number` runs each, after
`warmup` untimed runs.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from graphopt.errors import CompileError
from graphopt.plugin import Artifact, LatencyStats, Measurement, Target


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class OrtTarget(Target):
    name = "ort"
    description = "onnxruntime CPU (ORT_ENABLE_ALL), timed on this machine"

    def __init__(self, threads: int | None = None, warmup: int = 5, number: int = 10, repeat: int = 7,
                 **options: Any) -> None:
        super().__init__(**options)
        self.threads = int(threads or os.cpu_count() or 1)
        self.warmup, self.number, self.repeat = int(warmup), int(number), int(repeat)

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
        return Artifact(target=self.name, handle=sess, info={"compile_s": time.perf_counter() - t0})

    def measure(self, artifact: Artifact, inputs: Mapping[str, np.ndarray]) -> Measurement:
        sess = artifact.handle
        feed = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        for _ in range(self.warmup):
            sess.run(None, feed)
        samples = []
        for _ in range(self.repeat):
            t0 = time.perf_counter()
            for _ in range(self.number):
                sess.run(None, feed)
            samples.append((time.perf_counter() - t0) * 1000.0 / self.number)
        return Measurement(latency=LatencyStats.from_samples(samples, self.number), method="measured",
                           tuned=None, threads=self.threads, device=cpu_name(),
                           extra={"runtime": "onnxruntime", "graph_optimization": "ORT_ENABLE_ALL"})

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"name": self.name, "compiler": f"onnxruntime {ort.__version__} (ORT_ENABLE_ALL)",
                "device": cpu_name(), "threads": self.threads, "tuned": None,
                "timing": f"median of {self.repeat} repeats x {self.number} runs after {self.warmup} warm-up runs"}
