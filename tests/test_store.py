"""graphopt/runstore/store.py: the run store (one SQLite file, one row per candidate).

Round trip of every Record field, the run identity check, two processes writing one store at
once, and a writer killed mid-stream (kill -9) whose committed rows a reopened store still has.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphopt.errors import UsageError
from graphopt.genotype import Genotype
from graphopt.runstore.store import Record, RunStore

FIELDS = ("genotype", "status", "graph_hash", "fidelity", "fidelity_detail", "latency_ms", "measurement", "error",
          "applied", "timings", "size_bytes", "duplicate_of", "created")


def _full_record() -> Record:
    return Record(
        genotype=Genotype({"conv_bn:/bn1": "fuse", "width:/conv2": 0.5, "depthwise:/c3": 2, "int8:/fc": True}),
        status="ok", graph_hash="ab" * 32, fidelity=0.99931, fidelity_detail={"metric": "cosine", "per_output": [0.999]},
        latency_ms=1.25, measurement={"method": "measured", "latency": {"median_ms": 1.25, "samples": [1.2, 1.3]},
                                      "device": "cpu \u00e9", "tuned": None},
        error=None, applied={"applied": ["conv_bn:/bn1"], "skipped": []}, timings={"compile": 0.5, "measure": 1.5},
        size_bytes=12345, duplicate_of=None, created=1764000000.125)


def _same(a: Record, b: Record) -> None:
    for f in FIELDS:
        assert getattr(a, f) == getattr(b, f), f


def test_round_trip_every_field(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    rec = store.commit(_full_record())
    assert rec.id == 1
    failed = store.commit(Record(genotype=Genotype({"width:/conv2": 0.75}), status="failed",
                                 error="compile: CompileError: op <Pad> (node 'p0')"))
    dup = store.commit(Record(genotype=Genotype({"width:/conv2": 0.5, "conv_bn:/bn1": "fuse", "depthwise:/c3": 2,
                                                 "int8:/fc": False}), status="ok", graph_hash="ab" * 32,
                              latency_ms=1.25, duplicate_of=rec.id))
    store.close()

    store = RunStore.in_dir(tmp_path)  # the same file, reopened: what a resumed run sees
    assert len(store) == 3
    got = store.get(Genotype({"width:/conv2": 0.5, "conv_bn:/bn1": "fuse", "int8:/fc": True, "depthwise:/c3": 2}))
    _same(got, _full_record())
    assert got.id == 1 and type(got.genotype["depthwise:/c3"]) is int and got.genotype["int8:/fc"] is True
    f = store.get(Genotype({"width:/conv2": 0.75}))
    assert f.status == "failed" and f.error == failed.error and f.measurement is None and f.fidelity is None
    assert f.fidelity_detail == {} and f.applied == {} and f.timings == {}
    assert store.get(Genotype({"width:/conv2": 0.25})) is None
    # by_graph_hash: the first non-duplicate row with that graph
    assert store.by_graph_hash("ab" * 32).id == rec.id and store.by_graph_hash("cd" * 32) is None
    assert store.by_id(dup.id).duplicate_of == rec.id and store.by_id(99) is None
    assert [r.id for r in store.records()] == [1, 2, 3] == [r.id for r in store]
    d = store.by_id(1).to_dict()
    assert json.loads(json.dumps(d)) == d and d["genotype"] == dict(rec.genotype)
    store.close()


def test_non_finite_numbers_round_trip(tmp_path):
    """A NaN fidelity or an infinite latency (a broken candidate) is stored, not turned into 0 or an error."""
    store = RunStore(tmp_path / "runs.sqlite")
    store.commit(Record(genotype=Genotype({"a:x": 1}), status="infeasible", fidelity=math.nan, latency_ms=math.inf,
                        fidelity_detail={"note": "outputs not finite"}))
    rec = store.records()[0]
    assert rec.fidelity is None or math.isnan(rec.fidelity)  # SQLite stores a NaN REAL as NULL
    assert rec.latency_ms == math.inf and rec.status == "infeasible"
    store.close()


def test_each_genotype_is_stored_once_and_status_is_checked(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    store.commit(Record(genotype=Genotype({"a:x": 1}), status="ok"))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        store.commit(Record(genotype=Genotype({"a:x": 1}), status="failed"))
    with pytest.raises(ValueError, match="status must be one of"):
        store.commit(Record(genotype=Genotype({"a:y": 1}), status="done"))
    assert len(store) == 1 and store.records()[0].status == "ok"
    store.close()


def test_identity_first_use_resume_and_refusal(tmp_path):
    ident = {"model": "f" * 64, "target": "ort", "data": "synthetic", "metric": "cosine"}
    store = RunStore.in_dir(tmp_path)
    assert store.check_identity(ident) is False  # first use: recorded
    store.close()
    store = RunStore.in_dir(tmp_path)
    assert store.check_identity(dict(ident)) is True  # the same run: resuming
    with pytest.raises(UsageError) as e:
        store.check_identity({**ident, "target": "x86"})
    msg = str(e.value)
    assert f"{tmp_path} holds a run with a different target (ort vs x86)" in msg and "use another --out" in msg
    with pytest.raises(UsageError, match=r"different model \(ffffffffffff\.\.\. vs 000000000000\.\.\.\)"):
        store.check_identity({**ident, "model": "0" * 64})  # long values shortened in the message
    with pytest.raises(UsageError, match="different extra"):  # a key the stored run did not have
        store.check_identity({**ident, "extra": "1"})
    store.close()


def test_meta_round_trip(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    assert store.get_meta("search", {"none": True}) == {"none": True}
    store.set_meta("search", {"strategy": "random", "seed": 0, "sites": [1, 2.5, None]})
    store.set_meta("search", {"strategy": "grid"})  # replaced, not added
    store.close()
    assert RunStore(tmp_path / "runs.sqlite").get_meta("search") == {"strategy": "grid"}


# ---------------------------------------------------------------------- other processes
WRITER = r"""
import sys, time
from pathlib import Path
from graphopt.genotype import Genotype
from graphopt.runstore.store import Record, RunStore

