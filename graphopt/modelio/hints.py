"""Compiler hints: what a move records in a model's metadata_props for the targets to read.

A hint changes no computation, only how a target may compile the graph (passes/layout.py
records `graphopt.layout`; the TVM CPU targets read it, targets/llvm_cpu.py). A target that
does not read a hint runs the model as it is. The hint travels with the exported model, so
`graphopt export` of a best graph that chose one says so in the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

LAYOUT = "graphopt.layout"  # the convolutions' data layout: "nhwc" (absent: the target's own option)
HINTS = (LAYOUT,)  # every hint: part of a candidate's identity (graph_io.model_hash)


def get_hint(model: "onnx.ModelProto", key: str) -> str | None:
    """The hint's value in `model` (None when it has none)."""
    entry = next((p for p in model.metadata_props if p.key == key), None)
    return None if entry is None else entry.value.strip().lower()


def set_hint(model: "onnx.ModelProto", key: str, value: str) -> None:
    """Record the hint on `model` (in place), replacing an earlier value. Also writes graphopt's
    other metadata entries (passes/int8.py's `graphopt.int8` note), which no target reads."""
    entry = next((p for p in model.metadata_props if p.key == key), None)
    if entry is None:
        entry = model.metadata_props.add()
        entry.key = key
    entry.value = str(value)
