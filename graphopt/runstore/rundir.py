"""The run directory (--out) under faults and hostile input.

One run per --out at a time (an flock on OUT/.graphopt.lock holding pid, host and start time;
the kernel drops it when the process dies, so a lock left by kill -9 is simply taken over);
leftovers of a killed run (work-* folders, half-written temp files) cleaned by the next run;
SIGTERM treated like Ctrl-C; the input model and data never among the files a run writes;
resource checks (threads, the memory a --shape implies) before anything is allocated; a run
store that is not graphopt's (truncated, foreign, empty) refused with exit 2, and opened
read-only by the commands that only read it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from ..errors import DataError, UsageError, first_line

log = logging.getLogger("graphopt")

LOCK_NAME = ".graphopt.lock"
# every file a run (or `graphopt report`) writes directly in --out; an input must not be one of them
OUTPUT_NAMES = frozenset({"best.onnx", "best.onnx.data", "report.json", "report.html", "runs.sqlite", "runs.sqlite-wal",
                          "runs.sqlite-shm", "runs.sqlite-journal", "model.so", "model.tar", LOCK_NAME})
EXIT_TERMINATED = 143  # 128 + SIGTERM: what `timeout`, docker, systemd and CI expect
# a --shape whose synthetic inputs (plus one sample's largest activation) need more than this
# fraction of the memory available now is refused before anything is allocated
MEMORY_FRACTION = 0.5


# ---------------------------------------------------------------------------------- the lock
class RunLock:
    """Exclusive lock on an --out directory for a run's lifetime (fcntl.flock, non-blocking).

    The lock file holds "pid host start-time" of the holder while it is held (emptied on release).
    A holder that died (kill -9, power loss) holds nothing: the kernel released its flock, and the
    next run takes the lock over and says so.
    """

    def __init__(self, out: str | Path, what: str = "run"):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.what = what
        self.fd: int | None = None
        self.previous: dict[str, Any] | None = None  # what a dead holder left in the file

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # a filesystem without flock
                log.warning("--out %s: this filesystem cannot lock files (%s); a second run on this folder at the "
                            "same time would not be refused", self.out, e.strerror)
                self.fd = fd
                return self
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UsageError(f"--out {self.out}: cannot lock {self.path.name} ({e.strerror}); "
                                 "choose a local, writable --out") from None
            holder = read_lock(self.path)
            who = (f"graphopt process {holder.get('pid')} on {holder.get('host')} "
                   f"({holder.get('what', 'run')} started {holder.get('started_text', '?')})") if holder \
                else "another graphopt process"
            raise UsageError(f"--out {self.out} is in use by {who}; wait for it to finish or choose another --out") \
                from None
        self.fd = fd
        self.previous = _parse_lock(os.pread(fd, 4096, 0))
        if self.previous and self.previous.get("pid") != os.getpid():
            log.info("--out %s: took over the lock left by graphopt process %s on %s (no longer running)",
                     self.out, self.previous.get("pid"), self.previous.get("host"))
        now = time.time()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now, "what": self.what,
                "started_text": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # an empty lock file: nobody holds it, nothing to take over
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_out_dir(out: str | Path, what: str = "run") -> tuple[Path, RunLock, bool]:
    """Create (if needed) and check --out, take its lock, clean what a killed run left.
    Returns (out, lock, created). Raises UsageError (exit 2) when another process holds it."""
    from .outputs import prepare_out_dir

    created = not Path(out).exists()
    path = prepare_out_dir(out)
    lock = RunLock(path, what).acquire()
    try:
        clean_leftovers(path)
    except BaseException:
        lock.release()
        raise
    return path, lock, created


def _parse_lock(raw: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(raw.decode("utf-8", "replace") or "null")
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def read_lock(path: str | Path) -> dict[str, Any] | None:
    try:
        return _parse_lock(Path(path).read_bytes()[:4096])
    except OSError:
        return None


def clean_leftovers(out: str | Path) -> list[str]:
    """Remove what a killed run left in --out: work-* folders and the hidden temp files of
    atomic writes (.best.onnx.XXXX.tmp). Only called while holding the lock."""
    out = Path(out)
    removed = []
    for p in sorted(out.iterdir()):
        if p.name.startswith("work-") and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p.name)
    if removed:
        log.info("--out %s: removed %s left by an earlier run that was killed", out, ", ".join(removed))
    return removed


def remove_if_only_lock(out: Path) -> None:
    """A run that created --out and then failed leaves no empty folder behind."""
    with contextlib.suppress(OSError):
        if {p.name for p in out.iterdir()} <= {LOCK_NAME}:
            (out / LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()


# ------------------------------------------------------------------------- inputs vs outputs
def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def is_run_output(path: str | Path, out: str | Path) -> bool:
    """Would a run with this --out write (or delete) `path`? Symlinks and hard links included."""
    path, out = Path(path), Path(out)
    rp, ro = path.resolve(), out.resolve()
    if rp.parent == ro and (rp.name in OUTPUT_NAMES or rp.name.startswith("work-")
                            or (rp.name.startswith(".") and rp.name.endswith(".tmp"))):
        return True
    if ro in rp.parents:
        rel = rp.relative_to(ro)
        if rel.parts and rel.parts[0].startswith("work-"):
            return True
    ident = _identity(path)
    if ident is not None and out.is_dir():
        for name in OUTPUT_NAMES:
            if _identity(out / name) == ident:
                return True
    return False


def check_inputs_not_outputs(out: str | Path, inputs: Mapping[str, str | Path | None]) -> None:
    """Refuse an --out where a run would overwrite one of its own inputs (exit 2)."""
    for flag, path in inputs.items():
        if path is not None and is_run_output(path, out):
            raise UsageError(f"{flag} {path} is a file graphopt writes in --out {out}; the input is never "
                             "modified: move it out of that folder or choose another --out")


def check_export_dest(dest: str | Path, protected: Mapping[str, str | Path | None]) -> None:
    """`graphopt export -o DEST`: a file in an existing folder, never one of the run's inputs."""
    dest = Path(dest)
    if dest.is_dir():
        raise UsageError(f"-o {dest} is a directory; give a file name, e.g. -o {dest / 'model.onnx'}")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"-o {dest}: folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"-o {dest}: folder {parent} is not writable; choose another path")
    ident = _identity(dest)
    for what, path in protected.items():
        if path is None:
            continue
        p = Path(path)
        if dest.resolve() == p.resolve() or (ident is not None and ident == _identity(p)):
            raise UsageError(f"-o {dest} is the run's {what}; graphopt never overwrites it: choose another -o path")


