"""A real TVM RPC tracker and servers on 127.0.0.1, for tests (not a pytest module).

    with RpcCluster(servers=1, key="local") as c:
        c.tracker  # "127.0.0.1:PORT"
        c.kill_server(0)                  # SIGKILL one server's whole process group
        c.start_server()                  # register another one under the same key

Each process (`python -m tvm.exec.rpc_tracker`, `python -m tvm.exec.rpc_server`) runs in its
own process group (start_new_session=True): TVM's tracker and server each spawn
`tvm.exec.popen_worker` children (~400 MB each) that outlive a plain kill of their parent.
Leaving the context ends every group (SIGTERM, then SIGKILL) and waits for it, so nothing is
left behind; `leftover_processes()` says what would have been.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        state, pg = fields[0], int(fields[2])
        if pg == pgid and state != "Z":
            out.append(int(entry))
    return out


class ProcessFixture:
    """`with Fixture(...) as f:` starts it and always stops it, even when start() fails half-way
    (a subclass defines start() -> self and stop())."""

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class RpcCluster(ProcessFixture):
    def __init__(self, servers: int = 1, key: str = "local", threads: int = 1, log_dir: Path | None = None):
        self.key = key
        self.threads = threads
        self.n_servers = servers
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.tracker_port = 0
        self.tracker_proc: subprocess.Popen | None = None
        self.servers: list[subprocess.Popen] = []
        self.all_pgids: list[int] = []
        self.temp: str | None = None

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.tracker_port}"

    # ------------------------------------------------------------------------- processes
    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        if self.temp is None:  # the servers' upload folders (a SIGTERM'd server keeps its model.so)
            self.temp = tempfile.mkdtemp(prefix="graphopt-rpc-cluster-")
        env = dict(os.environ, TVM_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1", TMPDIR=self.temp)
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([sys.executable, "-m", *args], stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        if out is not subprocess.DEVNULL:
            out.close()
        self.all_pgids.append(p.pid)  # start_new_session: pgid == pid
        return p

    def start(self) -> RpcCluster:
        self.tracker_port = free_port()
        self.tracker_proc = self._spawn(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                         str(self.tracker_port), "--port-end", str(self.tracker_port + 1)],
                                        "tracker")
        self._wait(lambda: self._tracker_summary() is not None, 60, "the RPC tracker to listen")
        for _ in range(self.n_servers):
            self.start_server()
        return self

    def start_server(self) -> subprocess.Popen:
        port = free_port()
        p = self._spawn(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end",
                         str(port + 1), "--tracker", self.tracker, "--key", self.key],
                        f"server{len(self.servers)}")
        self.servers.append(p)
        want = sum(1 for s in self.servers if s.poll() is None)
        self._wait(lambda: self.registered() >= want, 60, f"{want} RPC server(s) to register under {self.key!r}")
        return p

    def _tracker_summary(self) -> dict | None:
        from graphopt.targets.rpc import tracker_summary

        try:
            return tracker_summary("127.0.0.1", self.tracker_port, timeout=2.0)
        except Exception:  # noqa: BLE001 - not up yet
            return None

    def registered(self) -> int:
        """Servers the tracker lists under our key."""
        s = self._tracker_summary() or {}
        return sum(1 for item in s.get("server_info", []) if item.get("key", "").split(":")[-1] == self.key
                   or item.get("key") == f"server:{self.key}")

    def _wait(self, cond, seconds: float, what: str) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if cond():
                return
            for p in [self.tracker_proc, *self.servers]:
                if p is not None and p.poll() is not None and p.returncode not in (0, None) and p in self.servers[-1:]:
                    raise RuntimeError(f"RPC process exited with {p.returncode} while waiting for {what}")
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {seconds}s waiting for {what}")

    @staticmethod
    def _end_group(p: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        pgid = p.pid
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(pgid, s)
            except ProcessLookupError:
                pass
            end = time.monotonic() + grace
            while time.monotonic() < end and group_members(pgid):
                try:
                    p.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            if not group_members(pgid):
                break
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass

    def kill_server(self, i: int = 0) -> None:
        """SIGKILL server i and its children at once (a device that dies)."""
        self._end_group(self.servers[i], signal.SIGKILL)

    def stop(self) -> None:
        for p in self.servers:
            self._end_group(p)
        if self.tracker_proc is not None:
            self._end_group(self.tracker_proc)
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None

    def leftover_processes(self) -> list[int]:
        return [pid for g in self.all_pgids for pid in group_members(g)]

