"""--cluster ADDRESS: candidate compiles (and their tuning) as Ray tasks on a cluster's workers.

A second implementation of compile_pool.CompilePool's interface (submit/restart/close/workers),
so the pipelined loop in driver.py does not care which pool it has. Devices still measure
through the TVM RPC tracker (--jobs N), exactly as with local --compile-workers.

- ADDRESS is `auto` (a Ray already running on this machine), `HOST:PORT` (a cluster's GCS
  address; this machine is a node of it) or `ray://HOST:PORT` (Ray Client; needs
  `pip install 'ray[client]'`). Ray is imported only here, only with --cluster.
- A compile is a task that needs one unit of the custom resource `tvm_compiler` (declare it
  per worker: `ray start --address ... --resources '{"tvm_compiler": 1}'`); up to that many
  compiles run at once (or --compile-workers M when M > 1). Tasks are never retried by Ray
  (max_retries=0): a lost worker is a failed candidate, not a compile done twice.
- A job ships the candidate's ONNX bytes (workers need not share a filesystem with the
  search); the worker compiles in its own temp folder, calls Target.portable, and sends back
  the portable Artifact plus every file it wrote there; this side writes them into the
  candidate's folder and rewrites the artifact's paths, then Target.load_portable as today.
- A compile that raises comes back as compile_pool.WorkerCompileError ("compile: <Type>:
  <message>" in the record); a worker or node that dies comes back as WorkerCompileError
  "the Ray worker compiling this candidate was lost (...)": failure is a value, the run goes
  on, the remaining workers take the next candidates.

The tuning database (one writer at a time, and nobody re-tunes what was just tuned): one Ray
actor, `TuningDbOwner`, pinned to the search's node, owns the real database folder there (the
one this machine's compiles use, under its flock). A worker that is about to tune takes a
*lease* from it (targets.tuning.open_db_locked calls the hook installed here): the actor takes
the database's flock (so other runs on that machine are excluded too) and sends back the
database files; the worker writes them into its own replica folder and tunes into that; when
it lets go (unlock_db), it sends the lines it appended and the actor appends them to the real
files and releases the flock. Tuning is therefore serialized cluster-wide, exactly like the
local flock (MetaSchedule's JSON database refers to workloads by line number, so appends must
not interleave), and every tune starts from all records merged before it. A lease not renewed
for `lease_ttl_s` (the worker died) expires without merging anything.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .compile_pool import WorkerCompileError, _compile, _init
from ..errors import TargetUnreachable, UsageError

log = logging.getLogger("graphopt")

RESOURCE = "tvm_compiler"
DB_FILES = ("database_workload.json", "database_tuning_record.json")


def connect(address: str):
    """ray.init(address) with one-line errors; returns the ray module."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--cluster {address}: Ray is not installed; pip install 'graphopt[cluster]' "
                         "(or pip install ray)") from None
    if address.startswith("ray://"):
        try:
            import grpc  # noqa: F401 - Ray Client's transport
        except ImportError:
            raise UsageError(f"--cluster {address}: Ray Client (ray://) needs pip install 'ray[client]'; or give "
                             "the cluster's GCS address HOST:PORT from a machine that joined it") from None
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    if address != "auto":  # Ray itself waits minutes for an address nobody answers on
        import socket

        host, _, port = hostport.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
        except (OSError, ValueError) as e:
            raise UsageError(f"--cluster {address}: nothing answers there ({type(e).__name__}: {e}); give the "
                             "address `ray start --head` printed (HOST:PORT, ray://HOST:PORT or auto)") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
        except Exception as e:  # noqa: BLE001
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"--cluster {address}: cannot connect to the Ray cluster ({type(e).__name__}: "
                             f"{first[:300]}); start one with `ray start --head` or give its address") from None
    return ray


# ---------------------------------------------------------------------------- the worker side
_WORKER: dict[str, Any] = {}  # this Ray worker process's Target, keyed by its configuration


def _remote_compile(key: tuple, model_bytes: bytes, knobs: dict[str, Any], db_owner: Any,
                    master_root: str | None):
    """A Ray task: build (once per worker process) the run's Target, compile the candidate in a
    temp folder, return (portable artifact, that folder's path, {relative path: bytes})."""
    import shutil

    from . import compile_pool

    from ..targets import tuning

    if _WORKER.get("key") != key:
        target_name, target_class, options, level = key[0], key[1], dict(key[2]), key[3]
        if db_owner is not None:  # tune into a replica here; the owner merges (see the module doc)
            options["tuning_db"] = tempfile.mkdtemp(prefix="graphopt-tuning-replica-")
        _init(target_name, target_class, options, level)
        _WORKER.update(key=key, target=compile_pool._TARGET)
    tuning.REMOTE_DB = _LeaseClient(db_owner) if db_owner is not None else None
    compile_pool._TARGET = _WORKER["target"]
    work = Path(tempfile.mkdtemp(prefix="graphopt-cluster-"))
    try:
        (work / "candidate.onnx").write_bytes(model_bytes)
        portable = _compile(str(work / "candidate.onnx"), str(work), knobs)
        portable.info["compiled_in"]["node"] = _node()
        files = {str(p.relative_to(work)): p.read_bytes() for p in work.rglob("*")
                 if p.is_file() and p.name != "candidate.onnx"}
        return portable, str(work), files
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _node() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001
        return "?"