# ------------------------------------------------------------------------------ the run store
_NOT_A_STORE = ("malformed", "not a database", "file is encrypted", "unsupported file format", "disk i/o")


def store_error(path: Path, e: BaseException) -> UsageError:
    return UsageError(f"{path} is not a readable graphopt run store ({_one_line(e)}); move it away (the run starts "
                      "over) or choose another --out")


def is_corrupt(e: BaseException) -> bool:
    return isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.IntegrityError) \
        and any(s in str(e).lower() for s in _NOT_A_STORE)


def check_store_file(path: str | Path) -> None:
    """Before a run writes into OUT/runs.sqlite: it is absent, or a graphopt run store. A
    truncated or foreign database is refused, never written into."""
    path = Path(path)
    if not path.exists():
        return
    tables = _tables_read_only(path)
    if tables is None:
        return  # an empty file: sqlite makes a database of it
    if tables and not {"meta", "candidates"} <= tables:
        raise UsageError(f"{path} is an SQLite database but not a graphopt run store (tables: "
                         f"{', '.join(sorted(tables))}); it is left as it is: choose another --out")


def _tables_read_only(path: Path) -> set[str] | None:
    if path.stat().st_size == 0:
        return None
    try:
        db = connect_read_only(path)
        try:
            return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise store_error(path, e) from None


def connect_read_only(path: str | Path) -> sqlite3.Connection:
    """Open an SQLite file without writing to it: no tables created, no WAL switch."""
    from urllib.parse import quote

    path = Path(path).resolve()
    mode = "mode=ro"
    # a WAL-mode database opened read-only still creates its -wal and -shm files; when there is no
    # -wal (no run is writing it, nothing is waiting to be checkpointed) the file is read as immutable
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            header = f.read(20)
        wal_file = path.with_name(path.name + "-wal")
        if len(header) == 20 and header[18] == 2 and not wal_file.exists():
            mode += "&immutable=1"
    return sqlite3.connect(f"file:{quote(str(path))}?{mode}", uri=True, isolation_level=None)


def check_run_store_tables(db: sqlite3.Connection, path: Path) -> None:
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise store_error(path, e) from None
    if not {"meta", "candidates"} <= tables:
        raise UsageError(f"{path} is not a graphopt run store (tables: {', '.join(sorted(tables)) or 'none'}); "
                         "pass the --out directory of a graphopt run")


