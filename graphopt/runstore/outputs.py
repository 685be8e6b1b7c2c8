"""Output directory handling: writable check up front, every file written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# protobuf refuses to serialize a message over 2 GB; past this size a model's weights go to an external
# data file (the margin covers the graph itself; graphopt.parallel.pipeline uses the same bound)
INLINE_LIMIT = 1_800_000_000


def uses_external_data(model: Any) -> bool:
    """Does the ModelProto keep weights in files next to it? (Its initializers: the test
    graphopt.modelio.ir's loader makes before it loads external data.)"""
    from onnx.external_data_helper import uses_external_data as external

    return any(external(t) for t in model.graph.initializer)


def atomic_write_model(path: str | Path, model: Any, inline_limit: int | None = None) -> tuple[Path, Path | None]:
    """Write the ONNX ModelProto `model` (weights in memory) to `path` atomically. Up to `inline_limit`
    bytes (None: INLINE_LIMIT): one self-contained file. Larger (protobuf cannot serialize a message
    over 2 GB): onnx's external data, the weights in `<name>.data` next to it, both written by
    onnx.save_model in a work-* folder of the same directory (clean_leftovers removes one a killed run
    left), fsynced, and renamed into place, the data file first. `model` is left as it was. Returns
    (the model's path, the data file's path or None)."""
    import shutil

    import onnx

    path = Path(path)
    if model.ByteSize() <= (INLINE_LIMIT if inline_limit is None else inline_limit):
        return atomic_write_bytes(path, model.SerializeToString()), None
    data = path.with_name(path.name + ".data")
    work = Path(tempfile.mkdtemp(prefix="work-model-", dir=path.parent))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # save_model moves the weights out of the proto it is given
        onnx.save_model(copy, str(work / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name)
        for f in (work / data.name, work / path.name):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~_umask())
        os.replace(work / data.name, data)
        os.replace(work / path.name, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path, data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
