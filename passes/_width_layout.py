"""Width pruning, part 1: constants, channel layouts, consumers and groups (the analysis' values).

Split out of passes/width.py (the pass and its module docstring live there)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs


RATIOS = (0.75, 0.5)
MAX_ROWS = 8192  # rows (pixels x samples) of each least-squares refit
RIDGE = 1e-4  # pull toward the pruned weights, relative to the mean feature energy (at least)
RIDGE_PER_DOF = 1.0  # ... raised to this times (weights per output) / (rows): small data, strong prior
ELIMINATION_CHUNK = 0.05  # data-driven selection drops this share of the live channels per round
SELECT_ROWS = 4096  # rows of the least-squares problems that rank channels
PREFETCH_BYTES = 1 << 30  # original activations fetched in one pass per run, at most

UNARY = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf",
         "Gelu", "Mish", "Cast", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu", "Sin", "Cos"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


# ------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class _Layout:
    """Where a tensor's channels live: its channel axis and the spaces laid along it."""

    axis: int
    segs: tuple[tuple[int, int], ...]  # (space id, length) in order along the axis

    @property
    def length(self) -> int:
        return sum(n for _, n in self.segs)

    def lengths(self) -> tuple[int, ...]:
        return tuple(n for _, n in self.segs)

    def spaces(self) -> set[int]:
        return {s for s, _ in self.segs}

    def keep_positions(self, spaces: set[int], keep: np.ndarray) -> np.ndarray | None:
        """Positions along the axis that stay when `spaces` keep only `keep`; None if untouched."""
        out, off, touched = [], 0, False
        for sid, n in self.segs:
            if sid in spaces:
                out.append(off + keep)
                touched = True
            else:
                out.append(off + np.arange(n))
            off += n
        return np.concatenate(out).astype(np.int64) if touched else None


@dataclass
class _Action:
    """One edit a pruning implies: slice a constant input, set a depthwise group, or rewrite a
    Reshape target (kind 'slice' | 'group' | 'shape'), positions taken from `layout`."""

    kind: str
    node: gs.Node
    layout: _Layout
    index: int = 0  # input slot
    axis: int = 0  # axis of the constant (slice) or entry of the shape vector (shape)


@dataclass
class _Consumer:
    """A layer that reads channels and makes new ones (Conv group=1, Gemm, MatMul): repair refits it."""

    node: gs.Node
    kind: str  # "conv" | "gemm" | "matmul"
    inp: _Layout
    out: _Layout


@dataclass
class _Group:
    spaces: set[int]
    length: int
    producers: list[gs.Node]  # in topological order
    why_not: str | None  # None: a site
    cost: float = 0.0


def _shape(t) -> tuple[int, ...] | None:
    if t is None or t.shape is None:
        return None
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in t.shape):
        return None
    return tuple(int(d) for d in t.shape)


def _attr_str(node, name: str, default: str) -> str:
    v = node.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _topo(graph: gs.Graph) -> list:
    """Nodes in a topological order (the graph's own order where it is one; moves may append)."""
    import networkx as nx

    index = {id(n): i for i, n in enumerate(graph.nodes)}
    g = nx.DiGraph()
    g.add_nodes_from(range(len(graph.nodes)))
    for i, n in enumerate(graph.nodes):
        for t in n.outputs:
            for c in t.outputs:
                if id(c) in index:
                    g.add_edge(i, index[id(c)])
    return [graph.nodes[i] for i in nx.lexicographical_topological_sort(g)]


def _is_graph(v) -> bool:
    import onnx_graphsurgeon as gs

    return isinstance(v, gs.Graph) or (isinstance(v, (list, tuple)) and any(isinstance(x, gs.Graph) for x in v))
