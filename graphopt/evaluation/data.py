"""Data in: sources of samples, and the fit / select / held-out split.

A data source is anything with `num_samples`, `sample(i) -> {input name: array}` (one feed,
shaped like the model's input) and `label(i)` (None when unlabelled). `open_data(spec)` reads:

  file.npz           arrays keyed by input name with a leading sample axis (as before); optional
                     `labels` ([samples, ...]) and `extra_<name>` arrays (dataset-level extras)
  folder/            .npz shards (each as above, concatenated in file-name order) or, for a
                     one-input model, .npy shards [n, *input shape]; an optional labels.npy.
                     .npy shards are memory-mapped: nothing is read before it is asked for
  module:function    a Python loader (also path/to/file.py:function), called with no argument.
                     It returns either a random-access dataset (`__len__` and `__getitem__`), an
                     iterable / generator, or an onnxruntime CalibrationDataReader (`get_next()`).
                     Each item is a feed dict, or (feed dict, label), or (feed dict, label, group).
                     A random-access dataset may also have `labels`, `groups` and `extras`
                     attributes. Iterated items are spilled to memory-mapped .npy shards in a
                     temporary folder, so thousands of samples never sit in memory at once.

Labels are per sample (a class index, a score, a small array) and travel with the sample into
its split; `extras` are dataset-level (a dict) and reach the metric unchanged, together with
`sample_ids` (the evaluated samples' indices in their source). `groups` keep samples together in
one split (the two sentences of a pair).

Splits (`split_data`): `fit` (calibration, least-squares repair, distillation), `select` (the
gate: candidates are judged and chosen on it) and `held-out` (the number the report shows; used
for no choice). With --eval-data, held-out is that source and --data is split into fit and
select; without it, --data is split three ways. Assignment is by a fixed interleave over groups
(fit, select, fit, held-out, ...: data sorted by class spreads over every split), deterministic,
so `graphopt export` rebuilds candidates on the same fit samples. When no move of the run needs
data, fit is empty. Caps: select <= select_max (256), held-out <= held_out_max (5000, whole
groups); samples over a cap go to fit. `MoveContext.calibration` is a bounded in-memory subset of fit (`calib_max` samples,
evenly spaced) as input name -> [samples, *shape].
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import importlib.util
import inspect
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import DataError, UsageError

if TYPE_CHECKING:
    from ..modelio.ir import InputSpec
    from ..plugin import Pass

# the sources themselves (graphopt.evaluation.datasets), re-exported: this module is where callers find them
from .datasets import (ArrayData, CachedData, CalibrationData, Dataset, LoaderData, ShardData,  # noqa: E402,F401
                       Subset, _unpack, check_feed, labels_of, sample_ids, stack)

SELECT_MAX = 256
HELD_OUT_MAX = 5000
CALIB_MAX = 64


def _spill(items: Iterable[Any], source: str, inputs: "Sequence[InputSpec]", shard_size: int = 256) -> ShardData:
    """Iterate a loader once, writing its samples to .npy shards in a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="graphopt-data-"))
    atexit.register(shutil.rmtree, tmp, True)
    shards, counts, labels, groups = [], [], [], []
    buf: list[dict[str, np.ndarray]] = []

    def flush() -> None:
        if not buf:
            return
        k = len(shards)
        shard = {}
        for spec in inputs:
            path = tmp / f"{k:06d}.{len(shard)}.npy"
            np.save(path, np.stack([b[spec.name] for b in buf]))
            shard[spec.name] = str(path)
        shards.append(shard)
        counts.append(len(buf))
        buf.clear()

    n = 0
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            break
        except (DataError, UsageError):
            raise
        except Exception as e:  # the user's code: exit 2 naming it, not an internal error of graphopt's
            raise DataError(f"{source}: the loader failed after {n} samples ({type(e).__name__}: {e}); fix the "
                            "loader, or pass an .npz or a folder of shards") from None
        feed, lab, grp = _unpack(item, f"{source} item {n}")
        buf.append(check_feed(feed, inputs, f"{source} sample {n}"))
        labels.append(lab)
        groups.append(n if grp is None else grp)
        n += 1
        if len(buf) >= shard_size:
            flush()
    flush()
    if not n:
        raise DataError(f"{source}: the loader yielded no samples")
    return ShardData(shards, counts, source, inputs,
                     labels=labels if any(x is not None for x in labels) else None, groups=groups, cleanup=tmp)


