#!/usr/bin/env python3
"""An emulated Raspberry Pi 4 for the rpi4 target: aarch64 code on a Cortex-A72 model, behind a TVM RPC tracker.

    python3 tests/emulated_pi.py setup            # once: ~1 min, ~600 MB in ~/.cache/graphopt/emulated-pi
    python3 tests/emulated_pi.py start            # tracker 127.0.0.1:9190 + one emulated Pi under key rpi4
    graphopt run model.onnx --target rpi4 --target-opt tracker=127.0.0.1:9190 --target-opt key=rpi4 \
        --target-opt estimate=1                   # cost model ranks, the emulated Pi checks each output
    python3 tests/emulated_pi.py sh 'TVM_NUM_THREADS=4 TVM_USE_RUNTIME_LIB=1 python3 run_on_pi.py'  # as on a Pi
    python3 tests/emulated_pi.py stop

What `setup` installs, from the package registries only (idempotent; a stamp file records what
was installed, so a second call returns at once):
  - `qemu-user-static` (Debian apt; installed with apt-get when missing and running as root);
  - Debian bookworm's arm64 python3.11 and g++-12 (the `gcc` a Pi user installs to load a
    model.tar), with their library dependencies: `apt-get download` through a private apt
    configuration under the cache (the host's dpkg architectures and apt lists are untouched),
    unpacked with `dpkg-deb -x` into a sysroot;
  - the manylinux aarch64 wheels of apache-tvm 0.27.0.post1 (the runtime only: its 240 MB
    compiler library is not unpacked; TVM_USE_RUNTIME_LIB=1), apache-tvm-ffi, numpy, tornado,
    psutil, cloudpickle, ml_dtypes and typing_extensions: `pip download --platform`, unpacked
    into the sysroot's /usr/local/lib/python3.11/dist-packages.

How it runs: `qemu-aarch64-static -cpu cortex-a72 -L SYSROOT` (user-mode emulation: the
Cortex-A72's instruction set, NEON and no later extensions; an instruction the A72 lacks is
SIGILL). There is no binfmt_misc registration (none is needed, none is made): the emulated
`python3`, `g++`, `collect2` and `ld` are host shell scripts in CACHE/bin that exec QEMU, and
the emulated Python's sys.executable is its script, so TVM's RPC server can spawn its workers.
The RPC server is launched through CACHE/.../graphopt_emulated_pi.py, which registers
`graphopt.emulated` on the device: the rpi4 target asks for it and never reports an emulator's
timings as a Pi's latency.

Every process runs in its own process group; `stop` (or leaving EmulatedPi's context) ends the
groups (SIGTERM, then SIGKILL) with their TVM popen_worker children. Timings under QEMU are
those of an x86 host translating aarch64 code: they are not Raspberry Pi latencies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from rpc_cluster import ProcessFixture, free_port, group_members  # noqa: E402

CACHE = Path(os.environ.get("GRAPHOPT_EMULATED_PI", "~/.cache/graphopt/emulated-pi")).expanduser()
SUITE = "bookworm"  # Debian 12: python3.11, glibc 2.36 (Raspberry Pi OS 12 is bookworm too)
PYTHON = "python3.11"
CPU = "cortex-a72"
KEY = "rpi4"
QEMU = "qemu-aarch64-static"
# what the Pi needs: the interpreter, its standard library, the C++ runtime TVM links, and g++
# (a model.tar is linked by the Pi's g++ when TVM loads it)
ROOT_PACKAGES = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgomp1", "g++-12"]
# in the dependency closure but never run here: package tools, perl, the sanitizer runtimes
EXCLUDE = {"dpkg", "install-info", "tar", "perl", "perl-base", "perl-modules-5.36", "libperl5.36",
           "libgdbm-compat4", "mailcap", "mime-support", "debconf", "libasan8", "liblsan0", "libtsan2",
           "libubsan1", "libhwasan0", "libgprofng0"}
WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy==2.4.6", "tornado==6.6.1",
          "psutil==7.2.2", "cloudpickle==3.1.3", "ml_dtypes==0.6.0", "typing_extensions==4.16.0"]
SKIP_IN_WHEELS = ("tvm/lib/libtvm_compiler.so",)  # the runtime alone runs a compiled model
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = os.environ.get("GRAPHOPT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY = os.environ.get("GRAPHOPT_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
VERSION = 1  # bump when the layout changes: setup then rebuilds


class SetupError(RuntimeError):
    """The emulated Pi cannot be set up here (no apt, no qemu, no network): the message says why."""


def _say(msg: str) -> None:
    print(f"[emulated-pi] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise SetupError(f"{what} failed ({r.returncode}): {' | '.join(tail)}")
    return r


def config_id() -> str:
    text = json.dumps([VERSION, SUITE, ROOT_PACKAGES, sorted(EXCLUDE), WHEELS, SKIP_IN_WHEELS, CPU])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def paths(cache: Path = CACHE) -> dict[str, Path]:
    return {"sysroot": cache / "sysroot", "bin": cache / "bin", "stamp": cache / "ready.json",
            "state": cache / "running.json", "logs": cache / "logs"}


def is_ready(cache: Path = CACHE) -> bool:
    p = paths(cache)
    try:
        stamp = json.loads(p["stamp"].read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("config") == config_id() and (p["bin"] / "python3").exists() and shutil.which(QEMU) is not None


# ------------------------------------------------------------------------------- set-up
def ensure_qemu() -> str:
    q = shutil.which(QEMU)
    if q:
        return q
    if shutil.which("apt-get") is None:
        raise SetupError(f"{QEMU} is not installed and there is no apt-get: install QEMU user-mode emulation "
                         f"(Debian/Ubuntu package qemu-user-static)")
    if os.geteuid() != 0:
        raise SetupError(f"{QEMU} is not installed: run `sudo apt-get install qemu-user-static` (or this set-up as root)")
    _say("apt-get install qemu-user-static")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-user-static"],
         "apt-get install qemu-user-static", env=env)
    q = shutil.which(QEMU)
    if not q:
        raise SetupError(f"apt-get installed qemu-user-static but {QEMU} is not on PATH")
    return q


def _apt_options(apt: Path) -> list[str]:
    """apt-get/apt-cache options for a private arm64 view of Debian bookworm under `apt`."""
    for d in ("lists/partial", "cache/archives/partial", "etc/apt.conf.d", "etc/preferences.d"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    src = apt / "sources.list"
    opts = f"[arch=arm64 signed-by={KEYRING}]"
    src.write_text(f"deb {opts} {MIRROR} {SUITE} main\ndeb {opts} {MIRROR} {SUITE}-updates main\n"
                   f"deb {opts} {SECURITY} {SUITE}-security main\n")
    (apt / "status").touch()
    return ["-o", f"Dir::Etc::SourceList={src}", "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", f"Dir::Etc::Parts={apt}/etc/apt.conf.d", "-o", f"Dir::Etc::PreferencesParts={apt}/etc/preferences.d",
            "-o", f"Dir::State={apt}", "-o", f"Dir::State::Lists={apt}/lists", "-o", f"Dir::State::status={apt}/status",
            "-o", f"Dir::Cache={apt}/cache", "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
            "-o", "Debug::NoLocking=1", *(["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else [])]


def _closure(opts: list[str]) -> list[str]:
    r = _run(["apt-cache", *opts, "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
              "--no-breaks", "--no-replaces", "--no-enhances", *ROOT_PACKAGES], "apt-cache depends")
    names = {ln.strip() for ln in r.stdout.splitlines() if ln and not ln.startswith(" ") and not ln.startswith("<")}
    return sorted(n.split(":")[0] for n in names if n.split(":")[0] not in EXCLUDE)


def _debs(work: Path, sysroot: Path) -> list[str]:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SetupError("the emulated Pi's Python comes from Debian's arm64 packages: needs apt-get and dpkg-deb "
                         "(a Debian or Ubuntu host)")
    if not Path(KEYRING).exists():
        raise SetupError(f"{KEYRING} is missing: apt-get install debian-archive-keyring")
    opts = _apt_options(work / "apt")
    _say(f"apt-get update (a private arm64 view of Debian {SUITE})")
    _run(["apt-get", *opts, "update", "-qq"], "apt-get update (arm64)")
    pkgs = _closure(opts)
    debs = work / "debs"
    debs.mkdir(exist_ok=True)
    _say(f"apt-get download: {len(pkgs)} arm64 packages")
    _run(["apt-get", *opts, "download", *pkgs], "apt-get download", cwd=debs)
    for f in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(f), str(sysroot)], f"dpkg-deb -x {f.name}")
    return pkgs


def _wheels(work: Path, site: Path) -> list[str]:
    wheels = work / "wheels"
    wheels.mkdir(exist_ok=True)
    _say(f"pip download: {len(WHEELS)} manylinux aarch64 wheels")
    plat = []
    for p in ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"):
        plat += ["--platform", p]
    _run([sys.executable, "-m", "pip", "download", "-q", "--dest", str(wheels), *plat, "--python-version", "3.11",
          "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none", "--only-binary=:all:",
          "--no-deps", *WHEELS], "pip download (aarch64 wheels)")
    got = sorted(wheels.glob("*.whl"))
    site.mkdir(parents=True, exist_ok=True)
    for w in got:
        with zipfile.ZipFile(w) as z:
            z.extractall(site, [n for n in z.namelist() if n not in SKIP_IN_WHEELS])
    return [w.name for w in got]


LAUNCHER = '''\
"""The emulated Pi's RPC server (written by tests/emulated_pi.py): TVM's rpc_server, plus a
global function `graphopt.emulated` that tells a client this device is an emulator."""
import argparse
import time

EMULATED = "QEMU user-mode emulation of a Cortex-A72: {qemu} -cpu {cpu} on a {host} host"


def init():
    import tvm_ffi
    tvm_ffi.register_global_func("graphopt.emulated", lambda: EMULATED, override=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--port-end", type=int, default=9199)
    ap.add_argument("--tracker", required=True)
    ap.add_argument("--key", default="{key}")
    a = ap.parse_args()
    from tvm import rpc

    from graphopt_emulated_pi import init as by_name  # pickled by reference for TVM's popen worker

    host, port = a.tracker.rsplit(":", 1)
    server = rpc.Server(a.host, a.port, a.port_end, key=a.key, tracker_addr=(host, int(port)),
                        server_init_callback=by_name)
    print("emulated Pi RPC server on port %d, key %s" % (server.port, a.key), flush=True)
    while True:
        time.sleep(3600)
'''


def _wrappers(bindir: Path, sysroot: Path, qemu: str) -> None:
    """Host shell scripts that run the sysroot's aarch64 programs under QEMU (no binfmt_misc)."""
    bindir.mkdir(parents=True, exist_ok=True)
    run = f'exec {qemu} -cpu {CPU} -L "{sysroot}"'
    gcc_lib = f"/usr/lib/gcc/aarch64-linux-gnu/12"
    scripts = {
        # argv[0] (-0) is this script, so sys.executable re-enters QEMU when Python spawns itself
        "python3": f'{run} -0 "$0" "{sysroot}/usr/bin/{PYTHON}" "$@"',
        # the Pi's g++ (what TVM runs to link a model.tar): every program it spawns is a script here
        "g++": f'{run} "{sysroot}/usr/bin/aarch64-linux-gnu-g++-12" -B "{bindir}/" "$@"',
        "gcc": f'{run} "{sysroot}/usr/bin/aarch64-linux-gnu-gcc-12" -B "{bindir}/" "$@"',
        "collect2": f'{run} "{sysroot}{gcc_lib}/collect2" "$@"',
        "ld": f'{run} "{sysroot}/usr/bin/aarch64-linux-gnu-ld.bfd" "$@"',
        "as": f'{run} "{sysroot}/usr/bin/aarch64-linux-gnu-as" "$@"',
    }
    for name, body in scripts.items():
        p = bindir / name
        p.write_text(f"#!/bin/sh\n# written by tests/emulated_pi.py: {name} of the emulated Raspberry Pi\n{body}\n")
        p.chmod(0o755)
    for name in ("python", PYTHON, "c++"):
        link = bindir / name
        if not link.exists():
            link.symlink_to("python3" if name.startswith("python") else "g++")


