"""pareto_front on hand-made records, checked against answers computed by hand."""

from __future__ import annotations

import random

import pytest

from graphopt.genotype import Genotype
from graphopt.reporting.pareto import front_ids, pareto_front
from graphopt.runstore.store import Record


def rec(rid, status="ok", lat=None, fid=None, size=None, moves=1):
    return Record(genotype=Genotype({f"p:s{i}": "x" for i in range(moves)}), status=status, id=rid,
                  latency_ms=lat, fidelity=fid, size_bytes=size)


def ids(records):
    return [r.id for r in records]


# id: (status, latency, fidelity, size)
#  1 original        10.0  1.000  100   front (most faithful among the fast ones)
#  2                  8.0  0.999  100   front
#  3                  9.0  0.998  100   dominated by 2
#  4                  8.0  0.999  100   same vector as 2: tie, the lower id (2) stays
#  5                  7.0  0.990  120   front (faster than everything but 11)
#  6 infeasible       -    0.500  100   not measured: out
#  7 failed           -    -      -     out
#  8 failed           1.0  1.000  10    has a latency but status failed: out
#  9                 12.0  1.000   90   front (the smallest)
# 10                 12.0  1.000  100   dominated by 1 and by 9
# 11                  6.0  None   100   front: fastest; missing fidelity counts as the worst
# 12 ok               -    1.000  100   no latency: out
# 13                 11.0  1.000  100   dominated by 1
RECORDS = [
    rec(1, lat=10.0, fid=1.0, size=100, moves=0), rec(2, lat=8.0, fid=0.999, size=100),
    rec(3, lat=9.0, fid=0.998, size=100), rec(4, lat=8.0, fid=0.999, size=100),
    rec(5, lat=7.0, fid=0.990, size=120), rec(6, "infeasible", fid=0.5, size=100), rec(7, "failed"),
    rec(8, "failed", lat=1.0, fid=1.0, size=10), rec(9, lat=12.0, fid=1.0, size=90),
    rec(10, lat=12.0, fid=1.0, size=100), rec(11, lat=6.0, fid=None, size=100), rec(12, fid=1.0, size=100),
    rec(13, lat=11.0, fid=1.0, size=100),
]


def test_default_objectives_hand_computed():
    assert ids(pareto_front(RECORDS)) == [11, 5, 2, 1, 9]


def test_input_order_does_not_matter():
    shuffled = list(RECORDS)
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert ids(pareto_front(shuffled)) == [11, 5, 2, 1, 9]


def test_latency_and_fidelity_only():
    # without size, 9 (12 ms, fidelity 1.0) is dominated by 1 (10 ms, fidelity 1.0)
    assert ids(pareto_front(RECORDS, [("latency_ms", "min"), ("fidelity", "max")])) == [11, 5, 2, 1]


def test_ties_keep_the_lowest_id_whatever_the_order():
    a, b, c = rec(7, lat=5.0, fid=0.99, size=10), rec(3, lat=5.0, fid=0.99, size=10), rec(9, lat=5.0, fid=0.99, size=10)
    assert ids(pareto_front([a, b, c])) == [3]
    assert ids(pareto_front([c, a, b])) == [3]


def test_equal_latency_is_a_tie_broken_by_other_objectives():
    # same latency: the more faithful dominates; two trade-offs at one latency both stay, by id
    assert ids(pareto_front([rec(1, lat=8.0, fid=0.995, size=10), rec(2, lat=8.0, fid=0.999, size=10)])) == [2]
    assert ids(pareto_front([rec(5, lat=8.0, fid=0.999, size=200), rec(4, lat=8.0, fid=0.995, size=100)])) == [4, 5]


def test_single_record_and_empty():
    one = rec(1, lat=3.0, fid=1.0, size=5, moves=0)
    assert pareto_front([one]) == [one]
    assert pareto_front([]) == []
    assert pareto_front([rec(1, "failed"), rec(2, "infeasible", fid=0.1)]) == []
    assert pareto_front([rec(1, "ok")]) == []  # ok without a latency


def test_single_objective_and_max_sense():
    assert ids(pareto_front(RECORDS, [("size_bytes", "min")])) == [9]
    # maximise fidelity alone: 1, 9, 10, 13 share fidelity 1.0; the lowest id stands for them
    assert ids(pareto_front(RECORDS, [("fidelity", "max")])) == [1]
    # maximising latency (a perverse but valid choice) puts the slowest first
    assert ids(pareto_front(RECORDS, [("latency_ms", "max")])) == [9]


def test_nan_counts_as_worst_and_nan_latency_is_out():
    nan = float("nan")
    out = pareto_front([rec(1, lat=5.0, fid=nan, size=10), rec(2, lat=6.0, fid=0.9, size=10),
                        rec(3, lat=nan, fid=1.0, size=1)])
    assert ids(out) == [1, 2]


def test_resolution_merges_float_noise():
    a = rec(1, lat=5.0, fid=0.9999999999994, size=10)
    b = rec(2, lat=6.0, fid=0.9999999999998, size=10)
    assert ids(pareto_front([a, b])) == [1, 2]
    assert ids(pareto_front([a, b], resolution={"fidelity": 1e-9})) == [1]


def test_mappings_work_like_records_and_front_ids():
    dicts = [r.to_dict() for r in RECORDS]
    assert [d["id"] for d in pareto_front(dicts)] == [11, 5, 2, 1, 9]
    assert front_ids(RECORDS) == {11, 5, 2, 1, 9}


def test_bad_objectives_are_refused():
    with pytest.raises(ValueError, match="sense"):
        pareto_front(RECORDS, [("latency_ms", "fastest")])
    with pytest.raises(ValueError, match="at least one"):
        pareto_front(RECORDS, [])


def test_thousands_of_records_are_quick():
    import time

    rng = random.Random(0)
    many = [rec(i, lat=rng.uniform(1, 100), fid=rng.uniform(0.9, 1.0), size=rng.randint(1, 1000))
            for i in range(1, 3001)]
    t = time.perf_counter()
    front = pareto_front(many)
    assert time.perf_counter() - t < 10
    # brute-force check of the definition
    def dominated(r):
        return any(o.latency_ms <= r.latency_ms and o.fidelity >= r.fidelity and o.size_bytes <= r.size_bytes
                   and (o.latency_ms, o.fidelity, o.size_bytes) != (r.latency_ms, r.fidelity, r.size_bytes)
                   for o in many)
    assert {r.id for r in front} == {r.id for r in many if not dominated(r)}
    assert [r.latency_ms for r in front] == sorted(r.latency_ms for r in front)