def _reader_items(reader: Any) -> Iterable[Any]:
    while True:
        item = reader.get_next()
        if item is None:
            return
        yield item


def load_callable(spec: str, flag: str) -> Any:
    """`module:attr` or `path/to/file.py:attr` -> the object (the current folder is importable)."""
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise UsageError(f"{flag} {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise UsageError(f"{flag} {spec!r}: file {mod_name} not found")
            key = "graphopt_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            module = sys.modules.get(key)
            if module is None:
                sp = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(sp)
                sys.modules[key] = module
                sp.loader.exec_module(module)
        else:
            added = False
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
                added = True
            try:
                module = importlib.import_module(mod_name)
            finally:
                if added:
                    sys.path.remove(str(Path.cwd()))
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"{flag} {spec!r}: cannot import {mod_name} ({type(e).__name__}: {e})") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise UsageError(f"{flag} {spec!r}: {mod_name} has no attribute {attr!r}")
    return obj


def _looks_like_loader(spec: str) -> bool:
    mod, sep, attr = spec.rpartition(":")
    return bool(sep and mod and attr.isidentifier() and not Path(spec).exists() and len(mod) > 1)


def open_data(spec: str | Path | Dataset, inputs: "Sequence[InputSpec]", flag: str = "--data") -> Dataset:
    """An .npz file, a folder of shards, or a Python loader, checked against the model's inputs."""
    if isinstance(spec, Dataset):
        return spec
    text = str(spec)
    if _looks_like_loader(text):
        fn = load_callable(text, flag)
        try:
            obj = fn() if callable(fn) and not hasattr(fn, "get_next") else fn
        except (DataError, UsageError):
            raise
        except Exception as e:
            raise DataError(f"{flag} {text}: the loader failed ({type(e).__name__}: {e})") from None
        source = f"loader:{text}"
        if hasattr(obj, "__len__") and hasattr(obj, "__getitem__") and not isinstance(obj, Mapping):
            ds: Dataset = LoaderData(obj, source, inputs)
            if not ds.num_samples:
                raise DataError(f"{flag} {text}: the loader returned no samples")
            ds.sample(0)  # check the first sample now, with a clear message
            return ds
        if hasattr(obj, "get_next"):
            return _spill(_reader_items(obj), source, inputs)
        if isinstance(obj, Iterable) and not isinstance(obj, Mapping):
            return _spill(obj, source, inputs)
        raise DataError(f"{flag} {text}: the loader returned {type(obj).__name__}; return a dataset (len and "
                        "getitem), an iterable of feed dicts, or a CalibrationDataReader")
    path = Path(text)
    if path.is_dir():
        return _open_folder(path, inputs, flag)
    return load_data(path, inputs, flag)


def _open_folder(path: Path, inputs: "Sequence[InputSpec]", flag: str) -> ShardData:
    npz = sorted(p for p in path.iterdir() if p.suffix == ".npz")
    npy = sorted(p for p in path.iterdir() if p.suffix == ".npy" and p.name != "labels.npy")
    if npz and npy:
        raise DataError(f"{flag} {path}: mixes .npz and .npy shards; use one kind")
    if not npz and not npy:
        raise DataError(f"{flag} {path}: no .npz or .npy shards in the folder")
    names = [s.name for s in inputs]
    shards, counts = [], []
    if npy:
        if len(inputs) != 1:
            raise DataError(f"{flag} {path}: .npy shards hold one input, the model has {len(inputs)} ({names}); "
                            "write .npz shards keyed by input name")
        spec = inputs[0]
        for p in npy:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
            if tuple(a.shape) == tuple(spec.shape):  # one sample without a sample axis
                a = np.asarray(a)[None]
                p2 = Path(tempfile.mkdtemp(prefix="graphopt-data-")) / p.name
                atexit.register(shutil.rmtree, p2.parent, True)
                np.save(p2, a)
                p = p2
            if tuple(a.shape[1:]) != tuple(spec.shape):
                raise DataError(f"{flag} {p}: shape {list(a.shape)}, expected [samples, "
                                f"{', '.join(map(str, spec.shape))}]")
            shards.append({spec.name: str(p)})
            counts.append(int(a.shape[0]))
    else:
        for p in npz:
            try:
                with np.load(p, allow_pickle=False) as z:
                    keys = list(z.files)
                    n = None
                    for name in names:
                        if name not in keys:
                            raise DataError(f"{flag} {p}: keys {sorted(keys)} lack the model's input {name!r}")
                        # the array header only (np.load of an npz member reads it whole: fine per shard)
                        m = z[name].shape[0]
                        if n is not None and m != n:
                            raise DataError(f"{flag} {p}: inputs have different sample counts ({n} vs {m})")
                        n = m
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"{flag} {p}: not a readable .npz file ({type(e).__name__}: {e})") from None
            shards.append({name: ("npz", str(p), name) for name in names})
            counts.append(int(n or 0))
    labels = None
    lab_path = path / "labels.npy"
    if lab_path.is_file():
        labels = np.load(lab_path, allow_pickle=False)
        if len(labels) != sum(counts):
            raise DataError(f"{flag} {lab_path}: {len(labels)} labels for {sum(counts)} samples")
    if not sum(counts):
        raise DataError(f"{flag} {path}: no samples in the shards")
    ds = ShardData(shards, counts, f"folder:{path}", inputs, labels=labels)
    ds.sample(0)
    return ds


