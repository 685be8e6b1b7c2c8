"""Output directory handling: writable check up front, every file written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ..errors import UsageError


def prepare_out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is a file, not a directory; choose a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create the directory ({e.strerror}); choose a writable path") from None
    if not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".graphopt-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--out {out}: not writable ({e.strerror}); choose a writable path") from None
    for name in ("best.onnx", "best.onnx.data", "report.json", "report.html"):  # found now, not after the search
        if (out / name).is_dir():
            raise UsageError(f"--out {out}: {name} there is a directory, where the run writes a file; move it "
                             "away or choose another --out")
    return out


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over the target."""
    path = Path(path)
    tmp = _write_temp(path, lambda f: f.write(data))
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return path


def _write_temp(path: Path, write: Callable[[BinaryIO], Any]) -> str:
    """A hidden temp file next to `path` (.NAME.XXXX.tmp: clean_leftovers removes one a killed run
    left) holding what `write` wrote, fsynced; the caller renames it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# protobuf refuses to serialize a message over 2 GB; past this size a model's weights go to an external
# data file (the margin covers the graph itself; graphopt.parallel.pipeline uses the same bound)
INLINE_LIMIT = 1_800_000_000
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay in the graph (onnx's own size_threshold)


def model_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from model_tensors(a.g)
            for g in a.graphs:
                yield from model_tensors(g)


def uses_external_data(model: Any) -> bool:
    """Does the ModelProto keep weights in files next to it (TensorProto.EXTERNAL)?"""
    return any(t.data_location == 1 for t in model_tensors(model.graph))  # 1: onnx.TensorProto.EXTERNAL


def atomic_write_model(path: str | Path, model: Any, inline_limit: int | None = None) -> tuple[Path, Path | None]:
    """Write the ONNX ModelProto `model` (weights in memory) to `path` atomically.

    Up to `inline_limit` bytes (None: INLINE_LIMIT): one self-contained file. Larger (protobuf
    cannot serialize a message over 2 GB): the graph at `path` and every tensor of
    EXTERNAL_MIN_BYTES or more in `<name>.data` next to it (ONNX external data, its location relative to the model); the data file is renamed
    into place just before the model that names it. `model` is left as it was. Returns (the model's
    path, the data file's path or None)."""
    path = Path(path)
    if model.ByteSize() <= (INLINE_LIMIT if inline_limit is None else inline_limit):
        return atomic_write_bytes(path, model.SerializeToString()), None
    data = path.with_name(path.name + ".data")
    moved: list[tuple[Any, bytes, bool]] = []  # (tensor, its raw bytes, had data_location set)

    def write(f: BinaryIO) -> None:
        for t in model_tensors(model.graph):
            if t.data_location == 1 or not t.HasField("raw_data"):
                continue
            raw = t.raw_data
            if len(raw) < EXTERNAL_MIN_BYTES:
                continue
            offset = f.tell()
            f.write(raw)
            moved.append((t, raw, t.HasField("data_location")))
            t.ClearField("raw_data")
            t.data_location = 1  # EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value

    tmp = None
    try:
        tmp = _write_temp(data, write)
        graph = model.SerializeToString()
        os.replace(tmp, data)
        tmp = None
        atomic_write_bytes(path, graph)
    finally:
        if tmp is not None:
            _unlink(tmp)
        for t, raw, had_location in moved:  # the caller's model as it was
            del t.external_data[:]
            t.ClearField("data_location")
            if had_location:
                t.data_location = 0
            t.raw_data = raw
    return path, data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
