"""Measuring on a remote device through TVM RPC (a tracker and its servers, or one server).

A target that has an `RpcConfig` exports each candidate as a shared library, uploads it to a
device the tracker hands out (or to the one server given), loads it with the device's TVM
runtime and times `main` there with `time_evaluator` (Measurement.method = "rpc").

Where the device is named (target options win over the environment):
  --target-opt tracker=HOST:PORT   $GRAPHOPT_RPC_TRACKER   a `python -m tvm.exec.rpc_tracker`
  --target-opt key=NAME            $GRAPHOPT_RPC_KEY       the key the servers registered under
  --target-opt server=HOST:PORT    $GRAPHOPT_RPC_SERVER    one `python -m tvm.exec.rpc_server`, no tracker
  --target-opt session_timeout=S   seconds a session may last (the server ends it; default 120)
  --target-opt request_timeout=S   seconds to wait for a free device from the tracker (default 60)
  --target-opt priority=N          tracker queue priority (default 1)

Nothing here waits forever: connecting has a timeout, a tracker request has a timeout, and
every remote session runs under a deadline of session_timeout plus a margin. A device that
cannot be reached, a session that times out, or a server that dies mid-measurement raises
TargetUnreachable (exit 4: the driver stops, keeps the run store and writes the report; the
same command resumes). An error the remote *reports* (e.g. the module fails to load) is a
RuntimeError: the candidate fails, the run goes on.

Several servers under one key are one pool: the tracker hands each request to a free one.
Importing this module does not import tvm.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from graphopt.errors import TargetUnreachable, UsageError

OPTION_NAMES = ("tracker", "key", "server", "session_timeout", "request_timeout", "priority")


def rpc_options():
    """The RPC options a TVM target accepts (declared in its OPTIONS table)."""
    from graphopt.plugin import Option

    return (Option("tracker", str, None, "HOST:PORT of a TVM RPC tracker (measure on its devices)"),
            Option("key", str, None, "device key at the tracker"),
            Option("server", str, None, "HOST:PORT of one TVM RPC server (instead of a tracker)"),
            Option("session_timeout", float, 120.0, "seconds one RPC session may last", minimum=0),
            Option("request_timeout", float, 60.0, "seconds to wait for a free device", minimum=0),
            Option("priority", int, 1, "tracker request priority"))
ENV = {"tracker": "GRAPHOPT_RPC_TRACKER", "key": "GRAPHOPT_RPC_KEY", "server": "GRAPHOPT_RPC_SERVER"}
CONNECT_TIMEOUT_S = 10.0
_DEADLINE_MARGIN_S = 30.0  # on top of session_timeout: upload, load and tensor copies

# markers of a lost connection or an ended session in TVM's RPC error texts
_LOST = ("RPCSessionTimeoutError", "session has expired", "connection", "socket", "broken pipe", "reset by peer",
         "Connection", "RPCServer", "closed", "EOF", "errno")


def _parse_addr(text: Any, what: str) -> tuple[str, int]:
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{what}={text!r}: expected HOST:PORT, e.g. {what}=127.0.0.1:9190")
    return host, int(port)


def _positive(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what}={value!r}: expected a number of seconds") from None
    if not v > 0:
        raise UsageError(f"{what}={value!r}: must be positive")
    return v


@dataclass(frozen=True)
class RpcConfig:
    """Where to measure: a tracker (host, port) plus a key, or one server (host, port)."""

    tracker: tuple[str, int] | None = None
    key: str = ""
    server: tuple[str, int] | None = None
    session_timeout: float = 120.0
    request_timeout: float = 60.0
    priority: int = 1

    @classmethod
    def from_options(cls, options: Mapping[str, Any], env: Mapping[str, str] | None = os.environ) -> RpcConfig | None:
        """The RPC settings in target `options` (names in OPTION_NAMES), else in `env`; None if neither
        names a tracker or a server. Raises UsageError for a half-given or malformed setting."""
        env = env or {}
        opts = {k: options[k] for k in OPTION_NAMES if options.get(k) is not None}
        for name, var in ENV.items():
            if name not in opts and env.get(var):
                opts[name] = env[var]
        if "tracker" not in opts and "server" not in opts:
            extra = sorted(set(opts) - {"key"} if "key" in opts else opts)
            if "key" in opts or extra:
                raise UsageError(
                    f"RPC option(s) {sorted(opts)} given without a device: add --target-opt tracker=HOST:PORT "
                    f"(with key=NAME) or --target-opt server=HOST:PORT (or set ${ENV['tracker']})")
            return None
        if "tracker" in opts and "server" in opts:
            raise UsageError("give either --target-opt tracker=HOST:PORT (with key=NAME) or server=HOST:PORT, not both")
        tracker = _parse_addr(opts["tracker"], "tracker") if "tracker" in opts else None
        server = _parse_addr(opts["server"], "server") if "server" in opts else None
        key = str(opts.get("key", "") or "")
        if tracker is not None and not key:
            raise UsageError(f"tracker={tracker[0]}:{tracker[1]} needs the device key: add --target-opt key=NAME "
                             f"(or set ${ENV['key']}); list keys with `python -m tvm.exec.query_rpc_tracker "
                             f"--host {tracker[0]} --port {tracker[1]}`")
        try:
            priority = int(opts.get("priority", 1))
        except (TypeError, ValueError):
            raise UsageError(f"priority={opts.get('priority')!r}: expected an integer") from None
        return cls(tracker=tracker, key=key, server=server,
                   session_timeout=_positive(opts.get("session_timeout", 120.0), "session_timeout"),
                   request_timeout=_positive(opts.get("request_timeout", 60.0), "request_timeout"),
                   priority=priority)

    def where(self) -> str:
        if self.tracker is not None:
            return f"key {self.key!r} at RPC tracker {self.tracker[0]}:{self.tracker[1]}"
        assert self.server is not None
        return f"RPC server {self.server[0]}:{self.server[1]}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tracker"] = f"{self.tracker[0]}:{self.tracker[1]}" if self.tracker else None
        d["server"] = f"{self.server[0]}:{self.server[1]}" if self.server else None
        return d

    def _fix(self) -> str:
        if self.tracker is not None:
            h, p = self.tracker
            return (f"start the tracker (`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {p}`) and a server on "
                    f"the device (`python -m tvm.exec.rpc_server --tracker {h}:{p} --key {self.key}`), and check the "
                    f"key with `python -m tvm.exec.query_rpc_tracker --host {h} --port {p}`")
        h, p = self.server  # type: ignore[misc]
        return f"start `python -m tvm.exec.rpc_server --host 0.0.0.0 --port {p}` on the device {h}"


# ------------------------------------------------------------------------------ the tracker
def tracker_summary(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """The tracker's summary ({"server_info": [...], "queue_info": {key: {free, pending}}}),
    speaking its protocol directly so that every step has a socket timeout (TVM's own client
    retries a refused connection for 60 s). Raises OSError / RuntimeError."""
    magic_tracker, code_summary, code_success = 0x2F271, 6, 0  # tvm.rpc.base.RPC_TRACKER_MAGIC, TrackerCode
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(struct.pack("<i", magic_tracker))
        if struct.unpack("<i", _recvall(s, 4))[0] != magic_tracker:
            raise RuntimeError(f"{host}:{port} is not a TVM RPC tracker")
        data = json.dumps([code_summary]).encode()
        s.sendall(struct.pack("<i", len(data)) + data)
        size = struct.unpack("<i", _recvall(s, 4))[0]
        value = json.loads(_recvall(s, size).decode())
    if value[0] != code_success:
        raise RuntimeError(f"tracker {host}:{port} answered {value!r}")
    return value[1]


def _recvall(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the peer")
        buf += chunk
    return bytes(buf)


def servers_for_key(summary: Mapping[str, Any], key: str) -> int:
    """How many servers the tracker lists under `key` (their keys read "server:KEY")."""
    return sum(1 for item in summary.get("server_info", []) if str(item.get("key", "")).split(":", 1)[-1] == key)


def check_reachable(cfg: RpcConfig, timeout: float = CONNECT_TIMEOUT_S) -> int:
    """Raise TargetUnreachable (naming host:port/key and the fix) unless the device can be
    reached; returns the number of devices (servers under the key; 1 for a direct server)."""
    if cfg.tracker is not None:
        h, p = cfg.tracker
        try:
            summary = tracker_summary(h, p, timeout)
        except (OSError, RuntimeError, ValueError) as e:
            raise TargetUnreachable(f"RPC tracker {h}:{p} is unreachable ({_reason(e)}): {cfg._fix()}") from None
        n = servers_for_key(summary, cfg.key)
        if n == 0:
            keys = sorted({str(i.get("key", "")).split(":", 1)[-1] for i in summary.get("server_info", [])})
            raise TargetUnreachable(
                f"no RPC server is registered under key {cfg.key!r} at tracker {h}:{p} "
                f"(registered keys: {', '.join(keys) or 'none'}): {cfg._fix()}")
        return n
    h, p = cfg.server  # type: ignore[misc]
    try:
        with socket.create_connection((h, p), timeout=timeout):
            pass  # a bare connect is harmless: the server drops a peer that sends no magic
    except OSError as e:
        raise TargetUnreachable(f"RPC server {h}:{p} is unreachable ({_reason(e)}): {cfg._fix()}") from None
    return 1


def _reason(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:200]


# ----------------------------------------------------------------------------- sessions
def connect(cfg: RpcConfig):
    """An RPCSession on a device (tracker request with a timeout, or the direct server)."""
    from graphopt.targets import tvm_common as tc

    tc.load_tvm()
    from tvm import rpc

    check_reachable(cfg)
    timeout = cfg.session_timeout
    if cfg.tracker is None:
        h, p = cfg.server  # type: ignore[misc]
        return rpc.connect(h, p, key=cfg.key, session_timeout=timeout)
    h, p = cfg.tracker
    tracker = rpc.connect_tracker(h, p)  # reachable: checked above, so no 60 s retry loop
    try:
        tracker._sock.settimeout(cfg.request_timeout)  # a request queues until a device is free
        return tracker.request(cfg.key, priority=cfg.priority, session_timeout=timeout, max_retry=1)
    except (RuntimeError, OSError) as e:
        if "timed out" in str(e):
            raise TargetUnreachable(
                f"no device under key {cfg.key!r} at tracker {h}:{p} became free within {cfg.request_timeout:g} s "
                f"(all busy or dead): raise --target-opt request_timeout=SECONDS, or {cfg._fix()}") from None
        raise TargetUnreachable(f"the tracker {h}:{p} could not connect a device under key {cfg.key!r} "
                                f"({_reason(e)}): {cfg._fix()}") from None
    finally:
        tracker.close()


def with_session(cfg: RpcConfig, fn: Callable[[Any], Any], what: str) -> Any:
    """Run fn(session) on a device under a deadline; lost devices become TargetUnreachable.

    The work runs in a daemon thread joined with session_timeout + a margin, so a device that
    vanishes without closing its socket cannot hang the run.
    """
    import time

    box: dict[str, Any] = {}

    def work() -> None:
        try:
            sess = connect(cfg)
            box["t0"] = time.monotonic()
            try:
                box["value"] = fn(sess)
            finally:
                del sess  # closes the session on the server
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=work, name=f"graphopt-rpc-{what}", daemon=True)
    t.start()
    deadline = cfg.session_timeout + _DEADLINE_MARGIN_S
    t.join(deadline)
    if t.is_alive():
        raise TargetUnreachable(f"{what} on {cfg.where()} did not finish within {deadline:g} s (session_timeout "
                                f"{cfg.session_timeout:g} s + {_DEADLINE_MARGIN_S:g} s): the device hangs or the network "
                                f"dropped; check the device, or raise --target-opt session_timeout=SECONDS")
    if "error" in box:
        # the server ends an expired session by killing its worker: the client only sees the
        # connection drop, so judge by the clock as TVM's own request_and_run does
        expired = "t0" in box and time.monotonic() - box["t0"] >= 0.95 * cfg.session_timeout
        raise _classify(box["error"], cfg, what, expired)
    return box.get("value")


def _classify(e: BaseException, cfg: RpcConfig, what: str, expired: bool = False) -> BaseException:
    if isinstance(e, (TargetUnreachable, UsageError, KeyboardInterrupt)):
        return e
    text = str(e)
    first = _reason(e)
    if expired or "RPCSessionTimeoutError" in text or "session has expired" in text:
        return TargetUnreachable(f"{what} on {cfg.where()} ran past session_timeout={cfg.session_timeout:g} s and the "
                                 f"server ended the session: raise --target-opt session_timeout=SECONDS")
    if isinstance(e, OSError) or any(m in text for m in _LOST):
        return TargetUnreachable(f"lost the RPC device during {what} on {cfg.where()} ({first}): the server died or "
                                 f"the network dropped; restart it, then rerun the same command to resume "
                                 f"({cfg._fix()})")
    return RuntimeError(f"{what} on {cfg.where()} failed on the device: {type(e).__name__}: {first}")


def _load_remote(sess, lib_path: Path, device: str):
    from tvm import relax

    lib_path = Path(lib_path)
    sess.upload(str(lib_path))
    rlib = sess.load_module(lib_path.name)
    dev = sess.device(device, 0)
    return relax.VirtualMachine(rlib, dev), dev


def _remote_args(inputs: Sequence[Any], dev) -> list:
    import numpy as np
    import tvm

    return [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs]


def measure_remote(cfg: RpcConfig, lib_path: str | Path, inputs: Sequence[Any], number: int | None = None,
                   repeat: int = 5, warmup: int = 1, device: str = "cpu",
                   min_repeat_ms: float = 20.0, info: dict[str, Any] | None = None,
                   outputs: list | None = None) -> tuple[list[float], int]:
    """Upload `lib_path` (.so, or .tar which the device links itself), load it in a Relax VM on
    the remote `device` and time main: (per-repeat mean milliseconds, runs per repeat).
    `number` None: chosen from the warm-up runs so that a repeat lasts about min_repeat_ms.
    `info`, when given, receives what the device says about itself ("threads").
    `outputs`, when given, receives the outputs of one run before timing (numpy, graph order)."""

    def work(sess):
        if info is not None:
            with contextlib.suppress(Exception):  # best effort
                info["threads"] = int(sess.get_function("runtime.NumThreads")())
        vm, dev = _load_remote(sess, Path(lib_path), device)
        args = _remote_args(inputs, dev)
        if outputs is not None:
            outputs[:] = _remote_to_numpy(sess, vm["main"](*args))
        n = number
        warm = vm.time_evaluator("main", dev, number=1, repeat=max(1, int(warmup)))(*args)
        if n is None:
            t = min(warm.results)
            n = max(1, min(100, int(-(-min_repeat_ms / 1000.0 // max(t, 1e-9)))))
        res = vm.time_evaluator("main", dev, number=int(n), repeat=int(repeat))(*args)
        return [float(r) * 1000.0 for r in res.results], int(n)

    return with_session(cfg, work, "measurement")


def run_remote(cfg: RpcConfig, lib_path: str | Path, inputs: Sequence[Any], device: str = "cpu") -> list:
    """Run main once on the device; outputs as numpy arrays (graph output order)."""

    def work(sess):
        vm, dev = _load_remote(sess, Path(lib_path), device)
        return _remote_to_numpy(sess, vm["main"](*_remote_args(inputs, dev)))

    return with_session(cfg, work, "run")


def _remote_to_numpy(sess, value) -> list:
    """A remote VM's result as numpy arrays: a tensor comes back with .numpy(); a model with
    several outputs returns a tuple, which over RPC is an opaque handle to a remote array: its
    items are fetched through the device's ffi.ArraySize / ffi.ArrayGetItem."""
    from graphopt.targets import tvm_common as tc

    if hasattr(value, "numpy") or isinstance(value, (list, tuple)):
        return tc._to_numpy(value)
    size, get = sess.get_function("ffi.ArraySize"), sess.get_function("ffi.ArrayGetItem")
    out: list = []
    for i in range(int(size(value))):
        out.extend(_remote_to_numpy(sess, get(value, i)))
    return out