class _LeaseClient:
    """Worker side of the tuning-database lease (installed as targets.tuning.REMOTE_DB)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.held: dict[str, tuple[str, dict[str, int], threading.Event]] = {}

    def acquire(self, db_dir: Path) -> None:
        import ray

        lease = uuid.uuid4().hex
        files = ray.get(self.owner.acquire.remote(db_dir.name, lease))
        sizes = {}
        for name in DB_FILES:
            data = files.get(name, b"")
            tmp = db_dir / (name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, db_dir / name)
            sizes[name] = len(data)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.owner_ttl() / 3):
                try:
                    ray.get(self.owner.renew.remote(lease))
                except Exception:  # noqa: BLE001
                    return

        threading.Thread(target=renew, daemon=True, name="graphopt-lease").start()
        self.held[str(Path(db_dir).resolve())] = (lease, sizes, stop)

    def owner_ttl(self) -> float:
        return float(os.environ.get("GRAPHOPT_LEASE_TTL_S", "30"))

    def release(self, db_dir: Path) -> None:
        import ray

        lease, sizes, stop = self.held.pop(str(Path(db_dir).resolve()))
        stop.set()
        appended = {}
        for name in DB_FILES:
            p = db_dir / name
            data = p.read_bytes() if p.exists() else b""
            appended[name] = data[sizes[name]:]
        ray.get(self.owner.release.remote(lease, appended))


class TuningDbOwner:
    """The Ray actor that owns the real tuning database folder (see the module doc). Threaded
    (max_concurrency), so a lease waiting for the flock does not block renewals or releases."""

    def __init__(self, root: str, ttl_s: float = 30.0) -> None:
        self.root, self.ttl_s = Path(root), float(ttl_s)
        self.leases: dict[str, dict[str, Any]] = {}
        self.merged: list[dict[str, Any]] = []  # one entry per release/expiry: what happened
        self.mu = threading.Lock()
        threading.Thread(target=self._expire, daemon=True).start()

    def acquire(self, key: str, lease: str) -> dict[str, bytes]:
        import fcntl

        db = self.root / key
        db.mkdir(parents=True, exist_ok=True)
        f = open(db / ".graphopt-db.lock", "a+")  # noqa: SIM115 - closed at release/expiry
        t = time.monotonic()
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # other leases, and other runs on this machine
        with self.mu:
            self.leases[lease] = {"file": f, "db": db, "renewed": time.monotonic(), "waited_s": time.monotonic() - t}
        return {name: (db / name).read_bytes() for name in DB_FILES if (db / name).exists()}

    def renew(self, lease: str) -> bool:
        with self.mu:
            if lease in self.leases:
                self.leases[lease]["renewed"] = time.monotonic()
                return True
            return False

    def release(self, lease: str, appended: dict[str, bytes]) -> bool:
        with self.mu:
            held = self.leases.pop(lease, None)
        if held is None:  # expired: its holder was taken for dead, its records are not merged
            return False
        try:
            for name, data in appended.items():
                if data and name in DB_FILES:
                    with open(held["db"] / name, "ab") as out:
                        out.write(data)
                        out.flush()
                        os.fsync(out.fileno())
            self.merged.append({"lease": lease, "bytes": {k: len(v) for k, v in appended.items()},
                                "waited_s": held["waited_s"], "expired": False})
        finally:
            self._unlock(held)
        return True

    def history(self) -> list[dict[str, Any]]:
        return list(self.merged)

    def _unlock(self, held: dict[str, Any]) -> None:
        import fcntl

        try:
            fcntl.flock(held["file"].fileno(), fcntl.LOCK_UN)
        finally:
            held["file"].close()

    def _expire(self) -> None:
        while True:
            time.sleep(max(0.1, self.ttl_s / 5))
            now = time.monotonic()
            with self.mu:
                dead = [k for k, v in self.leases.items() if now - v["renewed"] > self.ttl_s]
                gone = [(k, self.leases.pop(k)) for k in dead]
            for k, held in gone:
                self.merged.append({"lease": k, "bytes": {}, "waited_s": held["waited_s"], "expired": True})
                self._unlock(held)


# ----------------------------------------------------------------------------- the search side
class RayCompilePool:
    """CompilePool's interface over a Ray cluster: each submit is one Ray task."""

    def __init__(self, address: str, workers: int, target_name: str, target_class: str,
                 target_options: dict[str, Any], tunes: bool = False) -> None:
        try:
            import ray as _ray

            self._owns_ray = not _ray.is_initialized()  # a Ray the caller connected stays connected
        except ImportError:
            self._owns_ray = True  # connect() says how to install it
        ray = self.ray = connect(address)
        self.address = address
        have = int(ray.cluster_resources().get(RESOURCE, 0))
        if have < 1:
            raise UsageError(f"--cluster {address}: no worker declares the resource {RESOURCE!r}; start each compile "
                             f"worker with ray start --address ... --resources '{{\"{RESOURCE}\": 1}}'")
        self.workers = workers if workers > 1 else have
        level = logging.getLogger("graphopt").getEffectiveLevel()
        self._key = (target_name, target_class, tuple(sorted(dict(target_options).items())), level)
        self._task = ray.remote(num_cpus=0, resources={RESOURCE: 1}, max_retries=0)(_remote_compile)
        self._owner = None
        self._master_root = None
        if tunes:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            from ..targets.tuning import default_db_root

            root = target_options.get("tuning_db")
            self._master_root = str(Path(root).expanduser() if root else default_db_root())
            here = ray.get_runtime_context().get_node_id()
            ttl = float(os.environ.get("GRAPHOPT_LEASE_TTL_S", "30"))
            self._owner = ray.remote(num_cpus=0, max_concurrency=32)(TuningDbOwner).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(self._master_root, ttl)
        self._refs: dict[Any, Future] = {}
        log.info("--cluster %s: up to %d compiles at once on %d Ray worker(s) with %r%s", address, self.workers,
                 have, RESOURCE, f"; tuning database owned on this node ({self._master_root})" if tunes else "")

    def submit(self, model_path: Path, workdir: Path, knobs: dict[str, Any]) -> Future:
        data = Path(model_path).read_bytes()
        ext = Path(str(model_path) + ".data")
        if ext.exists():
            raise WorkerCompileError("--cluster: a model over 2 GB (external data) cannot be shipped to a Ray worker")
        ref = self._task.remote(self._key, data, dict(knobs), self._owner, self._master_root)
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        self._refs[ref] = fut
        ref.future().add_done_callback(lambda f, ref=ref: self._landed(ref, f, Path(workdir)))
        return fut

    def _landed(self, ref, rf, workdir: Path) -> None:
        fut = self._refs.pop(ref, None)
        if fut is None or fut.done():
            return
        try:
            portable, remote_dir, files = rf.result()
        except BaseException as e:  # noqa: BLE001
            fut.set_exception(self._as_value(e))
            return
        try:
            for rel, data in files.items():
                dest = workdir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
            portable.info = _rebase(portable.info, remote_dir, str(workdir))
            portable.files = [Path(_rebase(str(f), remote_dir, str(workdir))) for f in portable.files]
            fut.set_result(portable)
        except BaseException as e:  # noqa: BLE001
            fut.set_exception(WorkerCompileError(f"--cluster: writing the compiled files back: {type(e).__name__}: {e}"))

    def _as_value(self, e: BaseException) -> BaseException:
        from ray import exceptions as rex

        cause = getattr(e, "cause", None)
        if isinstance(e, rex.RayTaskError) and isinstance(cause, (WorkerCompileError, TargetUnreachable)):
            return cause
        if isinstance(e, rex.TaskCancelledError):
            return WorkerCompileError("--cluster: the compile was cancelled")
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return WorkerCompileError(f"the Ray worker compiling this candidate was lost ({type(e).__name__}: {first})")

    def restart(self) -> None:
        """Nothing to restart: Ray schedules the next tasks on the workers still alive."""

    def pids(self) -> list[int]:
        return []

    def close(self, kill: bool = False) -> None:
        """kill=True (Ctrl-C, an error): cancel the compiles in flight (force: their processes end)."""
        refs, self._refs = dict(self._refs), {}
        for ref, fut in refs.items():
            if kill:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001
                    pass
            if not fut.done():
                fut.set_exception(WorkerCompileError("--cluster: the compile was cancelled"))
        if self._owner is not None:
            try:
                self.ray.kill(self._owner)
            except Exception:  # noqa: BLE001
                pass
            self._owner = None
        if self._owns_ray:
            try:
                self.ray.shutdown()
            except Exception:  # noqa: BLE001
                pass


def _rebase(obj: Any, old: str, new: str) -> Any:
    """The artifact's info with every path under the worker's temp folder moved to `new`."""
    if isinstance(obj, str):
        return new + obj[len(old):] if obj == old or obj.startswith(old + os.sep) else obj
    if isinstance(obj, dict):
        return {k: _rebase(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebase(v, old, new) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_rebase(v, old, new) for v in obj)
    return obj
