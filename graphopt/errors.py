"""Errors a user can act on, each with the process exit code the CLI returns for it.

Exit codes (documented in `graphopt --help` and the README):
  0  success: best.onnx and report.json written
  1  internal error (a bug in graphopt: please report it with the traceback from --debug)
  2  bad input or usage (model, data, flags, output directory)
  3  no candidate met the constraints (not even the original model)
  4  target unreachable (RPC tracker/server, GPU)
  130 interrupted (Ctrl-C); the run store and a report of what was done are kept
  143 terminated (SIGTERM), handled like Ctrl-C (graphopt.runstore.rundir.EXIT_TERMINATED)
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INFEASIBLE = 3
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 130


class GraphoptError(Exception):
    """Base class: the message is one line naming the problem and the fix."""

    exit_code = EXIT_INTERNAL


class UsageError(GraphoptError):
    """Bad flag, unknown name, unwritable output directory."""

    exit_code = EXIT_USAGE


class ModelError(UsageError):
    """The input model cannot be read, checked or run."""


class DataError(UsageError):
    """The calibration data does not match the model's inputs."""


class TargetUnreachable(GraphoptError):
    exit_code = EXIT_UNREACHABLE


class CompileError(GraphoptError):
    """A candidate failed to compile on a target. Recorded as a value by the driver."""


def first_line(e: BaseException, limit: int = 400) -> str:
    """The first non-empty line of an exception's message (its type's name when empty), cut at
    `limit` characters: how graphopt puts a library's error into its own one-line messages.
    (TVM's errors carry a C++ traceback first: graphopt.targets.tvm_common._first_line picks
    their message line instead.)"""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]
