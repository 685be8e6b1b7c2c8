"""Metrics: how a candidate's outputs are judged. A registry like the passes' one.

A metric is called as

    metric(original, candidate, labels=None, extras=None) -> float  (or (float, {output: float}))

`original` and `candidate` map each output name to its values over the evaluated samples,
stacked [samples, *output shape] (a list of arrays if the shapes differ between samples).
`labels` are the samples' labels when the data has them (a stacked array, or a list with None
for unlabelled samples), else None. `extras` is the data's dataset-level dict plus `sample_ids`
(the samples' indices in their source). Higher is better. The original's own score,
metric(original, original, ...), is the base of `--max-drop`: 1.0 for a similarity metric, the
original's accuracy for a task metric.

Built-ins: `channel` (default), `cosine`, `top1`, `rel_l2` (similarity; graphopt.evaluation.evaluate),
`imagenet_top1`, `soft_top1`, `agreement_top1` and `sts_spearman` (task metrics, in points: 0-100).
On unlabelled data `imagenet_top1` is `soft_top1`: the top-1 estimated from the original's softmax
(docs/gate_proxy.md: calibrated against held-out ImageNet top-1); a function's `basis(labels)`
attribute says which quantity a value is on given data (Metric.basis). Third parties register
entry points in the group `graphopt.metrics` (a function, or a Metric), or pass `--metric
module:function` / `--metric path/to/file.py:function`. A function's first docstring line is
its definition in the report; set `fn.units = "%"` (or "points") to say how it reads: without
units a value is on a 0..1 scale, and the default gate is the original's score less 0.01 (with
units, less 1 point). Set `fn.similarity = True` for a metric that compares candidate and
original only (the original scores 1.0): its default gate is 0.99.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import UsageError
from ..registry import METRICS


@dataclass
class Metric:
    name: str
    fn: Callable[..., Any]
    description: str = ""
    units: str = ""  # "" (a fraction, 1.0 = identical) or "%" / "points"
    similarity: bool = False  # compares candidate and original only: the original scores 1.0, range [0, 1]
    basis_fn: Callable[[Any], str] | None = None  # labels -> what the value is on this data (fn.basis)

    def basis(self, labels=None) -> str | None:
        """What the metric measures on data with these labels (e.g. "top-1 on labels" or "estimated
        top-1 from the original's soft labels"); None when it does not depend on the data."""
        return self.basis_fn(labels) if self.basis_fn is not None else None

    def __call__(self, original, candidate, labels=None, extras=None) -> tuple[float, dict[str, float]]:
        out = self.fn(original, candidate, labels, extras)
        if isinstance(out, tuple):
            value, per = out
            return float(value), {k: float(v) for k, v in dict(per).items()}
        return float(out), {}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "definition": self.description, "units": self.units,
                "similarity": self.similarity}

    def describe(self, labels=None) -> dict[str, Any]:
        """to_dict() plus `basis` on this data (when the metric says)."""
        b = self.basis(labels)
        return dict(self.to_dict(), **({"basis": b} if b else {}))


# ------------------------------------------------------------------------------ similarity
def _similarity(kind: str) -> Callable[..., Any]:
    def fn(original, candidate, labels=None, extras=None):
        from .evaluate import similarity

        return similarity(original, candidate, kind)

    return fn


CHANNEL = Metric("channel", _similarity("channel"), similarity=True, description=(
    "worst over outputs and output channels of 1 - ||candidate - original||^2 / max(||original_c||^2, "
    "median channel energy): each channel on its own scale, an SQNR as a fraction (0.99 = 20 dB)"))
COSINE = Metric("cosine", _similarity("cosine"), similarity=True, description=(
    "mean over samples of the cosine similarity of each flattened output with the original's; worst output"))
TOP1 = Metric("top1", _similarity("top1"), similarity=True, description=(
    "fraction of samples whose argmax over the last axis agrees with the original's; worst output"))
REL_L2 = Metric("rel_l2", _similarity("rel_l2"), similarity=True, description=(
    "1 - ||candidate - original|| / ||original|| per sample, averaged (clipped at 0); worst output"))


# ------------------------------------------------------------------------------ task metrics
def _first_float(outputs: dict[str, Any]) -> np.ndarray:
    for v in outputs.values():
        a = np.asarray(v) if not isinstance(v, list) else np.stack([np.asarray(x) for x in v])
        if np.issubdtype(a.dtype, np.floating):
            return a
    raise ValueError("the model has no floating-point output")


