"""FidelityChecker: a candidate's outputs judged against the original's with a metric (graphopt.evaluation.metrics).

Its own module (not graphopt.evaluation.evaluate) because graphopt.evaluation.metrics builds on evaluate's similarity
functions: evaluate -> metrics -> evaluate would be an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .data import Dataset, labels_of, sample_ids
from ..errors import DataError, first_line
from .evaluate import Fidelity, run_model, stack_outputs
from .metrics import resolve_metric

if TYPE_CHECKING:
    import onnx


class FidelityChecker:
    """Runs the original once on the data (the select split); scores candidates against it with a
    metric (a name or a graphopt.evaluation.metrics.Metric), passing labels and extras when the data has them.
    `reference_value`: the original's own score (1.0 for a similarity metric; its accuracy for a
    task metric), the base of --max-drop."""

    def __init__(self, base: "onnx.ModelProto", data: Dataset, metric="channel"):
        self.metric_obj = resolve_metric(metric)
        self.metric = self.metric_obj.name
        self.data = data
        self.output_names = [o.name for o in base.graph.output]
        try:
            self.reference = run_model(base, data)
        except Exception as e:  # the original itself fails on these inputs: the data's fault, not a candidate's
            text = first_line(e, 400)
            raise DataError(f"onnxruntime cannot run the original model on the {data.source} inputs ({text}); "
                            + ("synthetic inputs are random values of the declared types and shapes, which this "
                               "model does not accept: pass real inputs with --data" if data.synthetic else
                               "check that --data holds valid inputs for the model")) from None
        self._ref_stacked = stack_outputs(self.reference, self.output_names)
        self.labels = labels_of(data)
        self.extras = dict(getattr(data, "extras", {}) or {}, sample_ids=sample_ids(data))
        self.reference_value = self.metric_obj(self._ref_stacked, self._ref_stacked, self.labels, self.extras)[0]

    def score_outputs(self, outs: list[list[np.ndarray]]) -> Fidelity:
        value, per_output = self.metric_obj(self._ref_stacked, stack_outputs(outs, self.output_names),
                                            self.labels, self.extras)
        return Fidelity(value, self.metric, per_output)

    def score(self, candidate: "onnx.ModelProto") -> Fidelity:
        names = [o.name for o in candidate.graph.output]
        if names != self.output_names:
            raise ValueError(f"candidate outputs {names} differ from the original's {self.output_names}")
        return self.score_outputs(run_model(candidate, self.data))
