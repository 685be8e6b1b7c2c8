"""graphopt: compiler-aware ONNX graph optimizer with an embedded search pass.

    from graphopt import optimize
    result = optimize("model.onnx", target="ort", passes=["conv_bn"], budget=20, out="out")
"""

from ._version import __version__


def optimize(*args, **kwargs):
    """Same as `graphopt run`; see graphopt.api.optimize for the arguments."""
    from .api import optimize as _optimize

    return _optimize(*args, **kwargs)


__all__ = ["optimize", "__version__"]
