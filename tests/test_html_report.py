"""report.html: parse the page and check the plots, the markers, the tables and the escaping."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import onnx
import pytest

from conftest import conv_bn_model
from graphopt.genotype import Genotype
from graphopt.reporting.html_report import render_html
from graphopt.reporting.pareto import front_ids
from graphopt.runstore.store import Record

EVIL = "<script>alert('x')</script>"
HOSTILE_FILE = 'tiny<b>&"x\'.onnx'
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# ---------------------------------------------------------------------------- a tiny DOM
class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, dict(attrs), parent, [], ""

    def classes(self):
        return set((self.attrs.get("class") or "").split())

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag=None, cls=None, **attrs):
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes())
                and all(n.attrs.get(k) == v for k, v in attrs.items())]

    def by_id(self, ident):
        found = self.find_all(id=ident)
        assert len(found) == 1, f"expected one element with id {ident!r}, got {len(found)}"
        return found[0]

    def all_text(self):
        return self.text + "".join(c.all_text() for c in self.children)


class TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.cur = self.root
        self.all_attrs: list[tuple[str, str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        self.all_attrs += [(tag, k, v) for k, v in attrs]
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, attrs, self.cur))
        self.all_attrs += [(tag, k, v) for k, v in attrs]

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.cur.tag == tag, f"</{tag}> closes <{self.cur.tag}>"
        self.cur = self.cur.parent

    def handle_data(self, data):
        self.cur.text += data


def parse(page: str) -> tuple[Node, TreeBuilder]:
    b = TreeBuilder()
    b.feed(page)
    b.close()
    assert b.cur is b.root, "unclosed elements"
    return b.root, b


def check_self_contained(page: str, builder: TreeBuilder) -> None:
    for tag, k, v in builder.all_attrs:
        if k in ("src", "href", "xlink:href", "action", "data"):
            assert not (v or "").lower().startswith(("http:", "https:", "//", "file:")), (tag, k, v)
    lowered = page.lower()
    assert "<script" not in lowered
    assert "<link" not in lowered and "@import" not in lowered and "url(" not in lowered
    ET.fromstring(page.split("\n", 1)[1])  # well-formed XML too (the doctype line aside)


# ------------------------------------------------------------------------------ hand-made
def rec(rid, status, lat=None, fid=None, moves=(), t=0.0, error=None, size=1000, dup=None):
    meas = None
    if lat is not None:
        meas = {"latency": {"median_ms": lat, "mean_ms": lat, "min_ms": lat * 0.9, "max_ms": lat * 1.2,
                            "stdev_ms": lat * 0.05, "repeats": 7, "runs_per_repeat": 10},
                "method": "measured", "tuned": None, "threads": 2, "device": "cpu", "extra": {}}
    return Record(genotype=Genotype({k: "fuse" for k in moves}), status=status, id=rid, latency_ms=lat,
                  fidelity=fid, measurement=meas, error=error, size_bytes=size, created=1000.0 + t,
                  duplicate_of=dup)


def hand_report(best_id=3, moves=None, best=True):
    moves = moves if moves is not None else [
        {"site": "conv_bn:bn0", "pass": "conv_bn", "choice": "fuse", "nodes": ["conv0", "bn0"],
         "note": "Conv conv0 -> BN bn0", "result": "applied"},
        {"site": f"conv_bn:{EVIL}", "pass": "conv_bn", "choice": "fuse", "nodes": ["conv1", EVIL],
         "note": f"Conv conv1 -> BN {EVIL}", "result": "applied"},
    ]
    return {
        "report_version": 1, "status": "ok" if best else "infeasible",
        "model": {"path": f"models/{EVIL}.onnx", "sha256": "ab" * 32, "nodes": 9},
        "target": {"name": "ort", "compiler": "onnxruntime (ORT_ENABLE_ALL)", "device": "cpu", "threads": 2,
                   "tuned": None, "timing": "median of 7 repeats x 10 runs after 5 warm-up runs"},
        "latency_method": "measured", "tuned": None,
        "baseline": {"candidate_id": 1, "status": "ok" if best else "failed",
                     "error": None if best else f"compile: op {EVIL} has no lowering",
                     "median_ms": 10.0 if best else None},
        "best": ({"candidate_id": best_id, "is_original": False, "genotype": {m["site"]: "fuse" for m in moves},
                  "moves": moves, "fidelity": 0.9995, "median_ms": 6.0} if best else None),
        "speedup": 10.0 / 6.0 if best else None,
        "fidelity": {"metric": "cosine", "min_required": 0.99, "best": 0.9995 if best else None,
                     "data": "synthetic", "synthetic": True, "samples": 8, "how": "onnxruntime outputs vs original"},
        "search": {"strategy": "random", "seed": 0, "budget": "5 candidates", "passes": ["conv_bn"],
                   "stopped_because": "budget (candidates)" if best else "search space exhausted",
                   "candidates": {"by_status": {"ok": 4, "infeasible": 1, "failed": 1}}},
        "versions": {"python": "3.11"},
        "confirmed": {"rounds": 3, "original_ms": 10.1, "best_ms": 6.2, "speedup": 10.1 / 6.2,
                      "how": "alternating"} if best else None,
    }


def hand_records():
    return [
        rec(1, "ok", 10.0, 1.0, t=0.0),
        rec(2, "ok", 8.0, 0.999, moves=["conv_bn:bn0"], t=1.5),
        rec(3, "ok", 6.0, 0.9995, moves=["conv_bn:bn0", f"conv_bn:{EVIL}"], t=3.0),
        rec(4, "infeasible", None, 0.5, moves=["conv_bn:bn1"], t=4.0, error="fidelity 0.5 < --min-fidelity 0.99"),
        rec(5, "failed", None, None, moves=["conv_bn:bn2"], t=5.0, error=f"materialize: bad {EVIL}"),
        rec(6, "ok", 9.0, 0.998, moves=["conv_bn:bn3"], t=7.0),
        rec(7, "ok", 6.0, 0.9995, moves=["conv_bn:bn0", "conv_bn:bn4"], t=8.0, dup=3),
    ]


def dots(svg: Node) -> list[Node]:
    return svg.find_all("circle", cls="dot")


def test_hand_made_run():
    records = hand_records()
    front = front_ids(records)
    assert front == {3, 1}  # 7 ties 3 (same numbers), 2 and 6 are dominated
    page = render_html(hand_report(), records, front)
    root, b = parse(page)
    check_self_contained(page, b)

    measured = [r for r in records if r.status == "ok"]
    pareto = root.by_id("pareto-plot")
    assert pareto.tag == "svg"
    assert sorted(int(d.attrs["data-id"]) for d in dots(pareto)) == sorted(r.id for r in measured)
    assert {int(d.attrs["data-id"]) for d in pareto.find_all("circle", cls="front")} == {1, 3}
    assert [m.attrs["data-id"] for m in pareto.find_all(cls="best-marker")] == ["3"]
    assert [d.attrs["data-id"] for d in pareto.find_all("circle", cls="best")] == ["3"]
    assert [m.attrs["data-id"] for m in pareto.find_all(cls="orig-marker")] == ["1"]
    assert len(pareto.find_all("polyline", cls="front-line")) == 1
    for d in dots(pareto):  # a tooltip per dot: id, latency, fidelity, number of moves
        title = d.find_all("title")[0].all_text()
        r = next(r for r in records if str(r.id) == d.attrs["data-id"])
        assert f"candidate {r.id}" in title and f"{r.latency_ms:.3f} ms" in title
        assert f"{r.fidelity:.8f}" in title and f"{len(r.genotype)} moves" in title

    curve = root.by_id("search-curve")
    panels = curve.find_all("g", cls="panel")
    assert [p.attrs["data-x"] for p in panels] == ["index", "elapsed"]
    for p in panels:
        assert len(dots(p)) == len(measured)
        assert len(p.find_all(cls="miss")) == 2  # the infeasible and the failed candidate
        assert len(p.find_all("polyline", cls="best-so-far")) == 1
        assert [m.attrs["data-id"] for m in p.find_all(cls="best-marker")] == ["3"]
        # best-so-far improves at 1, 2 and 3 (the first to reach 6 ms; 7 only ties it)
        assert sorted(d.attrs["data-id"] for d in p.find_all("circle", cls="improve")) == ["1", "2", "3"]

    moves = root.by_id("moves")
    assert len(moves.find_all("tbody")[0].find_all("tr")) == 2
    table = root.by_id("candidates")
    rows = table.find_all("tbody")[0].find_all("tr")
    assert [r.attrs["data-id"] for r in rows] == [str(r.id) for r in records]
    assert "best" in rows[2].classes()
    # latency median and spread from record.measurement
    assert "6.000 ms" in rows[2].all_text() and "5.400\u20137.200" in rows[2].all_text()

    # escaping: the raw tag never appears, its escaped form does (in moves, errors, model path)
    assert EVIL not in page and "<script" not in page
    assert page.count("&lt;script&gt;") >= 5
    assert EVIL in moves.all_text() and EVIL in table.all_text() and EVIL in root.by_id("header").all_text()

    header = root.by_id("header").all_text()
    for expected in ("measured", "threads: 2", "10.000 ms", "6.000 ms", "\u00d71.667", "SYNTHETIC", "cosine",
                     "0.999500", "no tuning step"):
        assert expected in header, expected
    how = root.by_id("how").all_text()
    assert "median of 7 repeats" in how and "cosine" in how and "SYNTHETIC" in how
    assert not root.find_all(id="failure")


@pytest.mark.parametrize("n", [0, 1])
def test_failed_run_with_no_or_one_record(n):
    records = [rec(1, "failed", error=f"compile: op {EVIL} has no lowering")][:n]
    report = hand_report(best=False)
    page = render_html(report, records, front_ids(records))
    root, b = parse(page)
    check_self_contained(page, b)
    failure = root.by_id("failure")
    assert "No feasible candidate" in failure.all_text()
    assert f"compile: op {EVIL} has no lowering" in failure.all_text()
    assert root.by_id("status").all_text() == "infeasible"
    assert dots(root.by_id("pareto-plot")) == [] and dots(root.by_id("search-curve")) == []
    assert root.find_all(id="moves") == [] and root.find_all(id="moves-none")
    assert len(root.find_all(id="candidates")) == n


def test_one_record_the_original_is_best():
    records = [rec(1, "ok", 5.0, 1.0)]
    report = hand_report(best_id=1, moves=[])
    report["best"].update(is_original=True, genotype={})
    page = render_html(report, records, front_ids(records))
    root, b = parse(page)
    check_self_contained(page, b)
    pareto = root.by_id("pareto-plot")
    assert len(dots(pareto)) == 1
    assert pareto.find_all(cls="best-marker", **{"data-id": "1"})
    assert pareto.find_all(cls="orig-marker", **{"data-id": "1"})
    assert "original model: no moves" in root.by_id("moves-none").all_text()
    for p in root.by_id("search-curve").find_all("g", cls="panel"):
        assert len(dots(p)) == 1


def test_minimal_report_dict_renders():
    page = render_html({}, [], set())
    root, b = parse(page)
    check_self_contained(page, b)
    assert root.by_id("failure")


def test_many_records():
    import random

    rng = random.Random(1)
    records = [rec(1, "ok", 20.0, 1.0)]
    for i in range(2, 2001):
        st = rng.choice(["ok"] * 8 + ["infeasible", "failed"])
        records.append(rec(i, st, rng.uniform(5, 30) if st == "ok" else None,
                           rng.uniform(0.99, 1.0) if st != "failed" else None, moves=[f"p:{i}"], t=i * 0.5))
    best = min((r for r in records if r.status == "ok"), key=lambda r: (r.latency_ms, r.id))
    report = hand_report(best_id=best.id)
    t = time.perf_counter()
    page = render_html(report, records, front_ids(records))
    assert time.perf_counter() - t < 10
    root, b = parse(page)
    n_ok = sum(r.status == "ok" for r in records)
    assert len(dots(root.by_id("pareto-plot"))) == n_ok
    for p in root.by_id("search-curve").find_all("g", cls="panel"):
        assert len(dots(p)) == n_ok
    assert len(root.by_id("candidates").find_all("tbody")[0].find_all("tr")) == 2000
    assert root.by_id("pareto-plot").find_all(cls="best-marker", **{"data-id": str(best.id)})


def test_real_small_run(tmp_path):
    from graphopt import optimize

    model = tmp_path / HOSTILE_FILE
    m = conv_bn_model(blocks=3)
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    for i, n in enumerate(bns):  # every BatchNormalization node has a hostile name
        n.name = EVIL + (str(i) if i else "")
    onnx.save(m, model)
    # a size limit just under the original's: only candidates with at least one fused BN (~125 bytes
    # smaller each) are feasible, so the best always has moves, each naming a hostile node
    from graphopt.modelio.ir import load_proto

    limit_mb = (load_proto(m).proto.ByteSize() - 50) / 1e6
    res = optimize(model, "ort", passes="conv_bn", budget=4, out=tmp_path / "o", search_exact=True,
                   max_size_mb=limit_mb)
    assert res.exit_code == 0
    original = next(r for r in res.records if not r.genotype)
    assert original.status == "infeasible" and "--max-size-mb" in original.error, (original.status, original.error)
    report = json.loads((tmp_path / "o" / "report.json").read_text())  # what the CLI would render from
    records = res.records
    page = render_html(report, records, front_ids(records))
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    root, b = parse(page)
    check_self_contained(page, b)
    assert EVIL not in page

    measured = [r for r in records if r.status == "ok" and r.latency_ms is not None]
    assert len(dots(root.by_id("pareto-plot"))) == len(measured) >= 1
    for p in root.by_id("search-curve").find_all("g", cls="panel"):
        assert len(dots(p)) == len(measured)
    best_id = str(report["best"]["candidate_id"])
    assert root.by_id("pareto-plot").find_all(cls="best-marker", **{"data-id": best_id})
    moves = report["best"]["moves"]
    assert moves and all(any(n.startswith(EVIL) for n in mv["nodes"]) for mv in moves), moves
    assert len(root.by_id("moves").find_all("tbody")[0].find_all("tr")) == len(moves)
    assert len(root.by_id("candidates").find_all("tbody")[0].find_all("tr")) == len(records)
    # hostile strings arrive escaped: the model's file name in the header, the node names in the moves table
    assert HOSTILE_FILE in root.by_id("header").all_text() and HOSTILE_FILE not in page
    assert EVIL in root.by_id("moves").all_text()


def test_interrupted_estimated_untuned_run_says_so():
    records = hand_records()
    report = hand_report()
    report.update(status="interrupted", latency_method="estimated", tuned=False)
    report["search"]["stopped_because"] = "interrupted"
    root, _ = parse(render_html(report, records, front_ids(records)))
    assert "interrupted" in root.by_id("partial").all_text()
    header = root.by_id("latency-how").all_text()
    assert "ESTIMATED" in header and "UNTUNED" in header
    report["latency_method"] = ["measured", "rpc"]
    assert "MIXED" in parse(render_html(report, records, set()))[0].by_id("latency-how").all_text()
