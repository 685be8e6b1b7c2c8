"""The older passes' names for the public graph helpers in graphopt/rewrite.py (one implementation),
plus `_static_size`."""

from __future__ import annotations

import numpy as np

from graphopt.rewrite import fresh_name as _fresh_name  # noqa: F401
from graphopt.rewrite import input_of as _input  # noqa: F401
from graphopt.rewrite import present as _present  # noqa: F401
from graphopt.rewrite import value as _const  # noqa: F401


def _static_size(shape) -> int | None:
    if shape is None or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64))
