"""Data sources: what a run reads samples from (graphopt.evaluation.data opens them and splits them).

A data source is anything with `num_samples`, `sample(i) -> {input name: array}` (one feed,
shaped like the model's input) and `label(i)` (None when unlabelled); see graphopt.evaluation.data for the
specs that open one. graphopt.evaluation.data re-exports every name here.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import DataError, UsageError

if TYPE_CHECKING:
    from ..modelio.ir import InputSpec


# ------------------------------------------------------------------------------ checking
def check_feed(feed: Mapping[str, Any], inputs: "Sequence[InputSpec]", where: str) -> dict[str, np.ndarray]:
    """One sample's feed against the model's inputs: names, shapes, dtypes (safe casts made)."""
    if not isinstance(feed, Mapping):
        raise DataError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    names = [s.name for s in inputs]
    missing = [n for n in names if n not in feed]
    if missing:
        raise DataError(f"{where}: keys {sorted(feed)} do not match the model's inputs {names} (missing {missing})")
    out = {}
    for spec in inputs:
        a = np.asarray(feed[spec.name])
        if a.shape != tuple(spec.shape):
            raise DataError(f"{where}: {spec.name!r} has shape {list(a.shape)}, the model expects "
                            f"{list(spec.shape)} per sample")
        if a.dtype != spec.dtype:
            if np.can_cast(a.dtype, spec.dtype, casting="same_kind"):
                a = a.astype(spec.dtype)
            else:
                raise DataError(f"{where}: {spec.name!r} has dtype {a.dtype}, the model expects {spec.dtype}")
        out[spec.name] = a
    return out


# ------------------------------------------------------------------------------ sources
class Dataset:
    """Base of the data sources: num_samples, sample(i), label(i), groups, extras, source."""

    source: str = ""
    extras: dict[str, Any]

    @property
    def num_samples(self) -> int:
        raise NotImplementedError

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic"

    def sample(self, i: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def label(self, i: int) -> Any:
        return None

    @property
    def has_labels(self) -> bool:
        return False

    def group(self, i: int) -> Any:
        return i

    def fingerprint(self) -> str:
        """Identity for the run store: the source and a hash of a few samples (cheap on big data)."""
        h = hashlib.sha256(f"{self.source}|{self.num_samples}".encode())
        n = self.num_samples
        for i in sorted({0, n // 2, n - 1} if n else set()):
            for k, v in sorted(self.sample(i).items()):
                a = np.ascontiguousarray(v)
                h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
        return h.hexdigest()


class Subset(Dataset):
    """A view of samples `indices` of `base` (labels and groups follow)."""

    def __init__(self, base: Dataset, indices: Sequence[int], name: str = ""):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.name = name
        self.source = base.source
        self.extras = dict(getattr(base, "extras", {}) or {})

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def sample(self, i: int) -> dict[str, np.ndarray]:
        return self.base.sample(self.indices[i])

    def label(self, i: int) -> Any:
        return self.base.label(self.indices[i])

    @property
    def has_labels(self) -> bool:
        return self.base.has_labels and any(self.base.label(i) is not None for i in self.indices)

    def group(self, i: int) -> Any:
        return self.base.group(self.indices[i])

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.base.fingerprint().encode())
        h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
        return h.hexdigest()


def labels_of(ds: Dataset) -> Any:
    """The labels of every sample (a stacked array when they stack, else a list; None if unlabelled)."""
    if not ds.has_labels:
        return None
    labs = [ds.label(i) for i in range(ds.num_samples)]
    try:
        if all(lab is not None for lab in labs):
            return np.asarray(labs)
    except Exception:  # ragged labels: a list
        pass
    return labs


def sample_ids(ds: Dataset) -> np.ndarray:
    """The samples' indices in their source (a split's positions in the data it was cut from)."""
    idx = getattr(ds, "indices", None)
    return np.asarray(idx if idx is not None else range(ds.num_samples), dtype=np.int64)


def stack(ds: Dataset, indices: Iterable[int] | None = None) -> dict[str, np.ndarray]:
    """input name -> [samples, *shape] of the chosen samples (all by default), in memory."""
    idx = list(range(ds.num_samples)) if indices is None else list(indices)
    feeds = [ds.sample(i) for i in idx]
    if not feeds:
        return {}
    return {k: np.stack([f[k] for f in feeds]) for k in feeds[0]}


class CachedData(Dataset):
    """Keeps samples in memory once read, up to max_bytes (the select split, read per candidate)."""

    def __init__(self, base: Dataset, max_bytes: int = 256 << 20):
        self.base, self.max_bytes, self.used = base, max_bytes, 0
        self.source = base.source
        self.extras = dict(getattr(base, "extras", {}) or {})
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    @property
    def num_samples(self) -> int:
        return self.base.num_samples

    def sample(self, i: int) -> dict[str, np.ndarray]:
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        feed = self.base.sample(i)
        size = sum(np.asarray(v).nbytes for v in feed.values())
        if self.used + size <= self.max_bytes:
            self._cache[i] = feed
            self.used += size
        return feed

    def label(self, i: int) -> Any:
        return self.base.label(i)

    @property
    def has_labels(self) -> bool:
        return self.base.has_labels

    def group(self, i: int) -> Any:
        return self.base.group(i)

    @property
    def indices(self) -> list[int]:
        return list(getattr(self.base, "indices", range(self.base.num_samples)))

    def fingerprint(self) -> str:
        return self.base.fingerprint()


class ArrayData(Dataset):
    """In-memory arrays input name -> [samples, *shape] (an .npz), with optional labels and extras."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str, labels: Any = None,
                 extras: Mapping[str, Any] | None = None, groups: Sequence[Any] | None = None):
        self.arrays = dict(arrays)
        self.source = source
        self.labels = labels
        self.extras = dict(extras or {})
        self.groups = groups

    @property
    def num_samples(self) -> int:
        return next(iter(self.arrays.values())).shape[0] if self.arrays else 0

    def sample(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i, ...] for k, v in self.arrays.items()}  # [i, ...]: a 0-d array for a scalar input

    def label(self, i: int) -> Any:
        return None if self.labels is None else self.labels[i]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def group(self, i: int) -> Any:
        return i if self.groups is None else self.groups[i]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.arrays):
            a = np.ascontiguousarray(self.arrays[k])
            h.update(k.encode())
            h.update(str(a.dtype).encode())
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        if self.labels is not None:
            h.update(repr(np.asarray(self.labels, dtype=object).tolist()).encode())
        return h.hexdigest()


