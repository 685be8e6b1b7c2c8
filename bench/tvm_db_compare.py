"""Several tuning databases of one model, each built by the x86 target and timed against onnxruntime
in one process, in alternating rounds: which tuning run gave the faster model (docs/compiler.md).

    .venv/bin/python bench/tvm_db_compare.py --model efficientnet DB [DB ...] [--rounds 9] [--label L ...]

Each DB is a database folder as a tuning curve leaves it (its --out DIR/tuning-db/MODEL-curve) or a
run's --tuning-db root. Each model is built as the x86 target builds it (refine=1: the database's
in-model picks, nothing timed; a workload the database lacks is tuned with 1 trial, and said so);
every round times each build with the target's own measure() (its median of --repeat runs), the
same way a search does, and onnxruntime the same way, so a quiet or loud minute of this shared
machine hits every column alike (the order rotates from round to round). Prints each round, then per
database the median of rounds, the median and range of its per-round ratios to onnxruntime (the
headline: this host's speed can change between rounds), and the ratio of medians. Run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tvm_vs_ort import MODELS, THREADS, feed_for  # noqa: E402

from graphopt.modelio.ir import load_model  # noqa: E402
from graphopt.targets.host import cpu_summary  # noqa: E402
from graphopt.targets.ort import OrtTarget  # noqa: E402
from graphopt.targets.x86 import X86Target  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dbs", nargs="+", type=Path, help="tuning database folders (or --tuning-db roots)")
    ap.add_argument("--model", choices=sorted(MODELS), default="efficientnet")
    ap.add_argument("--label", action="append", default=[], help="a name per database, in order (default: its path)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=20, help="each target's timed repeats per round (its median)")
    a = ap.parse_args()
    missing = [str(d) for d in a.dbs if not d.is_dir()]
    if missing:
        ap.error(f"no such database folder: {', '.join(missing)}")
    if a.label and len(a.label) != len(a.dbs):
        ap.error(f"--label given {len(a.label)} times for {len(a.dbs)} databases")
    labels = a.label or [str(d) for d in a.dbs]
    print(f"# host: {cpu_summary()}; {THREADS} threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    import onnxruntime as ort

    path, calib = MODELS[a.model]
    loaded = load_model(path)
    work = tempfile.TemporaryDirectory(prefix="db-compare-")  # the builds' files, removed at the end
    runs = {}
    for i, (label, db) in enumerate(zip(labels, a.dbs)):
        tgt = X86Target(threads=THREADS, trials=1, refine=1, repeat=a.repeat, tuning_db=str(db))
        art = tgt.compile(loaded.proto, Path(work.name) / f"db{i}")
        info = art.info.get("tuning", {})
        print(f"{label}: built; {info.get('workloads_reused')} of {info.get('workloads_seen')} workloads from the "
              f"database, picks used {info.get('in_model', {}).get('picks_used')}", flush=True)
        runs[label] = (tgt, art)
    ot = OrtTarget(threads=THREADS, repeat=a.repeat)
    runs["onnxruntime"] = (ot, ot.compile(loaded.proto, Path(work.name) / "ort"))
    feed = feed_for(calib, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs())
    rows = []
    keys = list(runs)
    for r in range(a.rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]  # rotated: no build always times first or last
        row = {k: runs[k][0].measure(runs[k][1], feed).latency.median_ms for k in order}
        rows.append({k: row[k] for k in keys})
        print(f"round {r}: " + "  ".join(f"{k} {row[k]:.3f}" for k in keys), flush=True)
    med = {k: statistics.median(x[k] for x in rows) for k in keys}
    # this host's speed can change between rounds (onnxruntime 2.5 -> 3.5 ms within a minute): the
    # median of per-round ratios compares each build with onnxruntime timed in the same minute
    print(f"\n| database ({a.model}) | TVM ms (median of {a.rounds}) | TVM/ORT (median of per-round ratios) | "
          "per-round range | ratio of medians |")
    print("|---|---|---|---|---|")
    for k in labels:
        ratios = [x[k] / x["onnxruntime"] for x in rows]
        print(f"| {k} | {med[k]:.3f} | x{statistics.median(ratios):.3f} | x{min(ratios):.2f}-{max(ratios):.2f} | "
              f"x{med[k] / med['onnxruntime']:.3f} |")
    print(f"| onnxruntime | {med['onnxruntime']:.3f} | | | |")
    for tgt, _ in runs.values():
        tgt.close()
    work.cleanup()


if __name__ == "__main__":
    main()
