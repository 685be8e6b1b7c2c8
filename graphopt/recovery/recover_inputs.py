"""What recovery (graphopt.recovery.recover) trains on: the intermediate tensors it matches between the
original and a candidate (choose_features), and augmented input batches (augment).
graphopt.recovery.recover re-exports these names."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx


# --------------------------------------------------------------------------------- features
def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    import onnx

    try:
        m = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes only steer the choice of features
        m = model
    out = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        t = vi.type.tensor_type
        if t.HasField("shape") and t.elem_type == onnx.TensorProto.FLOAT:
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
            if all(d is not None for d in dims):
                out[vi.name] = dims
    return out


def choose_features(original: onnx.ModelProto, candidate: onnx.ModelProto, live: set[str],
                    max_features: int = 16) -> list[str]:
    """Intermediate tensors to match (see the module docstring), in graph order. A tensor whose
    channels (axis 1) were pruned counts, and is matched against the original's channels it kept."""
    so, sc = _shapes(original), _shapes(candidate)
    outputs = {o.name for o in candidate.graph.output}
    inits = {t.name for t in candidate.graph.initializer}

    def same(name: str) -> bool:
        return name in so and so[name] == sc.get(name)

    def fits(name: str) -> bool:  # same shape, or a subset of the original's channels (axis 1): a pruned tensor
        a, b = sc.get(name), so.get(name)
        return (a is not None and b is not None and len(a) == len(b) >= 2 and a[0] == b[0] and a[2:] == b[2:]
                and a[1] <= b[1])

    picked = []
    for n in candidate.graph.node:
        if not n.output or not n.output[0]:
            continue
        y = n.output[0]
        if y in outputs or y not in live or not fits(y):
            continue
        data_in = [i for i in n.input if i and i not in inits]
        residual = n.op_type == "Add" and len(data_in) == 2
        absorbs = same(y) and any(not same(i) for i in data_in)
        if residual or absorbs:
            picked.append(y)
    if len(picked) > max_features > 0:
        idx = np.linspace(0, len(picked) - 1, max_features).round().astype(int)
        picked = [picked[i] for i in sorted(set(idx.tolist()))]
    return picked


# ------------------------------------------------------------------------------- augmentation
def image_like(feeds: Mapping[str, np.ndarray]) -> bool:
    return bool(feeds) and all(np.issubdtype(v.dtype, np.floating) and v.ndim == 4 and v.shape[1] in (1, 3)
                               and min(v.shape[2:]) >= 16 for v in feeds.values())


def resized_crops(batch: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per sample: a random crop (35-100% of the area, aspect 3:4-4:3) resized to size x size (bilinear)."""
    import torch

    F = torch.nn.functional
    n = next(iter(batch.values())).shape[0]
    h, w = next(iter(batch.values())).shape[2:]
    boxes = []
    for _ in range(n):
        area = rng.uniform(0.35, 1.0) * h * w
        ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch, cw = min(h, int(round(math.sqrt(area / ar)))), min(w, int(round(math.sqrt(area * ar))))
        boxes.append((int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw))
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = torch.cat([F.interpolate(t[i:i + 1, :, y:y + ch, x:x + cw], size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=True)
                            for i, (y, x, ch, cw) in enumerate(boxes)]).numpy()
    return out


def _match_channels(student, teacher):
    """For each channel of a pruned tensor, the original channel it correlates with best."""
    import torch

    a = student.transpose(0, 1).reshape(student.shape[1], -1).double()
    b = teacher.transpose(0, 1).reshape(teacher.shape[1], -1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    a = a / (a.norm(dim=1, keepdim=True) + 1e-12)
    b = b / (b.norm(dim=1, keepdim=True) + 1e-12)
    return torch.argmax(a @ b.T, dim=1)


def augment(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per sample (axis 0): random horizontal flip, random shift up to H/16 (edge padded)."""
    out = {}
    n = next(iter(batch.values())).shape[0]
    flips = rng.random(n) < 0.5
    first = next(iter(batch.values()))
    mh, mw = max(1, first.shape[2] // 16), max(1, first.shape[3] // 16)
    dy, dx = rng.integers(-mh, mh + 1, n), rng.integers(-mw, mw + 1, n)
    for k, v in batch.items():
        res = np.empty_like(v)
        h, w = v.shape[2:]
        for i in range(n):
            x = v[i, :, :, ::-1] if flips[i] else v[i]
            p = np.pad(x, ((0, 0), (mh, mh), (mw, mw)), mode="edge")
            res[i] = p[:, mh + dy[i]:mh + dy[i] + h, mw + dx[i]:mw + dx[i] + w]
        out[k] = res
    return out