class ShardData(Dataset):
    """Shards: per shard, input name -> array [n, *shape] (memory-mapped .npy or .npz in a small LRU)."""

    def __init__(self, shards: list[dict[str, Any]], counts: list[int], source: str, inputs: "Sequence[InputSpec]",
                 labels: Any = None, groups: Sequence[Any] | None = None, extras: Mapping[str, Any] | None = None,
                 cleanup: Path | None = None):
        self.shards, self.counts = shards, counts  # each shard: {name: path (.npy) or ("npz", path, key)}
        self.offsets = np.cumsum([0] + counts)
        self.source = source
        self.inputs = list(inputs)
        self.labels = labels
        self.groups = groups
        self.extras = dict(extras or {})
        self._lru: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._cleanup = cleanup

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s in self._lru:
            self._lru.move_to_end(s)
            return self._lru[s]
        out = {}
        for name, ref in self.shards[s].items():
            if isinstance(ref, tuple):  # ("npz", path, key)
                with np.load(ref[1], allow_pickle=False) as z:
                    out[name] = z[ref[2]]
            else:
                out[name] = np.load(ref, mmap_mode="r", allow_pickle=False)
        self._lru[s] = out
        while len(self._lru) > 2:
            self._lru.popitem(last=False)
        return out

    def sample(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        arrs = self._shard(s)
        feed = {k: np.array(v[i - self.offsets[s]]) for k, v in arrs.items()}
        return check_feed(feed, self.inputs, f"{self.source} sample {i}")

    def label(self, i: int) -> Any:
        return None if self.labels is None else self.labels[i]

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and any(x is not None for x in self.labels)

    def group(self, i: int) -> Any:
        return i if self.groups is None else self.groups[i]

    def __del__(self):
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)


class LoaderData(Dataset):
    """A user's random-access dataset (len + getitem), checked sample by sample as it is read."""

    def __init__(self, obj: Any, source: str, inputs: "Sequence[InputSpec]"):
        self.obj, self.source, self.inputs = obj, source, list(inputs)
        self.n = len(obj)
        self.labels = getattr(obj, "labels", None)
        self.groups = getattr(obj, "groups", None)
        self.extras = dict(getattr(obj, "extras", None) or {})
        self._labels_from_items: dict[int, Any] = {}

    @property
    def num_samples(self) -> int:
        return self.n

    def _item(self, i: int) -> tuple[dict[str, Any], Any, Any]:
        try:
            item = self.obj[i]
        except (DataError, UsageError):
            raise
        except Exception as e:  # the user's code: exit 2 naming it, not an internal error of graphopt's
            raise DataError(f"{self.source}: the loader failed at item {i} ({type(e).__name__}: {e}); fix the "
                            "loader, or pass an .npz or a folder of shards") from None
        return _unpack(item, f"{self.source} item {i}")

    def sample(self, i: int) -> dict[str, np.ndarray]:
        feed, lab, _ = self._item(i)
        if lab is not None:
            self._labels_from_items[i] = lab
        return check_feed(feed, self.inputs, f"{self.source} sample {i}")

    def label(self, i: int) -> Any:
        if self.labels is not None:
            return self.labels[i]
        if i in self._labels_from_items:
            return self._labels_from_items[i]
        return self._item(i)[1]

    @property
    def has_labels(self) -> bool:
        if self.labels is not None:
            return True
        return self.n > 0 and self._item(0)[1] is not None

    def group(self, i: int) -> Any:
        return i if self.groups is None else self.groups[i]


def _unpack(item: Any, where: str) -> tuple[dict[str, Any], Any, Any]:
    if isinstance(item, Mapping):
        return dict(item), None, None
    if isinstance(item, tuple) and len(item) in (2, 3) and isinstance(item[0], Mapping):
        return dict(item[0]), item[1], (item[2] if len(item) == 3 else None)
    raise DataError(f"{where}: a loader item must be a dict of input name -> array, or (feeds, label) or "
                    f"(feeds, label, group); got {type(item).__name__}")


class CalibrationData(ArrayData):
    """Input name -> array of shape [samples, *input_shape] (+ optional per-sample labels, extras)."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str, labels=None, extras=None):
        super().__init__(arrays, source, labels=labels, extras=extras)


__all__ = ["ArrayData", "CachedData", "CalibrationData", "Dataset", "LoaderData", "ShardData", "Subset",
           "check_feed", "labels_of", "sample_ids", "stack"]