path, tag, n, go, other = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
store = RunStore(path)
print("ready", flush=True)
while not go.exists():  # both writers start together
    time.sleep(0.001)
for i in range(n):
    # keep within a few commits of the other writer (read through the store itself), so the two
    # really write at the same time even when a loaded machine would run one to the end first
    deadline = time.time() + 60
    while other != "none" and i >= 3 and (store.get_meta(f"last.{other}") or -1) < i - 3 and time.time() < deadline:
        time.sleep(0.001)
    store.commit(Record(genotype=Genotype({f"{tag}:{i}": i}), status="ok", latency_ms=float(i),
                        measurement={"by": tag, "i": i}))
    store.set_meta(f"last.{tag}", i)
    print(i, flush=True)
store.close()
"""


def _writer(tmp_path: Path, db: Path, tag: str, n: int, go: Path, other: str = "none") -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    p = subprocess.Popen([sys.executable, str(script), str(db), tag, str(n), str(go), other], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


def test_two_processes_write_one_store_at_once(tmp_path):
    db, go, n = tmp_path / "shared.sqlite", tmp_path / "go", 150
    RunStore(db).close()  # the schema exists before both start (as after a run's first open)
    procs = [_writer(tmp_path, db, tag, n, go, other) for tag, other in (("p", "q"), ("q", "p"))]
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    store = RunStore(db)
    recs = store.records()
    assert len(recs) == 2 * n and len({r.id for r in recs}) == 2 * n
    for tag in ("p", "q"):
        mine = sorted((r for r in recs if r.measurement["by"] == tag), key=lambda r: r.id)
        # every commit landed, whole, in the order that process made them
        assert [r.measurement["i"] for r in mine] == list(range(n))
        assert all(r.genotype == Genotype({f"{tag}:{r.measurement['i']}": r.measurement["i"]}) for r in mine)
        assert store.get_meta(f"last.{tag}") == n - 1
    ids_p = [r.id for r in recs if r.measurement["by"] == "p"]
    ids_q = [r.id for r in recs if r.measurement["by"] == "q"]
    assert min(ids_p) < max(ids_q) and min(ids_q) < max(ids_p), \
        "the writers did not overlap in time (the test did not test concurrency)"
    store.close()


def test_a_writer_killed_mid_run_keeps_every_committed_row(tmp_path):
    """kill -9 between commits (a crashed run): a reopened store has every row the writer had
    committed, each whole, and the next writer goes on from there (what a resumed run does)."""
    db, go = tmp_path / "runs.sqlite", tmp_path / "go"
    go.touch()
    p = _writer(tmp_path, db, "a", 100000, go)
    done = -1
    end = time.monotonic() + 60
    while done < 20 and time.monotonic() < end:
        done = int(p.stdout.readline())
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert done >= 20
    store = RunStore(db)  # WAL recovery on open
    recs = store.records()
    assert len(recs) >= done + 1  # printed after its commit returned; a few more may have landed
    assert [r.measurement["i"] for r in recs] == list(range(len(recs)))
    assert store.get(Genotype({"a:0": 0})).latency_ms == 0.0
    k = len(recs)
    store.commit(Record(genotype=Genotype({"b:0": 0}), status="ok", measurement={"by": "b", "i": 0}))
    store.close()
    again = RunStore(db)
    assert len(again) == k + 1 and again.records()[-1].genotype == Genotype({"b:0": 0})
    again.close()


def test_a_run_killed_with_kill_9_resumes_from_its_store(tmp_path):
    """`graphopt run` killed with SIGKILL (no handler runs, the WAL is not checkpointed): the same
    command resumes from the rows committed before the kill and measures none of them again."""
    import onnx

    from conftest import ROOT, conv_bn_model

    model, out = tmp_path / "m.onnx", tmp_path / "out"
    onnx.save(conv_bn_model(blocks=4), model)  # 4 conv_bn sites (--search-exact: one gene each): 16 genotypes
    args = [sys.executable, "-m", "graphopt", "run", str(model), "--target", "ort", "--threads", "1",
            "--target-opt", "repeat=10", "--target-opt", "number=1000", "--search-exact", "--budget", "6", "--out", str(out), "--json"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / RunStore.FILENAME

    def stored() -> int:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
                return c.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
        except sqlite3.Error:
            return 0

    try:
        end = time.monotonic() + 240
        while stored() < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < end, "fewer than 3 candidates stored in 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = RunStore(db)
    before = [(r.id, r.genotype, r.status, r.latency_ms) for r in store.records()]
    store.close()
    assert len(before) >= 3 and before[0][1] == Genotype()
    assert len(before) < 7, "the run finished before the kill: nothing to resume"
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(res.stdout)
    assert rep["search"]["resumed"] is True
    assert rep["search"]["candidates"]["from_store"] == len(before) - 1  # all but the original count
    assert rep["search"]["candidates"]["new"] == 6 - (len(before) - 1)
    store = RunStore(db)
    after = [(r.id, r.genotype, r.status, r.latency_ms) for r in store.records()]
    store.close()
    assert after[:len(before)] == before  # kept as they were
    assert len(after) == 7 and len({g for _, g, _, _ in after}) == 7  # nothing measured twice
