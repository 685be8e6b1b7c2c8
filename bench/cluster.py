"""Candidates per hour: compiles on a loopback Ray cluster (--cluster, 1/2/4 worker nodes) against
today's local --compile-workers (1 = in the search's process, 2 and 4 spawned processes).

    .venv/bin/python bench/cluster.py [--compile-s 2.0] [--budget 12] [--x86]

Default workload: the test target `slowcompile` (tests/test_compile_workers.py), whose compile
sleeps --compile-s seconds and whose "measurement" takes 0.05 s, on a 4-block conv-bn model
(16 candidates). A sleeping compile uses no CPU, so this measures how many compiles the
scheduler keeps in flight and what each hand-over costs (Ray task + shipping the ONNX and the
files back vs a spawned process), not the compiler: on a machine with few cores, real compiles
in parallel are bounded by the cores. --x86 adds the x86 target, untuned (CPU-bound compiles),
measured over a loopback tracker with 2 RPC servers, with 1 and 2 workers of each kind.

Every number is wall time of one optimize() call (load, the original's compile in the search
process, the candidates) and candidates/hour = new candidates / that time x 3600; each row also
prints its ratio to the local --compile-workers 1 row measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


from graphopt.targets.host import cpu_summary as cpu_model  # noqa: E402 (name, SIMD flags)


def one(tmp: Path, name: str, target: str, opts: dict, budget: int, jobs: int, **kw) -> dict:
    from graphopt import optimize

    out = tmp / name
    t = time.monotonic()
    res = optimize(tmp / "m.onnx", target, budget=budget, jobs=jobs, search_exact=True, out=out,
                   target_options=opts, **kw)
    wall = time.monotonic() - t
    new = [r for r in res.records if r.genotype]
    ok = sum(r.status == "ok" for r in new)
    return {"name": name, "wall_s": wall, "candidates": len(new), "ok": ok, "per_hour": len(new) / wall * 3600}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-s", type=float, default=2.0)
    ap.add_argument("--budget", type=int, default=12)
    ap.add_argument("--x86", action="store_true")
    args = ap.parse_args()

    import onnx
    from conftest import conv_bn_model
    from ray_cluster import RayCluster
    from test_compile_workers import SlowCompile

    from graphopt.registry import TARGETS

    TARGETS.register("slowcompile", SlowCompile)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    (tmp / "log").mkdir()
    onnx.save(conv_bn_model(blocks=4), tmp / "m.onnx")
    fake = {"log_dir": str(tmp / "log"), "sleep_s": args.compile_s, "main_pid": os.getpid()}
    rows = []
    t0 = time.monotonic()
    for m in (1, 2, 4):
        rows.append(one(tmp, f"local --compile-workers {m}", "slowcompile", fake, args.budget, 4, compile_workers=m))
    with RayCluster(workers=1, log_dir=tmp / "ray") as c:
        for n in (1, 2, 4):
            while len(c.groups) - 1 < n:
                c.add_worker()
            rows.append(one(tmp, f"--cluster, {n} worker node(s)", "slowcompile", fake, args.budget, 4,
                            cluster=c.address))
        if args.x86:
            from rpc_cluster import RpcCluster

            with RpcCluster(servers=2, key="pool", log_dir=tmp / "rpc") as rpc:
                x = {"threads": 1, "trials": 0, "tracker": rpc.tracker, "key": "pool", "repeat": 5}
                base = one(tmp, "x86 local --compile-workers 1", "x86", x, 6, 2, compile_workers=1)
                rows.append(base)
                rows.append(one(tmp, "x86 local --compile-workers 2", "x86", x, 6, 2, compile_workers=2))
                # 4 worker nodes are up; --compile-workers caps the compiles in flight
                rows.append(one(tmp, "x86 --cluster, 2 in flight", "x86", x, 6, 2, cluster=c.address,
                                compile_workers=2))
    base = rows[0]["per_hour"]
    print(f"# bench/cluster.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, CPU: {cpu_model()}, "
          f"{os.cpu_count()} cores (shared); fake compile {args.compile_s} s, {args.budget} candidates, --jobs 4; "
          f"bench wall {time.monotonic() - t0:.0f} s")
    print(f"{'run':40s} {'wall s':>8s} {'cands':>6s} {'ok':>4s} {'cand/hour':>10s} {'vs local 1':>10s}")
    for r in rows:
        ref = base if not r["name"].startswith("x86") else next(x["per_hour"] for x in rows
                                                                 if x["name"] == "x86 local --compile-workers 1")
        print(f"{r['name']:40s} {r['wall_s']:8.1f} {r['candidates']:6d} {r['ok']:4d} {r['per_hour']:10.0f} "
              f"{r['per_hour'] / ref:9.2f}x")


if __name__ == "__main__":
    main()
