"""A recovered candidate on disk: its gene in the genotype (`recover: from-<parent id>`) and its
weights file under the run directory, read back when the candidate is rebuilt (materialize).
graphopt.recovery.recover re-exports these names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

    from ..genotype import Genotype

RECOVER_KEY = "recover"  # the gene that marks a recovered record: value "from-<parent id>"
RECOVER_DIR = "recovered"  # weights files under the run directory


def with_weights(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `values` hold those arrays (dtype kept)."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in values:
            dtype = numpy_helper.to_array(init).dtype
            init.CopyFrom(numpy_helper.from_array(np.asarray(values[init.name]).astype(dtype), init.name))
    return out


def split_genotype(genotype: Genotype) -> tuple[Genotype, str | None]:
    """(the parent's genotype, "from-<id>" or None)."""
    if RECOVER_KEY not in genotype:
        return genotype, None
    from ..genotype import Genotype

    return Genotype({k: v for k, v in genotype.items() if k != RECOVER_KEY}), str(genotype[RECOVER_KEY])


def weights_path(run_dir: str | Path, tag: str) -> Path:
    return Path(run_dir) / RECOVER_DIR / f"{tag}.npz"


def apply_recovered(model: onnx.ModelProto, ctx, tag: str) -> onnx.ModelProto:
    """The materialize hook: load the recovered weights file of this record into the model."""
    from ..errors import UsageError

    run_dir = ctx.options.get("run_dir")
    path = weights_path(run_dir, tag) if run_dir else None
    if path is None or not path.is_file():
        raise UsageError(f"recovered weights {path or RECOVER_DIR + '/' + tag + '.npz'} not found: the run "
                         "directory lost its recovered/ folder; run again with --recover-top")
    with np.load(path, allow_pickle=False) as z:
        values = {k: z[k] for k in z.files}
    have = {t.name: tuple(t.dims) for t in model.graph.initializer}
    bad = [k for k, v in values.items() if have.get(k) != tuple(v.shape)]
    if bad:
        raise UsageError(f"recovered weights {path}: tensors {bad[:3]} do not fit the rebuilt candidate "
                         "(the passes changed since the run); run again with another --out")
    return with_weights(model, values)


def save_weights(run_dir: str | Path, tag: str, weights: Mapping[str, np.ndarray]) -> Path:
    import io

    from ..runstore.outputs import atomic_write_bytes

    path = weights_path(run_dir, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in weights.items()})
    return atomic_write_bytes(path, buf.getvalue())
