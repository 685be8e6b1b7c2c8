"""The end of a run on a compiler target that times on this host's CPU: did compiling pay?

A user picks graphopt's TVM targets only if what they build is faster than onnxruntime, the
runtime they would deploy without them. So after the confirmation, a run on such a target (one
whose `ort_comparable` is true: x86 timed in-process, not over RPC) times onnxruntime on this
host, with the target's thread count, on the kept graph and on the original, alternating with the
target's build of the kept graph for the same number of rounds as the confirmation, on the same
select samples. report.json's "ort_reference" holds the medians and two ratios:

  same_graph  = onnxruntime(kept graph) / target(kept graph): > 1, the compiler beat the runtime
                on the very graph it was given;
  vs_original = onnxruntime(original) / target(kept graph): the whole gain over deploying the
                original model with onnxruntime, graph moves and compiler together.

A verdict names the faster way to deploy. `--no-ort-reference` turns it off; a failure here is a
warning and leaves the run's result as it is.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("graphopt")


def applies(search: Any) -> bool:
    """True when this run should time onnxruntime next to its target (see the module docstring)."""
    return bool(getattr(search.cfg, "ort_reference", True) and getattr(search.target, "ort_comparable", False))


def ort_reference(search: Any, chosen: Any) -> dict[str, Any] | None:
    """The "ort_reference" block for the kept record `chosen` (graphopt.conclude), or None."""
    if chosen is None or search.baseline is None or chosen.status != "ok" or not applies(search):
        return None
    import onnxruntime

    from graphopt.targets.ort import OrtTarget

    from ..timing import measure_feeds

    t0 = time.monotonic()
    target = search.target
    threads = int(getattr(target, "threads", 0) or 0) or None
    ort = OrtTarget(threads=threads)
    work = Path(tempfile.mkdtemp(prefix="ortref-", dir=search.workdir))
    mine = search.artifact_for(chosen)
    rounds = max(1, int(search.cfg.confirm_rounds))
    feeds, dep = search.timing_feeds, search.value_dependent
    t_mine, t_kept, t_orig = [], [], []
    try:
        ort_kept = ort.compile(search.model_for(chosen), work / "kept")
        ort_orig = ort_kept if not chosen.genotype else \
            ort.compile(search.model_for(search.baseline, keep=False), work / "orig")  # the kept graph stays held
        for _ in range(rounds):  # interleaved: the host's drift reaches all three alike
            t_mine.append(measure_feeds(target, mine, feeds, dep).latency.median_ms)
            t_kept.append(measure_feeds(ort, ort_kept, feeds, dep).latency.median_ms)
            if ort_orig is not ort_kept:
                t_orig.append(measure_feeds(ort, ort_orig, feeds, dep).latency.median_ms)
    finally:
        ort.close()
    mine_ms, kept_ms = statistics.median(t_mine), statistics.median(t_kept)
    orig_ms = statistics.median(t_orig) if t_orig else kept_ms
    block = {
        "runtime": f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider, ORT_ENABLE_ALL)",
        "threads": ort.threads, "rounds": rounds, "candidate_id": chosen.id, "is_original": not chosen.genotype,
        "target_ms": mine_ms, "ort_kept_ms": kept_ms, "ort_original_ms": orig_ms,
        "same_graph": kept_ms / mine_ms, "vs_original": orig_ms / mine_ms,
        "target_rounds_ms": t_mine, "ort_kept_rounds_ms": t_kept, "ort_original_rounds_ms": t_orig or t_kept,
        "how": (f"{target.name}'s build of the kept graph and onnxruntime on the kept graph and the original, "
                f"measured alternately on the same select samples, median of {rounds} rounds"),
        "seconds": round(time.monotonic() - t0, 3),
    }
    block["verdict"] = verdict(target.name, block, tuned=search_tuned(mine))
    log.info("ort reference: %s", block["verdict"])
    return block


def search_tuned(artifact: Any) -> bool | None:
    return (getattr(artifact, "info", None) or {}).get("tuned")


def verdict(name: str, b: dict[str, Any], tuned: bool | None = None) -> str:
    """One sentence: which way of deploying the kept graph is faster on this host, and by how much."""
    same, whole = b["same_graph"], b["vs_original"]
    graph = "the original" if b["is_original"] else "the kept graph"
    if same >= 1.0:
        s = f"{name} is x{same:.2f} as fast as onnxruntime on {graph}"
    else:
        s = (f"onnxruntime is x{1 / same:.2f} as fast as {name} on {graph}: deploy best.onnx with onnxruntime"
             + (", or tune (--target-opt tune_time=20m; this build is untuned)" if tuned is False else
                ", or tune longer (--target-opt tune_time=20m)"))
    if not b["is_original"]:
        s += f"; {name}'s kept graph against onnxruntime on the original: x{whole:.2f}"
    return s


def summary_line(rep: dict[str, Any]) -> str | None:
    """The CLI summary's line for report["ort_reference"], if there is one."""
    b = rep.get("ort_reference")
    if not b:
        return None
    orig = "" if b["is_original"] else f", original {b['ort_original_ms']:.3f} ms"
    return (f"vs onnxruntime ({b['threads']} threads, {b['rounds']} alternating rounds): "
            f"{rep['target']['name']} {b['target_ms']:.3f} ms, onnxruntime {b['ort_kept_ms']:.3f} ms{orig}: {b['verdict']}")