def setup(cache: Path = CACHE, force: bool = False) -> dict:
    """Install the emulated Pi under `cache` (idempotent; one set-up at a time: a file lock);
    returns the stamp (what was installed, how long it took)."""
    import fcntl

    p = paths(cache)
    if not force and is_ready(cache):
        return json.loads(p["stamp"].read_text())
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".setup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be setting up: wait for it
        if not force and is_ready(cache):
            return json.loads(p["stamp"].read_text())
        return _setup(cache, p)


def _setup(cache: Path, p: dict[str, Path]) -> dict:
    t0 = time.monotonic()
    qemu = ensure_qemu()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="setup-", dir=cache))
    try:
        sysroot = work / "sysroot"
        sysroot.mkdir()
        pkgs = _debs(work, sysroot)
        site = sysroot / "usr/local/lib/python3.11/dist-packages"
        wheels = _wheels(work, site)
        # the emulated Python must not see the host's (x86) dist-packages through QEMU's -L fallback
        (sysroot / "usr/lib/python3/dist-packages").mkdir(parents=True, exist_ok=True)
        # into place: the sysroot path is baked into the wrapper scripts
        for old in (p["sysroot"], p["bin"]):
            if old.exists():
                shutil.rmtree(old)
        os.replace(sysroot, p["sysroot"])
        _wrappers(p["bin"], p["sysroot"], qemu)
        _say("smoke test: import tvm.runtime under the emulated Cortex-A72")
        r = subprocess.run([str(p["bin"] / "python3"), "-c", "import platform, tvm.runtime.vm, numpy; "
                            "print(platform.machine(), numpy.__version__)"], capture_output=True, text=True,
                           env=emulated_env(cache), timeout=300)
        if r.returncode != 0 or not r.stdout.startswith("aarch64"):
            raise SetupError(f"the emulated Python cannot import the TVM runtime: {(r.stderr or r.stdout).strip()[-400:]}")
        stamp = {"config": config_id(), "qemu": _run([qemu, "--version"], "qemu --version").stdout.splitlines()[0],
                 "cpu": CPU, "debian": SUITE, "packages": pkgs, "wheels": wheels,
                 "setup_s": round(time.monotonic() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        tmp = p["stamp"].with_suffix(".tmp")
        tmp.write_text(json.dumps(stamp, indent=1))
        os.replace(tmp, p["stamp"])
        _say(f"ready in {stamp['setup_s']} s: {cache}")
        return stamp
    finally:
        shutil.rmtree(work, ignore_errors=True)


def emulated_env(cache: Path = CACHE, threads: int | None = None) -> dict[str, str]:
    """Environment of an emulated process: the Pi's PATH (its python3, g++) and runtime-only TVM."""
    p = paths(cache)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LD_", "CC", "CXX"))}
    env.update(PATH=f"{p['bin']}:{env.get('PATH', '/usr/bin:/bin')}", TVM_USE_RUNTIME_LIB="1",
               QEMU_CPU=CPU, QEMU_LD_PREFIX=str(p["sysroot"]), PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1")
    if threads is not None:
        env["TVM_NUM_THREADS"] = str(threads)
    return env


def python(args: list[str], cache: Path = CACHE, threads: int | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the emulated Pi's python3 with `args` (as `python3 ARGS` on a Pi)."""
    return subprocess.run([str(paths(cache)["bin"] / "python3"), *args], env=emulated_env(cache, threads), **kw)


# ---------------------------------------------------------------------------- the device
def _tracker_summary(port: int) -> dict | None:
    sys.path.insert(0, str(ROOT))
    from graphopt.targets.rpc import tracker_summary

    try:
        return tracker_summary("127.0.0.1", port, timeout=2.0)
    except Exception:  # noqa: BLE001 - not up yet
        return None


def _registered(port: int, key: str) -> int:
    s = _tracker_summary(port) or {}
    return sum(1 for i in s.get("server_info", []) if str(i.get("key", "")).split(":", 1)[-1] == key)


def _end_group(pgid: int, grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + grace
        while time.monotonic() < end and group_members(pgid):
            time.sleep(0.1)
        if not group_members(pgid):
            return


class EmulatedPi(ProcessFixture):
    """A TVM RPC tracker on 127.0.0.1 (started here unless `tracker` is given) and `servers`
    emulated Pis registered under `key`. A context manager; stop() ends every process group."""

    def __init__(self, tracker: str | None = None, key: str = KEY, servers: int = 1, threads: int = 4,
                 cache: Path = CACHE, tracker_port: int | None = None):
        self.key, self.n_servers, self.threads, self.cache = key, servers, threads, Path(cache)
        self.own_tracker = tracker is None
        self.tracker_port = int(tracker.rsplit(":", 1)[1]) if tracker else (tracker_port or free_port())
        self.procs: list[subprocess.Popen] = []
        self.pgids: list[int] = []

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.tracker_port}"

    def _spawn(self, cmd: list[str], env: dict, name: str) -> subprocess.Popen:
        logs = paths(self.cache)["logs"]
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "wb") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 cwd=tempfile.gettempdir(), start_new_session=True)
        self.procs.append(p)
        self.pgids.append(p.pid)  # start_new_session: the pgid is the pid
        return p

    def start(self, timeout: float = 300.0) -> EmulatedPi:
        if not is_ready(self.cache):
            raise SetupError(f"the emulated Pi is not set up in {self.cache}: run `python3 tests/emulated_pi.py setup`")
        site = paths(self.cache)["sysroot"] / "usr/local/lib/python3.11/dist-packages"
        (site / "graphopt_emulated_pi.py").write_text(LAUNCHER.format(qemu=QEMU, cpu=CPU, key=KEY,
                                                                       host=platform.machine()))
        if self.own_tracker:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self._spawn([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                         str(self.tracker_port), "--port-end", str(self.tracker_port + 1)], env, "tracker")
            self._wait(lambda: _tracker_summary(self.tracker_port) is not None, 60, "the RPC tracker")
        for i in range(self.n_servers):
            port = free_port()
            self._spawn([str(paths(self.cache)["bin"] / "python3"), "-m", "graphopt_emulated_pi", "--host", "127.0.0.1",
                         "--port", str(port), "--port-end", str(port + 1), "--tracker", self.tracker, "--key", self.key],
                        emulated_env(self.cache, self.threads), f"server{i}")
            self._wait(lambda n=i + 1: _registered(self.tracker_port, self.key) >= n, timeout,
                       f"emulated Pi {i} to register under key {self.key!r}")
        return self

    def _wait(self, cond, seconds: float, what: str) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if cond():
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0].args[:3]} exited with {dead[0].returncode} while waiting for {what}; "
                                   f"see {paths(self.cache)['logs']}")
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {seconds:g} s waiting for {what}; see {paths(self.cache)['logs']}")

    def stop(self) -> None:
        for pgid in reversed(self.pgids):  # the servers first, then the tracker
            _end_group(pgid)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def leftover_processes(self) -> list[int]:
        return [pid for g in self.pgids for pid in group_members(g)]