# ------------------------------------------------------------------------------ tuning
def ms_runner(cfg: RpcConfig, number: int = 3, repeat: int = 1, min_repeat_ms: int = 20, max_workers: int | None = None):
    """A MetaSchedule RPCRunner measuring tuning trials on the tracker's devices (one worker per
    device by default). MetaSchedule's runner needs a tracker: a direct server is a UsageError."""
    if cfg.tracker is None:
        raise UsageError(f"tuning through RPC needs a tracker (MetaSchedule's RPCRunner requests devices from one); "
                         f"got server={cfg.server[0]}:{cfg.server[1]}: start `python -m tvm.exec.rpc_tracker` and "
                         f"register the server with --tracker HOST:PORT --key NAME")
    devices = check_reachable(cfg)
    from graphopt.targets import tvm_common as tc

    tc.load_tvm()
    import tvm.s_tir.meta_schedule as ms

    rpc_config = ms.runner.RPCConfig(tracker_host=cfg.tracker[0], tracker_port=cfg.tracker[1], tracker_key=cfg.key,
                                     session_priority=cfg.priority, session_timeout_sec=int(cfg.session_timeout))
    evaluator = ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                          enable_cpu_cache_flush=False)
    from .tuning_ms import rpc_alloc_in_bounds  # indices in bounds: a gather's trials can succeed

    return ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator,
                               max_workers=max_workers or max(1, devices), f_alloc_argument=rpc_alloc_in_bounds)
