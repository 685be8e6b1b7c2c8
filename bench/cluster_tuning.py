"""The tuning database lease, for real: two Ray tasks on two worker nodes of a loopback cluster
compile one tiny MatMul model with x86 trials=1 at the same time. The first takes the lease,
tunes the workload into its replica and ships the records to the owner; the second waits for the
lease and then reuses the workload (workloads_reused=1, tuned=0).

    .venv/bin/python bench/cluster_tuning.py /tmp/some-empty-dir

Minutes on a busy 2-core machine (one MetaSchedule trial); see docs/cluster.md for a run.
"""
from pathlib import Path
import json
import logging
import sys
import time
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import numpy as np
import onnx
from onnx import helper, TensorProto, numpy_helper
from ray_cluster import RayCluster
d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
w = numpy_helper.from_array(np.random.rand(16, 16).astype(np.float32), "w")
g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], [w])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
onnx.save(m, d / "mm.onnx")
with RayCluster(workers=2, log_dir=d) as c:
    import ray
    from graphopt.parallel import cluster_pool
    from graphopt.parallel.cluster_pool import TuningDbOwner, _remote_compile
    cluster_pool.connect(c.address)
    master = d / "master"
    owner = ray.remote(num_cpus=0, max_concurrency=8)(TuningDbOwner).remote(str(master), 30.0)
    task = ray.remote(num_cpus=0, resources={"tvm_compiler": 1}, max_retries=0)(_remote_compile)
    key = ("x86", "graphopt.targets.x86:X86Target", tuple(sorted({"threads": 1, "trials": 1}.items())), logging.WARNING)
    data = (d / "mm.onnx").read_bytes()
    t = time.time()
    outs = ray.get([task.remote(key, data, {}, owner, str(master)) for _ in range(2)])
    print("both compiled in", round(time.time() - t, 1), "s")
    for portable, _, files in outs:
        info = portable.info
        print(json.dumps({k: info.get(k) for k in ("tuning", "tuned", "compiled_in")}, default=str)[:600])
    print("owner history", ray.get(owner.history.remote()))
    for p in sorted(master.rglob("database_*.json")):
        print(p.name, len(p.read_text().splitlines()), "lines")
    ray.shutdown()