# ----------------------------------------------------------------------------------- CLI
def _state_path(cache: Path) -> Path:
    return paths(cache)["state"]


def cmd_start(a) -> int:
    state = _state_path(a.cache)
    if state.exists():
        s = json.loads(state.read_text())
        if any(group_members(g) for g in s["pgids"]):
            print(f"already running: tracker {s['tracker']} key {s['key']} (stop it with `{sys.argv[0]} stop`)")
            return 0
    setup(a.cache)
    dev = EmulatedPi(tracker=a.tracker, key=a.key, servers=a.servers, threads=a.threads, cache=a.cache,
                     tracker_port=a.port)
    t0 = time.monotonic()
    dev.start()
    state.write_text(json.dumps({"tracker": dev.tracker, "key": dev.key, "pgids": dev.pgids,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}))
    print(f"emulated Pi up in {time.monotonic() - t0:.1f} s: tracker {dev.tracker}, key {dev.key}, "
          f"{a.servers} server(s), TVM_NUM_THREADS={a.threads}")
    print(f"  graphopt run MODEL.onnx --target rpi4 --target-opt tracker={dev.tracker} --target-opt key={dev.key} "
          f"--target-opt estimate=1")
    print(f"  stop: python3 {Path(sys.argv[0]).as_posix()} stop")
    return 0


