"""Small onnx-graphsurgeon helpers shared by the passes."""

from __future__ import annotations

import numpy as np

def _present(t) -> bool:
    """An optional input/output slot that is filled (gs marks empty ones with name '')."""
    return t is not None and t.name != ""


def _const(t) -> np.ndarray | None:
    """The value of a gs.Constant, or of a Variable made by a Constant node; else None."""
    import onnx_graphsurgeon as gs

    if t is None or not _present(t):
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
    return None


def _input(node, i: int):
    return node.inputs[i] if len(node.inputs) > i and _present(node.inputs[i]) else None


def _static_size(shape) -> int | None:
    if shape is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))


def _fresh_name(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name