def _class_scores(a: np.ndarray) -> np.ndarray:
    """[samples, classes]: the first position of the last axis's vectors (logits or probabilities)."""
    n = a.shape[0]
    return a.reshape(n, -1, a.shape[-1])[:, 0].astype(np.float64)


def soft_labels(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The original's class distribution per sample: its softmax at `temperature`; an output that is
    already a distribution (non-negative, rows summing to 1) is taken as it is at temperature 1."""
    s = np.asarray(scores, dtype=np.float64)
    if temperature == 1.0 and s.size and np.all(s >= 0) and np.allclose(s.sum(-1), 1.0, atol=1e-3):
        return s
    z = s / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def soft_top1(original, candidate, labels=None, extras=None) -> float:
    """Estimated top-1 % from the original's soft labels (no labels needed): mean over samples of the
    original's softmax probability of the candidate's top-1 class; the original scores its mean
    confidence, so the drop is the probability mass a candidate's flips move away from the original's
    choice (a flip where the original was unsure costs little). Exact expected top-1 if the original
    is calibrated."""
    ref = _first_float(original)
    cand = _first_float(candidate)
    if ref.shape != cand.shape or not np.all(np.isfinite(cand)) or not ref.shape[0]:
        return 0.0
    p = soft_labels(_class_scores(ref))
    pred = np.argmax(_class_scores(cand), axis=-1)
    return float(100.0 * np.mean(p[np.arange(len(pred)), pred]))


soft_top1.units = "%"  # type: ignore[attr-defined]
soft_top1.description = " ".join(soft_top1.__doc__.split())  # type: ignore[attr-defined]
soft_top1.basis = lambda labels: SOFT_BASIS  # type: ignore[attr-defined]

SOFT_BASIS = "estimated top-1 from the original's soft labels (no labels)"
LABEL_BASIS = "top-1 on labels"


def _label_array(labels) -> np.ndarray | None:
    """Class index per sample (-1 = unlabelled), or None when no sample is labelled."""
    if labels is None:
        return None
    lab = np.array([(-1 if x is None else int(np.asarray(x).reshape(-1)[0])) for x in labels], dtype=np.int64)
    return lab if np.any(lab >= 0) else None


def imagenet_top1(original, candidate, labels=None, extras=None) -> float:
    """ImageNet (any classifier's) top-1 accuracy in %: argmax of the first float output (logits over the
    last axis) against the labels (class index; < 0 = unlabelled samples, skipped); on unlabelled data
    (the select split of unlabelled photos), soft_top1: the top-1 estimated from the original's softmax."""
    ref = _first_float(original)
    cand = _first_float(candidate)
    if ref.shape != cand.shape or not np.all(np.isfinite(cand)):
        return 0.0
    truth = _label_array(labels)
    if truth is None:
        return soft_top1(original, candidate)
    pred = np.argmax(_class_scores(cand), axis=-1)
    keep = truth >= 0
    return float(100.0 * np.mean(pred[keep] == truth[keep]))


imagenet_top1.units = "%"  # type: ignore[attr-defined]
imagenet_top1.description = " ".join(imagenet_top1.__doc__.split())  # type: ignore[attr-defined]
imagenet_top1.basis = lambda labels: LABEL_BASIS if _label_array(labels) is not None else SOFT_BASIS  # type: ignore[attr-defined]


def agreement_top1(original, candidate, labels=None, extras=None) -> float:
    """Top-1 agreement in %: share of samples whose argmax (first float output, last axis) equals the
    original's (imagenet_top1's behaviour on unlabelled data before soft_top1; harsher: every flip costs 1)."""
    ref = _first_float(original)
    cand = _first_float(candidate)
    if ref.shape != cand.shape or not np.all(np.isfinite(cand)) or not ref.shape[0]:
        return 0.0
    return float(100.0 * np.mean(np.argmax(_class_scores(cand), -1) == np.argmax(_class_scores(ref), -1)))


agreement_top1.units = "%"  # type: ignore[attr-defined]
agreement_top1.description = " ".join(agreement_top1.__doc__.split())  # type: ignore[attr-defined]


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (scipy.stats.rankdata's default), in numpy."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); 0 when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    return float(np.sum(ra * rb) / den) if den > 0 else 0.0


def _pairs(labels, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """[(i, j)] sample positions of each pair, and their gold scores (None when unlabelled)."""
    if labels is not None:
        by_pair: dict[int, list[int]] = {}
        scores: dict[int, float] = {}
        for pos, lab in enumerate(labels):
            if lab is None:
                continue
            lab = np.asarray(lab, dtype=np.float64).reshape(-1)
            if len(lab) < 2 or lab[0] < 0 or not np.isfinite(lab[1]):
                continue
            by_pair.setdefault(int(lab[0]), []).append(pos)
            scores[int(lab[0])] = float(lab[1])
        keys = [k for k, v in by_pair.items() if len(v) == 2]
        if keys:
            return np.array([by_pair[k] for k in keys]), np.array([scores[k] for k in keys])
    m = n // 2
    return np.stack([np.arange(m) * 2, np.arange(m) * 2 + 1], axis=1), None


def sts_spearman(original, candidate, labels=None, extras=None) -> float:
    """STS-B Spearman x 100: cosine of the two sentences' embeddings (first float output) per pair vs
    the gold score; each sample's label is (pair id, score), a pair = the two samples with its id.
    Without labels: consecutive samples are pairs, ranked against the original's cosines."""
    ref = _first_float(original)
    cand = _first_float(candidate)
    if ref.shape != cand.shape or not np.all(np.isfinite(cand)):
        return 0.0
    n = cand.shape[0]
    pairs, gold = _pairs(labels, n)
    if not len(pairs):
        return 0.0

    def cosines(e: np.ndarray) -> np.ndarray:
        e = e.reshape(n, -1).astype(np.float64)
        a, b = e[pairs[:, 0]], e[pairs[:, 1]]
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        return np.where(den > 0, np.sum(a * b, axis=1) / np.where(den > 0, den, 1.0), 0.0)

    target = gold if gold is not None else cosines(ref)
    return 100.0 * spearman(cosines(cand), target)


sts_spearman.units = "points"  # type: ignore[attr-defined]
sts_spearman.description = " ".join(sts_spearman.__doc__.split())  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ registry
DEFAULT = "channel"


def as_metric(obj: Any, name: str) -> Metric:
    if isinstance(obj, Metric):
        return obj
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise UsageError(f"metric {name!r} is a {type(obj).__name__}, not a function of "
                         "(original, candidate, labels, extras)")
    doc = (getattr(obj, "description", None) or (obj.__doc__ or "").strip() or name)
    return Metric(name=name, fn=obj, description=" ".join(doc.split("\n\n")[0].split()),
                  units=str(getattr(obj, "units", "")), similarity=bool(getattr(obj, "similarity", False)),
                  basis_fn=getattr(obj, "basis", None) if callable(getattr(obj, "basis", None)) else None)


def resolve_metric(spec: Any) -> Metric:
    """A registered name, `module:function`, `path/to/file.py:function`, a Metric, or a function."""
    if isinstance(spec, Metric):
        return spec
    if callable(spec) and not isinstance(spec, str):
        return as_metric(spec, getattr(spec, "__name__", "metric"))
    text = str(spec)
    if ":" in text and text not in METRICS.names():
        from .data import load_callable

        return as_metric(load_callable(text, "--metric"), text)
    try:
        return as_metric(METRICS.get(text), text)
    except UsageError:
        raise UsageError(f"--metric {text!r}: unknown metric; choose one of {', '.join(METRICS.names())} "
                         "or give module:function") from None


def gate_threshold(min_fidelity: float | None, max_drop: float | None, original_value: float,
                   similarity: bool = True, units: str = "%") -> float:
    """The value a candidate's metric must reach: the larger of --min-fidelity (absolute) and the
    original's own score minus --max-drop (relative, NNCF accuracy-control style). Neither given:
    0.99 for a similarity metric, the original's score minus 1 point for a task metric: 1.0 in
    "%" or "points", 0.01 on a 0..1 scale (units "": a plugin function that declares none)."""
    bounds = [b for b in (min_fidelity, None if max_drop is None else original_value - max_drop) if b is not None]
    if bounds:
        return max(bounds)
    if similarity:
        return DEFAULT_MIN_FIDELITY
    return original_value - (DEFAULT_MAX_DROP if units else DEFAULT_MAX_DROP / 100)


DEFAULT_MIN_FIDELITY = 0.99
DEFAULT_MAX_DROP = 1.0  # points of a metric in "%" or "points"


__all__ = ["DEFAULT", "LABEL_BASIS", "METRICS", "Metric", "SOFT_BASIS", "agreement_top1", "as_metric",
           "gate_threshold", "imagenet_top1", "rankdata", "resolve_metric", "soft_labels", "soft_top1", "spearman",
           "sts_spearman"]