def cmd_stop(a) -> int:
    state = _state_path(a.cache)
    if not state.exists():
        print("not running")
        return 0
    s = json.loads(state.read_text())
    for g in reversed(s["pgids"]):
        _end_group(int(g))
    left = [pid for g in s["pgids"] for pid in group_members(int(g))]
    state.unlink()
    print("stopped" if not left else f"stopped, but processes {left} remain")
    return 0 if not left else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE, help=f"where it is installed (default {CACHE}; "
                    "$GRAPHOPT_EMULATED_PI)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="install qemu-user-static, an arm64 Python with the TVM runtime and g++")
    s.add_argument("--force", action="store_true", help="reinstall even when the stamp says it is ready")
    s = sub.add_parser("start", help="start a tracker and emulated Pi(s) in the background")
    s.add_argument("--tracker", help="register with this HOST:PORT tracker instead of starting one")
    s.add_argument("--port", type=int, default=9190, help="port of the tracker started here (default 9190)")
    s.add_argument("--key", default=KEY)
    s.add_argument("--servers", type=int, default=1)
    s.add_argument("--threads", type=int, default=4, help="TVM_NUM_THREADS on the emulated Pi (default 4)")
    sub.add_parser("stop", help="end every process `start` started")
    sub.add_parser("python", help="run the emulated Pi's python3 with the remaining arguments",
                   add_help=False)
    s = sub.add_parser("sh", help="run a shell command as on the Pi (its PATH: python3, g++), e.g. "
                       "sh 'TVM_NUM_THREADS=4 TVM_USE_RUNTIME_LIB=1 python3 run_on_pi.py'")
    s.add_argument("command")
    a, rest = ap.parse_known_args(argv)
    try:
        if a.cmd == "setup":
            print(json.dumps(setup(a.cache, force=a.force), indent=1))
            return 0
        if a.cmd == "start":
            return cmd_start(a)
        if a.cmd == "stop":
            return cmd_stop(a)
        if a.cmd == "python":
            setup(a.cache)
            return python(rest, a.cache).returncode
        if a.cmd == "sh":
            setup(a.cache)
            return subprocess.run(["sh", "-c", a.command], env=emulated_env(a.cache)).returncode
    except SetupError as e:
        print(f"emulated_pi: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
