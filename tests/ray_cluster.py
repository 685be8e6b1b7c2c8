"""A real Ray cluster on 127.0.0.1 for tests and benches (not a pytest module).

    with RayCluster(workers=2, log_dir=tmp) as c:
        c.address          # "127.0.0.1:PORT" (the GCS), for --cluster
        c.kill_node(1)     # SIGKILL one worker node's whole process group (raylet + its workers)

A head with no CPUs and no `tvm_compiler` (it only schedules), and N worker nodes with
`--num-cpus 1 --resources '{"tvm_compiler": 1}'`. Each `ray start` runs in its own session
(start_new_session=True): the daemons it leaves behind (gcs_server, raylet, agents, the worker
processes the raylet forks) stay in that process group. Leaving the context ends every group
(SIGTERM, then SIGKILL) -- never `ray stop`, which ends every Ray process of this user on the
machine -- and `leftover_processes()` says what would have been left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rpc_cluster import ProcessFixture, free_port, group_members

RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]


class RayCluster(ProcessFixture):
    def __init__(self, workers: int = 2, log_dir: Path | None = None, resources_per_worker: int = 1):
        self.n_workers = workers
        self.per_worker = resources_per_worker
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.port = 0
        self.groups: list[int] = []  # [head, worker 0, worker 1, ...]
        self.temp = ""
        self._forked: list[int] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DISABLE_IMPORT_WARNING="1")
        env.pop("RAY_ADDRESS", None)
        if self.temp:  # the nodes' temp files (a killed node's compile folder) go when stop() removes it
            env["TMPDIR"] = os.path.join(self.temp, "tmp")
            os.makedirs(env["TMPDIR"], exist_ok=True)
        return env

    def _start(self, args: list[str], name: str) -> None:
        out = open(self.log_dir / f"{name}.log", "w") if self.log_dir else subprocess.DEVNULL  # noqa: SIM115
        p = subprocess.Popen([*RAY, "start", *args, "--disable-usage-stats"], stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, env=self._env())
        self.groups.append(p.pid)  # its session id = its process group, kept by the daemons it starts
        rc = p.wait(timeout=120)
        if rc != 0:
            raise RuntimeError(f"ray start ({name}) exited {rc}; see {self.log_dir}")

    def start(self) -> "RayCluster":
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
        self._start(["--head", "--port", str(self.port), "--num-cpus", "0", "--node-ip-address", "127.0.0.1",
                     "--include-dashboard", "false", "--temp-dir", self.temp], "head")
        for i in range(self.n_workers):
            self.add_worker(i)
        return self

    def add_worker(self, i: int | None = None) -> None:
        i = len(self.groups) - 1 if i is None else i
        self._start(["--address", self.address, "--num-cpus", str(self.per_worker), "--node-ip-address", "127.0.0.1",
                     "--resources", json.dumps({"tvm_compiler": self.per_worker})], f"worker{i}")

    def node_of(self, pid: int) -> int | None:
        """Which worker node (index) a process belongs to: the process group of it or of the first
        of its ancestors in one of ours (Ray puts its worker processes in groups of their own)."""
        while pid > 1:
            try:
                pg = os.getpgid(pid)
            except ProcessLookupError:
                return None
            if pg in self.groups:
                i = self.groups.index(pg) - 1
                return i if i >= 0 else None
            pid = _ppid(pid)
        return None

    def kill_node(self, i: int) -> None:
        """SIGKILL worker node i: its process group (the raylet...) and the worker processes it forked."""
        pids = _descendants(group_members(self.groups[1 + i]))
        _kill_group(self.groups[1 + i], signal.SIGKILL)
        for p in pids:
            _kill(p, signal.SIGKILL)

    def stop(self) -> None:
        self._forked = _descendants(self.leftover_processes())
        for pg in reversed(self.groups):
            _kill_group(pg, signal.SIGTERM)
        end = time.monotonic() + 10
        while time.monotonic() < end and self.leftover_processes():
            time.sleep(0.2)
        for pg in self.groups:
            _kill_group(pg, signal.SIGKILL)
        for p in self._forked:
            _kill(p, signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and self.leftover_processes():
            time.sleep(0.1)
        if self.temp:
            shutil.rmtree(self.temp, ignore_errors=True)

    def leftover_processes(self) -> list[int]:
        """Live processes of our groups, and those forked from them into groups of their own."""
        mine = [p for pg in self.groups for p in group_members(pg)]
        return sorted(set(mine) | {p for p in getattr(self, "_forked", []) if _alive(p)})



def _kill_group(pg: int, sig: int) -> None:
    try:
        os.killpg(pg, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return 0
    return int(stat[stat.rfind(")") + 2:].split()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def _descendants(roots: list[int]) -> list[int]:
    """Every live process below `roots` (by parent pid), the roots included."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(int(entry)):
            children.setdefault(_ppid(int(entry)), []).append(int(entry))
    out, todo = set(), list(roots)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(children.get(p, []))
    return sorted(out)