# ------------------------------------------------------------------------------ the split
@dataclass
class Splits:
    """fit / select / held-out views of the run's data, and the in-memory calibration subset."""

    fit: Dataset
    select: Dataset
    held_out: Dataset
    calibration: dict[str, np.ndarray]
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"fit": self.fit.num_samples, "select": self.select.num_samples,
                "held_out": self.held_out.num_samples,
                "calibration": next(iter(self.calibration.values())).shape[0] if self.calibration else 0}

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": self.sizes(), "sources": dict(self.sources), "notes": list(self.notes),
                "how": ("fit: calibration, least-squares repair, distillation; select: the gate (candidates "
                        "judged and chosen on it); held-out: the reported number, used for no choice. "
                        "Interleaved by sample group, deterministic.")}


def _units(ds: Dataset) -> list[list[int]]:
    """Sample indices grouped by ds.group(i), in first-appearance order."""
    order: dict[Any, list[int]] = {}
    for i in range(ds.num_samples):
        g = ds.group(i)
        try:
            hash(g)
        except TypeError:
            g = repr(g)
        order.setdefault(g, []).append(i)
    return list(order.values())


def split_data(data: Dataset, eval_data: Dataset | None = None, needs_fit: bool = True, *,
               select_max: int = SELECT_MAX, held_out_max: int = HELD_OUT_MAX,
               calib_max: int = CALIB_MAX) -> Splits:
    """Split `data` (and `eval_data`, held-out) into fit / select / held-out. See the module doc."""
    pattern = (["fit", "select"] if needs_fit else ["select"]) if eval_data is not None else \
        (["fit", "select", "fit", "held_out"] if needs_fit else ["select", "held_out"])
    caps = {"select": max(1, select_max), "held_out": max(1, held_out_max), "fit": None}
    units = _units(data)
    idx: dict[str, list[int]] = {"fit": [], "select": [], "held_out": []}
    notes: list[str] = []
    for k, unit in enumerate(units):
        want = pattern[k % len(pattern)]
        if caps[want] is not None and len(idx[want]) + len(unit) > caps[want]:
            want = "fit" if needs_fit else None
        if want is not None:
            idx[want].extend(unit)
    for name in ("fit", "select", "held_out"):
        if name == "held_out" and eval_data is not None:
            continue
        if name == "fit" and not needs_fit:
            continue
        if not idx[name]:  # too few samples: share them, and say so
            share = idx["select"] or idx["fit"] or idx["held_out"] or list(range(data.num_samples))
            idx[name] = list(share)
            notes.append(f"{data.num_samples} sample(s) are too few to split: {name} reuses the samples of "
                         "another split, so it is not independent")
    if eval_data is not None:
        held: Dataset = eval_data
        if eval_data.num_samples > held_out_max:  # whole groups (pairs), evenly spaced, up to the cap
            eunits = _units(eval_data)
            per = max(1, max(len(u) for u in eunits))
            take = np.unique(np.linspace(0, len(eunits) - 1, max(1, held_out_max // per)).round().astype(int))
            held = Subset(eval_data, [i for k in take for i in eunits[k]], "held_out")
    else:
        held = Subset(data, idx["held_out"], "held_out")
    fit = Subset(data, idx["fit"], "fit")
    calib: dict[str, np.ndarray] = {}
    if needs_fit and fit.num_samples:
        m = min(calib_max, fit.num_samples)
        pick = np.unique(np.linspace(0, fit.num_samples - 1, m).round().astype(int))
        calib = stack(fit, pick.tolist())
    sources = {"fit": data.source, "select": data.source,
               "held_out": eval_data.source if eval_data is not None else data.source}
    return Splits(fit=fit, select=Subset(data, idx["select"], "select"), held_out=held, calibration=calib,
                  sources=sources, notes=notes)


# ------------------------------------------------------------------------------ data-dependent moves
def data_dependent_moves(passes: "Mapping[str, Pass]", sites_by_pass: Mapping[str, list] | None,
                         pass_options: Mapping[str, Any], finetune_steps: int = 0) -> list[str]:
    """What the run would fit to data: one phrase per pass (Pass.data_moves), plus distillation."""
    out = []
    for name, p in passes.items():
        sites = (sites_by_pass or {}).get(name)
        if sites_by_pass is not None and not sites:
            continue  # no site in this model: the pass never moves
        fn = getattr(p, "data_moves", None)
        why = fn(sites or [], pass_options) if callable(fn) else (
            "fits to calibration data" if getattr(p, "uses_calibration", False) else None)
        if why:
            out.append(f"{name}: {why}")
    if finetune_steps > 0:
        out.append(f"--finetune {finetune_steps}: distillation on the fit split")
    return out


def require_real_data(moves: list[str], allow_synthetic: bool) -> str | None:
    """Without --data: stop (UsageError, exit 2) when moves need data, unless --allow-synthetic;
    then return the warning the report carries."""
    if not moves:
        return None
    if not allow_synthetic:
        raise UsageError("this run fits moves to data (" + "; ".join(moves) + ") but has no --data: pass real "
                         "inputs with --data (an .npz, a folder of shards or module:function), or "
                         "--allow-synthetic to fit them to random inputs (the result is then not to be trusted)")
    return ("NOT TO BE TRUSTED: moves were fit to SYNTHETIC random inputs (" + "; ".join(moves)
            + "): calibration ranges, repaired weights and channel choices may be wrong on real data")


# ------------------------------------------------------------------------------ .npz files
def load_data(path: str | Path, inputs: "list[InputSpec]", flag: str = "--data") -> CalibrationData:
    """Read an .npz keyed by input name with a leading sample axis; check it against the model."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{flag} {path}: not a readable .npz file ({type(e).__name__}: {e}); "
                        "write one with numpy.savez(path, **{input_name: array})") from None
    names = [s.name for s in inputs]
    labels = arrays.pop("labels", None) if "labels" not in names else None
    extras = {k[len("extra_"):]: arrays.pop(k) for k in list(arrays) if k.startswith("extra_") and k not in names}
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise DataError(f"{flag} {path}: keys {sorted(arrays)} do not match the model's inputs {names}"
                        + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra}; per-sample "
                           "labels go under 'labels', dataset-level extras under 'extra_<name>')" if extra else ""))
    n = None
    out = {}
    for spec in inputs:
        a = arrays[spec.name]
        if a.shape[1:] != spec.shape:
            hint = ""
            if a.shape == spec.shape:
                hint = "; it has no sample axis: stack samples as array[None] for one sample"
            elif len(spec.shape) > 1 and spec.shape[0] == 1 and a.shape[1:] == spec.shape[1:]:
                hint = (f"; for {a.shape[0]} samples of batch 1 add the sample axis: "
                        f"numpy.savez(path, {spec.name}=array[:, None])")
            raise DataError(f"{flag} {path}: {spec.name!r} has shape {list(a.shape)}, expected "
                            f"[samples, {', '.join(map(str, spec.shape))}]{hint}")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise DataError(f"{flag} {path}: inputs have different sample counts ({n} vs {a.shape[0]} for {spec.name!r})")
        if a.dtype != spec.dtype:
            if np.can_cast(a.dtype, spec.dtype, casting="same_kind"):
                a = a.astype(spec.dtype)
            else:
                raise DataError(f"{flag} {path}: {spec.name!r} has dtype {a.dtype}, the model expects {spec.dtype}")
        out[spec.name] = a
    if not n:
        raise DataError(f"{flag} {path}: no samples (leading axis is 0)")
    if labels is not None and len(labels) != n:
        raise DataError(f"{flag} {path}: 'labels' has {len(labels)} entries for {n} samples")
    return CalibrationData(out, f"file:{path}", labels=labels, extras=extras)


__all__ = ["ArrayData", "CachedData", "CalibrationData", "Dataset", "LoaderData", "ShardData", "Splits", "Subset",
           "check_feed", "data_dependent_moves", "labels_of", "load_callable", "load_data", "open_data",
           "require_real_data", "sample_ids", "split_data", "stack"]
