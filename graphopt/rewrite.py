"""Public graph helpers for writing a pass's match() and rewrite() (see graphopt/plugin.py).

All work on onnx-graphsurgeon graphs (gs.Graph / gs.Node / gs.Tensor). A pass's rewrite() edits a
private clone of the base graph in place and leaves dead nodes to materialize's cleanup, except
nodes it unhooks itself (take_over_outputs removes the node it bypasses).

    value(t)                  the numpy value of a constant tensor (gs.Constant or a Constant node), else None
    input_of(node, i)         input slot i if it is filled, else None
    producer(t)               the node that writes tensor t, None for graph inputs and constants
    consumers(t)              the nodes that read tensor t (gs's t.outputs)
    only_consumer(graph, node, consumer)   None if node's output feeds only `consumer`, else why not
    is_graph_output(graph, t) whether t is one of the graph's outputs
    set_input(node, i, t)     fill input slot i (appending an optional slot such as a bias)
    new_constant(graph, base, array)       a gs.Constant with a name not yet in the graph
    take_over_outputs(graph, keep, drop)   `keep` writes what `drop` wrote; `drop` is unhooked and removed
    node_by_name(graph, name) the node with that name, or None
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs


def present(t) -> bool:
    """An optional input/output slot that is filled (gs marks empty ones with name '')."""
    return t is not None and t.name != ""


def value(t) -> np.ndarray | None:
    """The value of a gs.Constant, or of a Variable made by a Constant node; else None."""
    import onnx_graphsurgeon as gs

    if t is None or not present(t):
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
    return None


def input_of(node: "gs.Node", i: int):
    return node.inputs[i] if len(node.inputs) > i and present(node.inputs[i]) else None


def producer(t) -> "gs.Node | None":
    return t.inputs[0] if t is not None and len(t.inputs) == 1 else None


def consumers(t) -> list["gs.Node"]:
    return list(t.outputs) if t is not None else []


def is_graph_output(graph: "gs.Graph", t) -> bool:
    return any(o is t for o in graph.outputs)


def only_consumer(graph: "gs.Graph", node: "gs.Node", consumer: "gs.Node") -> str | None:
    """None if `node`'s only output feeds only `consumer` (and is no graph output); else why not."""
    out = node.outputs[0]
    n = len(out.outputs)
    if n != 1 or out.outputs[0] is not consumer:
        return f"{node.op} {node.name} output has {n} consumers"
    if is_graph_output(graph, out):
        return f"{node.op} {node.name} output is also a graph output"
    return None


def set_input(node: "gs.Node", i: int, t) -> None:
    """Set input slot i; an absent optional slot (a Conv/Gemm bias) is appended."""
    if len(node.inputs) > i:
        node.inputs[i] = t
    else:
        node.inputs.append(t)


def fresh_name(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def new_constant(graph: "gs.Graph", base: str, array: np.ndarray, dtype=None) -> "gs.Constant":
    """A new gs.Constant (never edit a base array in place: the clone may share it)."""
    import onnx_graphsurgeon as gs

    taken = set(graph.tensors(check_duplicates=False).keys())
    arr = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    return gs.Constant(fresh_name(taken, base.strip("/").replace("/", "_") or "const"), np.ascontiguousarray(arr))


def take_over_outputs(graph: "gs.Graph", keep: "gs.Node", drop: "gs.Node") -> None:
    """`keep` now writes the tensor(s) `drop` wrote (its first output), so every consumer and graph
    output keeps its name; `drop` is unhooked and removed from the graph."""
    outs = list(drop.outputs)
    drop.outputs.clear()
    drop.inputs.clear()
    keep.outputs = outs[:1]
    graph.nodes.remove(drop)


def node_by_name(graph: "gs.Graph", name: str):
    """The node called `name`, or None."""
    for n in graph.nodes:
        if n.name == name:
            return n
    return None