# --------------------------------------------------------------------------------- SIGTERM
class TerminateAsInterrupt:
    """SIGTERM (timeout, docker stop, systemd, CI) acts like Ctrl-C: KeyboardInterrupt in the main
    thread, once; the run stops, keeps its store and writes its report. `received` says it came."""

    def __init__(self) -> None:
        self.received = False
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received:  # a second SIGTERM while the report is being written: let it finish
            return
        self.received = True
        raise KeyboardInterrupt("SIGTERM")

    def __enter__(self) -> "TerminateAsInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


# ------------------------------------------------------------------------------- resources
def cap_threads(target: str, options: dict[str, Any]) -> None:
    """A local target's thread count is capped at the CPUs this machine has (more only oversubscribes,
    and a huge count makes the runtime allocate a stack per thread). Remote devices are left alone."""
    threads = options.get("threads")
    if threads is None or isinstance(threads, bool):
        return
    try:
        n = int(threads)
    except (TypeError, ValueError):
        raise UsageError(f"--threads {threads!r}: must be a positive number") from None
    if n <= 0:
        raise UsageError(f"--threads {n}: must be a positive number")
    # rpi4 and cuda run on another device; x86 may measure over RPC (a tracker or a server)
    remote = target not in ("ort", "x86") or any(options.get(k) for k in ("tracker", "server", "key"))
    cpus = os.cpu_count() or 1
    if not remote and n > cpus:
        log.warning("--threads %d: this machine has %d CPUs; using %d threads", n, cpus, cpus)
        options["threads"] = cpus


def available_memory() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable; else free pages), None if unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_synthetic_memory(inputs: Iterable[Any], samples: int, proto: Any = None,
                           shapes: Mapping[str, Any] | None = None, limit: int | None = None) -> int:
    """Refuse (exit 2) synthetic inputs that would not fit: bytes of the inputs x samples, plus the
    largest tensor one sample's run makes, against MEMORY_FRACTION of the available memory."""
    import numpy as np

    need = 0
    for spec in inputs:
        need += int(np.prod(spec.shape, dtype=np.float64)) * np.dtype(spec.dtype).itemsize * samples
    need += 2 * largest_tensor_bytes(proto) if proto is not None else 0
    avail = available_memory() if limit is None else None
    cap = limit if limit is not None else (int(avail * MEMORY_FRACTION) if avail else None)
    if cap is not None and need > cap:
        given = " ".join(f"--shape {k}={'x'.join(map(str, v))}" for k, v in (shapes or {}).items())
        raise UsageError(f"{given or 'the model'}: {samples} synthetic samples of the inputs and one sample's "
                         f"largest tensor need {need / 1e9:.1f} GB, more than the {cap / 1e9:.1f} GB graphopt allows "
                         f"({MEMORY_FRACTION:.0%} of the memory available); use a smaller --shape")
    return need


def largest_tensor_bytes(proto: Any) -> int:
    import numpy as np
    import onnx

    best = 0
    for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or not tt.elem_type:
            continue
        dims = [d.dim_value for d in tt.shape.dim]
        if any(d <= 0 for d in dims):
            continue
        try:
            size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        except Exception:
            size = 4
        best = max(best, int(np.prod(dims, dtype=np.float64)) * size)
    return best


def check_finite(arrays: Mapping[str, Any], where: str) -> None:
    """Calibration data with NaN or Inf makes every fidelity NaN: refuse it (exit 2)."""
    import numpy as np

    for name, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating):
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                raise DataError(f"{where}: {name!r} holds {bad} NaN/Inf value(s); graphopt needs finite inputs: "
                                "clean the data (e.g. numpy.nan_to_num) and rerun")


# ---------------------------------------------------------------------------------- litter
_CWD_LOCK = threading.Lock()


@contextlib.contextmanager
def in_temp_cwd(prefix: str = "graphopt-cwd-") -> Iterator[Path]:
    """Run a library call that writes into the current directory (onnxruntime's symbolic shape
    inference saves sym_shape_infer_temp.onnx there) inside a fresh temp folder, removed after."""
    import tempfile

    with _CWD_LOCK:
        old = os.getcwd()
        tmp = tempfile.mkdtemp(prefix=prefix)
        try:
            os.chdir(tmp)
            yield Path(tmp)
        finally:
            os.chdir(old)
            shutil.rmtree(tmp, ignore_errors=True)


def _one_line(e: BaseException) -> str:
    return first_line(e, 300)
