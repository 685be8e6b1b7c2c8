"""report.html: one self-contained page (inline CSS, inline SVG, no scripts, no network).

`render_html(report, records, front_ids)` takes the report.json dict (report.build_report),
the run store's records and the ids of the Pareto front (graphopt.pareto.front_ids) and
returns the page as a string. Every user-supplied string (model path, node names, errors)
goes through html.escape. The page is also well-formed XML (void elements self-closed, no
named entities), so tools can parse it with xml.etree as well as with html.parser.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .pareto import DEFAULT_OBJECTIVES, Objective

if TYPE_CHECKING:
    from .store import Record

DASH = "\u2014"

# ------------------------------------------------------------------------------------ helpers


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ms(value: Any, unit: bool = True) -> str:
    v = _num(value)
    if v is None:
        return DASH
    return f"{v:.3f} ms" if unit else f"{v:.3f}"


def _fid(value: Any, digits: int = 6) -> str:
    v = _num(value)
    return DASH if v is None else f"{v:.{digits}f}"


def _d(obj: Any) -> dict:
    return obj if isinstance(obj, dict) else {}


def _lat(rec: "Record") -> dict:
    return _d(_d(rec.measurement).get("latency"))


def _nice_step(span: float, count: int) -> float:
    raw = span / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _domain(values: Sequence[float], pad: float = 0.06, min_span: float | None = None) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = hi - lo
    floor_span = min_span if min_span is not None else max(abs(hi) * 0.02, 1e-9)
    if span < floor_span:
        mid = (lo + hi) / 2
        return mid - floor_span / 2, mid + floor_span / 2
    return lo - span * pad, hi + span * pad


def _ticks(lo: float, hi: float, count: int = 6) -> tuple[list[float], int]:
    """Round tick values inside [lo, hi] and how many decimals their labels need."""
    step = _nice_step(hi - lo, count)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t = first + len(ticks) * step
    decimals = next((d for d in range(13) if abs(round(step, d) - step) <= step * 1e-6), 12)
    return ticks, decimals


class _Scale:
    def __init__(self, d0: float, d1: float, r0: float, r1: float):
        self.d0, self.d1, self.r0, self.r1 = d0, d1, r0, r1

    def __call__(self, v: float) -> float:
        if self.d1 == self.d0:
            return (self.r0 + self.r1) / 2
        return self.r0 + (v - self.d0) / (self.d1 - self.d0) * (self.r1 - self.r0)


def _f(v: float) -> str:
    return f"{v:.2f}"


def _axes(x: _Scale, y: _Scale, xlabel: str, ylabel: str, *, left: float, top: float, right: float,
          bottom: float, ylabel_gap: float = 62) -> list[str]:
    """Frame, grid lines, ticks and axis labels of one plot panel."""
    out = [f'<rect class="frame" x="{_f(left)}" y="{_f(top)}" width="{_f(right - left)}" '
           f'height="{_f(bottom - top)}"/>']
    xt, xd = _ticks(min(x.d0, x.d1), max(x.d0, x.d1))
    for t in xt:
        px = x(t)
        out.append(f'<line class="grid" x1="{_f(px)}" y1="{_f(top)}" x2="{_f(px)}" y2="{_f(bottom)}"/>')
        out.append(f'<line class="tick" x1="{_f(px)}" y1="{_f(bottom)}" x2="{_f(px)}" y2="{_f(bottom + 5)}"/>')
        out.append(f'<text class="ticklabel" x="{_f(px)}" y="{_f(bottom + 18)}" text-anchor="middle">'
                   f'{t:.{xd}f}</text>')
    yt, yd = _ticks(min(y.d0, y.d1), max(y.d0, y.d1))
    for t in yt:
        py = y(t)
        out.append(f'<line class="grid" x1="{_f(left)}" y1="{_f(py)}" x2="{_f(right)}" y2="{_f(py)}"/>')
        out.append(f'<line class="tick" x1="{_f(left - 5)}" y1="{_f(py)}" x2="{_f(left)}" y2="{_f(py)}"/>')
        out.append(f'<text class="ticklabel" x="{_f(left - 8)}" y="{_f(py + 4)}" text-anchor="end">'
                   f'{t:.{yd}f}</text>')
    out.append(f'<text class="axislabel" x="{_f((left + right) / 2)}" y="{_f(bottom + 38)}" '
               f'text-anchor="middle">{_e(xlabel)}</text>')
    cy = (top + bottom) / 2
    out.append(f'<text class="axislabel" x="{_f(left - ylabel_gap)}" y="{_f(cy)}" text-anchor="middle" '
               f'transform="rotate(-90 {_f(left - ylabel_gap)} {_f(cy)})">{_e(ylabel)}</text>')
    return out


def _star(cx: float, cy: float, r: float) -> str:
    pts = []
    for i in range(10):
        rr = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append(f"{cx + rr * math.cos(a):.2f},{cy + rr * math.sin(a):.2f}")
    return " ".join(pts)


def _tooltip(rec: "Record", best_id: Any, base_id: Any, front: set[int]) -> str:
    parts = [f"candidate {rec.id}", f"latency {_ms(rec.latency_ms)}", f"fidelity {_fid(rec.fidelity, 8)}",
             f"{len(rec.genotype)} moves"]
    tags = []
    if rec.id == base_id or not rec.genotype:
        tags.append("original")
    if best_id is not None and rec.id == best_id:
        tags.append("best")
    if rec.id in front:
        tags.append("on the Pareto front")
    if rec.duplicate_of is not None:
        tags.append(f"same graph as candidate {rec.duplicate_of}")
    return _e(" \u00b7 ".join(parts + tags))


# ------------------------------------------------------------------------------------- plots
def _pareto_svg(records: list["Record"], front: set[int], best_id: Any, base_id: Any,
                min_fid: float | None, metric: str) -> tuple[str, str]:
    pts = [r for r in records if r.status == "ok" and _num(r.latency_ms) is not None and _num(r.fidelity) is not None]
    W, H = 760, 440
    left, top, right, bottom = 92, 40, W - 24, H - 58
    out = [f'<svg id="pareto-plot" class="plot" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
           f'aria-label="Pareto plot: latency against fidelity, one dot per measured candidate">']
    if not pts:
        out.append(f'<rect class="frame" x="{left}" y="{top}" width="{right - left}" height="{bottom - top}"/>')
        out.append(f'<text class="empty" x="{(left + right) / 2}" y="{(top + bottom) / 2}" text-anchor="middle">'
                   f'no measured candidate to plot</text></svg>')
        return "".join(out), "No candidate was measured, so there is nothing to plot."
    xs = [float(r.latency_ms) for r in pts]
    ys = [float(r.fidelity) for r in pts]
    x = _Scale(*_domain(xs), left, right)
    ylo, yhi = _domain(ys, min_span=1e-3)
    if max(ys) <= 1.0 < yhi:  # fidelity tops out at 1: do not draw an axis above it
        ylo, yhi = ylo - (yhi - 1.0), 1.0 + 0.04 * (yhi - ylo)
    y = _Scale(ylo, yhi, bottom, top)
    out += _axes(x, y, "latency (ms, median; lower is better)", f"fidelity ({metric}; higher is better)",
                 left=left, top=top, right=right, bottom=bottom)
    if min_fid is not None and ylo <= min_fid <= yhi:
        py = y(min_fid)
        out.append(f'<line class="threshold" x1="{left}" y1="{_f(py)}" x2="{right}" y2="{_f(py)}"/>')
        out.append(f'<text class="note" x="{right - 4}" y="{_f(py - 4)}" text-anchor="end">'
                   f'--min-fidelity {_e(min_fid)}</text>')
    on_front = sorted((r for r in pts if r.id in front), key=lambda r: (float(r.latency_ms), r.id))
    if len(on_front) > 1:
        path = " ".join(f"{_f(x(float(r.latency_ms)))},{_f(y(float(r.fidelity)))}" for r in on_front)
        out.append(f'<polyline class="front-line" points="{path}"/>')
    # plain dots first, the front on top
    for r in sorted(pts, key=lambda r: (r.id in front, r.id if r.id is not None else -1)):
        cls = "dot front" if r.id in front else "dot"
        if best_id is not None and r.id == best_id:
            cls += " best"
        if r.id == base_id or not r.genotype:
            cls += " original"
        out.append(f'<circle class="{cls}" data-id="{_e(r.id)}" cx="{_f(x(float(r.latency_ms)))}" '
                   f'cy="{_f(y(float(r.fidelity)))}" r="{5 if r.id in front else 4}">'
                   f'<title>{_tooltip(r, best_id, base_id, front)}</title></circle>')
    for r in pts:
        px, py = x(float(r.latency_ms)), y(float(r.fidelity))
        if r.id == base_id or (base_id is None and not r.genotype):
            out.append(f'<rect class="orig-marker" data-id="{_e(r.id)}" x="{_f(px - 9)}" y="{_f(py - 9)}" '
                       f'width="18" height="18"><title>{_tooltip(r, best_id, base_id, front)}</title></rect>')
            out.append(f'<text class="marklabel" x="{_f(px)}" y="{_f(py + 24)}" text-anchor="middle">original</text>')
        if best_id is not None and r.id == best_id:
            out.append(f'<polygon class="best-marker" data-id="{_e(r.id)}" points="{_star(px, py, 13)}">'
                       f'<title>{_tooltip(r, best_id, base_id, front)}</title></polygon>')
            out.append(f'<text class="marklabel best-label" x="{_f(px)}" y="{_f(py - 17)}" '
                       f'text-anchor="middle">best #{_e(r.id)}</text>')
    # legend
    lx = left + 6
    out.append(f'<g class="legend" transform="translate({lx} 14)">'
               '<circle class="lg-dot" cx="6" cy="0" r="4"/><text x="14" y="4">candidate</text>'
               '<circle class="lg-front" cx="100" cy="0" r="5"/><text x="109" y="4">Pareto front</text>'
               f'<polygon class="lg-best" points="{_star(222, 0, 9)}"/><text x="234" y="4">best (chosen)</text>'
               '<rect class="lg-orig" x="338" y="-7" width="14" height="14"/><text x="358" y="4">original</text>'
               '</g>')
    out.append("</svg>")
    return "".join(out), f"{len(pts)} measured candidate(s) plotted, {len(on_front)} on the Pareto front."


def _search_svg(records: list["Record"], best_id: Any, base_id: Any) -> tuple[str, str]:
    ordered = sorted(records, key=lambda r: (r.id is None, r.id if r.id is not None else 0))
    W, H = 940, 380
    out = [f'<svg id="search-curve" class="plot" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
           f'aria-label="Search curve: best latency so far against candidate index and elapsed time">']
    measured = [r for r in ordered if r.status == "ok" and _num(r.latency_ms) is not None]
    if not ordered or not measured:
        out.append(f'<text class="empty" x="{W / 2}" y="{H / 2}" text-anchor="middle">'
                   f'no measured candidate: no search curve</text></svg>')
        return "".join(out), "No candidate was measured, so there is no search curve."
    lats = [float(r.latency_ms) for r in measured]
    ylo, yhi = _domain(lats)
    ylo -= 0.06 * (yhi - ylo)  # a strip at the bottom for the crosses of unmeasured candidates
    created = [_num(r.created) for r in ordered]
    t0 = min((c for c in created if c is not None), default=0.0)
    panels = [("index", "candidate index (order evaluated; 0 = first)",
               {id(r): float(i) for i, r in enumerate(ordered)}),
              ("elapsed", "elapsed time (s, from each candidate's start, Record.created)",
               {id(r): (c - t0) for r, c in zip(ordered, created) if c is not None})]
    pw = (W - 2 * 92 - 24) / 2
    for k, (name, xlabel, xpos) in enumerate(panels):
        left = 92 + k * (pw + 92)
        right, top, bottom = left + pw, 30, H - 58
        xv = list(xpos.values()) or [0.0]
        x = _Scale(*_domain(xv, min_span=1.0), left, right)
        y = _Scale(ylo, yhi, bottom, top)
        out.append(f'<g class="panel" data-x="{name}">')
        out += _axes(x, y, xlabel, "latency (ms, median)", left=left, top=top, right=right, bottom=bottom,
                     ylabel_gap=50)
        title = "best so far vs candidate index" if name == "index" else "best so far vs elapsed time"
        out.append(f'<text class="paneltitle" x="{_f(left)}" y="18">{title}</text>')
        seq = sorted((r for r in ordered if id(r) in xpos), key=lambda r: (xpos[id(r)], r.id or 0))
        best_so_far = math.inf
        steps: list[tuple[float, float]] = []
        improved: set[int] = set()
        for r in seq:
            if r.status == "ok" and _num(r.latency_ms) is not None and float(r.latency_ms) < best_so_far:
                best_so_far = float(r.latency_ms)
                improved.add(id(r))
                if steps:
                    steps.append((x(xpos[id(r)]), steps[-1][1]))
                steps.append((x(xpos[id(r)]), y(best_so_far)))
        if steps:
            steps.append((right, steps[-1][1]))
            out.append('<polyline class="best-so-far" points="'
                       + " ".join(f"{_f(a)},{_f(b)}" for a, b in steps) + '"/>')
        for r in seq:
            px = x(xpos[id(r)])
            if r.status == "ok" and _num(r.latency_ms) is not None:
                py = y(float(r.latency_ms))
                cls = "dot improve" if id(r) in improved else "dot"
                if best_id is not None and r.id == best_id:
                    cls += " best"
                tip = _e(f"candidate {r.id} \u00b7 {_ms(r.latency_ms)} \u00b7 fidelity {_fid(r.fidelity, 8)} "
                         f"\u00b7 {len(r.genotype)} moves")
                out.append(f'<circle class="{cls}" data-id="{_e(r.id)}" cx="{_f(px)}" cy="{_f(py)}" r="3.5">'
                           f'<title>{tip}</title></circle>')
                if best_id is not None and r.id == best_id:
                    out.append(f'<polygon class="best-marker" data-id="{_e(r.id)}" points="{_star(px, py, 10)}"/>')
                if r.id == base_id or (base_id is None and not r.genotype):
                    out.append(f'<rect class="orig-marker" data-id="{_e(r.id)}" x="{_f(px - 7)}" y="{_f(py - 7)}" '
                               'width="14" height="14"/>')
            else:
                tip = _e(f"candidate {r.id} \u00b7 {r.status} \u00b7 {r.error or 'no latency'}")
                out.append(f'<path class="miss {_e(r.status)}" data-id="{_e(r.id)}" '
                           f'd="M{_f(px - 3)},{_f(bottom - 9)} L{_f(px + 3)},{_f(bottom - 3)} '
                           f'M{_f(px + 3)},{_f(bottom - 9)} L{_f(px - 3)},{_f(bottom - 3)}">'
                           f'<title>{tip}</title></path>')
        out.append("</g>")
    out.append("</svg>")
    missed = len(ordered) - len(measured)
    cap = (f"{len(measured)} measured candidate(s) as dots, best latency so far as the line"
           + (f"; {missed} failed or infeasible candidate(s) as red crosses on the bottom edge" if missed else "")
           + ".")
    return "".join(out), cap


# ------------------------------------------------------------------------------------ tables
def _moves_table(best: dict) -> str:
    moves = best.get("moves") or []
    if not moves:
        return ('<p id="moves-none">The best candidate is the original model: no moves.</p>'
                if best.get("is_original") or not best.get("genotype") else
                '<p id="moves-none">The report lists no moves for the best candidate.</p>')
    rows = []
    for m in moves:
        m = _d(m)
        nodes = m.get("nodes") or []
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            f"<code>{_e(m.get('site'))}</code>", _e(m.get("pass")), f"<code>{_e(m.get('choice'))}</code>",
            "<br/>".join(f"<code>{_e(n)}</code>" for n in nodes) or DASH, _e(m.get("note")) or DASH,
            _e(m.get("result")) if m.get("result") is not None else DASH)) + "</tr>")
    return ('<table id="moves"><thead><tr><th>site</th><th>pass</th><th>choice</th><th>nodes</th><th>note</th>'
            '<th>result</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


LAYERS_SHOWN = 20


def best_layers(best: dict | None) -> tuple[list[dict], dict]:
    """(layers, facts) of the best candidate: report["best"]["layers"] (+ "layers_how", ...), else
    the measurement's notes (a target's Measurement.extra["layers"], e.g. ort with profile=1)."""
    best = _d(best)
    src = best if isinstance(best.get("layers"), list) else _d(best.get("notes"))
    layers = [_d(x) for x in src.get("layers") or [] if isinstance(x, dict)]
    return layers, {k: src.get(k) for k in ("layers_how", "layers_total_ms", "layers_count")}


def _moved(layer: dict, moved_nodes: set[str]) -> bool:
    """A move touched this layer: one of its model nodes is a moved node or was made from one
    (passes name new nodes "<moved node>/...")."""
    for n in layer.get("nodes") or [layer.get("node")]:
        n = str(n)
        if n in moved_nodes or any(n.startswith(m + "/") for m in moved_nodes):
            return True
    return False


def _layers_table(best: dict) -> str:
    layers, facts = best_layers(best)
    if not layers:
        return ""
    moved_nodes = {str(n) for m in best.get("moves") or [] for n in _d(m).get("nodes") or []}
    total = _num(facts.get("layers_total_ms")) or sum(_num(x.get("ms")) or 0.0 for x in layers)
    top = sorted(layers, key=lambda x: -(_num(x.get("ms")) or 0.0))[:LAYERS_SHOWN]
    rows = []
    for i, x in enumerate(top, 1):
        ms = _num(x.get("ms"))
        share = f"{100.0 * ms / total:.1f}%" if ms is not None and total else DASH
        nodes = x.get("nodes") or []
        moved = _moved(x, moved_nodes)
        rows.append(('<tr class="moved">' if moved else "<tr>") + "".join(f"<td>{c}</td>" for c in (
            str(i), f"<code>{_e(x.get('node'))}</code>", _e(x.get("op")) or DASH, _ms(ms, unit=False), share,
            "<br/>".join(f"<code>{_e(n)}</code>" for n in nodes) or DASH, "yes" if moved else "no")) + "</tr>")
    count = facts.get("layers_count") or len(layers)
    cap = (f"The {min(LAYERS_SHOWN, len(top))} slowest of {_e(count)} layers; kernel times sum to {_ms(total)} "
           "(the end-to-end latency adds the runtime's own overhead). "
           + (_e(facts.get("layers_how")) + ". " if facts.get("layers_how") else "")
           + "\u201cmoved\u201d: a move of the best candidate touched one of the layer's model nodes.")
    return ('<section id="best-layers"><h2>Per-layer latency of the best candidate</h2>'
            f'<p class="caption">{cap}</p><table id="layers"><thead><tr><th>#</th><th>layer</th><th>op</th>'
            '<th>ms</th><th>share</th><th>model nodes</th><th>moved</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></section>")


def _candidates_table(records: list["Record"], front: set[int], best_id: Any, base_id: Any) -> str:
    if not records:
        return '<p id="candidates-none">The run store holds no candidate.</p>'
    rows = []
    for r in sorted(records, key=lambda r: (r.id is None, r.id if r.id is not None else 0)):
        lat = _lat(r)
        if lat:
            spread = (f"{_ms(lat.get('min_ms'), False)}\u2013{_ms(lat.get('max_ms'), False)} "
                      f"(\u00b1{_ms(lat.get('stdev_ms'), False)}; {_e(lat.get('repeats'))}\u00d7"
                      f"{_e(lat.get('runs_per_repeat'))} runs)")
        else:
            spread = DASH
        median = lat.get("median_ms", r.latency_ms) if lat else r.latency_ms
        tags = []
        if r.id == base_id or not r.genotype:
            tags.append("original")
        if best_id is not None and r.id == best_id:
            tags.append("<strong>best</strong>")
        if r.id in front:
            tags.append("front")
        if r.duplicate_of is not None:
            tags.append(f"same graph as #{_e(r.duplicate_of)}")
        cls = f"st-{_e(r.status)}" + (" best" if best_id is not None and r.id == best_id else "")
        rows.append(f'<tr class="{cls}" data-id="{_e(r.id)}"><td class="num">{_e(r.id)}</td>'
                    f"<td>{_e(r.status)}</td><td class=\"num\">{len(r.genotype)}</td>"
                    f'<td class="num">{_fid(r.fidelity)}</td><td class="num">{_ms(median)}</td>'
                    f'<td class="num">{spread}</td>'
                    f'<td class="num">{_e(r.size_bytes) if r.size_bytes is not None else DASH}</td>'
                    f"<td>{', '.join(tags)}</td><td class=\"err\">{_e(r.error) if r.error else ''}</td></tr>")
    return ('<table id="candidates"><thead><tr><th>id</th><th>status</th><th>#moves</th><th>fidelity</th>'
            '<th>latency (median)</th><th>spread (min\u2013max, \u00b1stdev)</th><th>size (bytes)</th><th></th>'
            '<th>error</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


# ------------------------------------------------------------------------------------- words
_METHOD_WORDS = {
    "measured": "measured: timed on this machine",
    "rpc": "measured over RPC: timed on a remote device through TVM RPC",
    "estimated": "ESTIMATED by a cost model: no device ran it",
}
_METRIC_WORDS = {
    "cosine": "cosine similarity between the candidate's and the original's outputs (1 = same direction)",
    "top1": "share of samples whose top-1 class (argmax of the last axis) matches the original's",
    "rel_l2": "1 - relative L2 error of the candidate's outputs against the original's (1 = identical)",
}


def _method_words(method: Any) -> str:
    if isinstance(method, list):
        return "MIXED: " + ", ".join(_METHOD_WORDS.get(str(m), str(m)) for m in method)
    if method is None:
        return "no latency was obtained (nothing was measured)"
    return _METHOD_WORDS.get(str(method), str(method))


def _tuned_words(tuned: Any) -> str:
    if tuned is True:
        return "tuned for the target"
    if tuned is False:
        return "UNTUNED (untuned TVM CPU code can run tens of times slower than tuned code)"
    if tuned == "mixed":
        return "mixed: some candidates tuned, some not"
    return "not applicable: the runtime has no tuning step"


def _dl(items: Iterable[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1b1f24;
margin:0 auto;max-width:1000px;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;
padding-bottom:4px}code{font:12px/1.3 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
.sub{color:#57606a;margin:0 0 10px}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;min-width:130px}
.card .k{color:#57606a;font-size:12px}.card .v{font-size:20px;font-weight:600}.card .h{color:#57606a;font-size:11px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;
vertical-align:middle;background:#ddf4e4;color:#116329}.badge.bad{background:#ffebe9;color:#a40e26}
.badge.warn{background:#fff8c5;color:#7d4e00}
.alert{border:2px solid #cf222e;background:#ffebe9;border-radius:6px;padding:10px 14px;margin:12px 0}
.alert h2{border:0;margin:0 0 6px;color:#a40e26}.warnbox{border:1px solid #d4a72c;background:#fff8c5;
border-radius:6px;padding:8px 12px;margin:10px 0}
table{border-collapse:collapse;width:100%;font-size:12.5px}th,td{border-bottom:1px solid #eaeef2;
padding:4px 6px;text-align:left;vertical-align:top}th{background:#f6f8fa;position:sticky;top:0}
td.num{text-align:right;white-space:nowrap}td.err{color:#a40e26}tr.best td{background:#fff1e5}tr.moved td{background:#eef5ff}
tr.st-failed td:nth-child(2){color:#a40e26}tr.st-infeasible td:nth-child(2){color:#9a6700}
.scroll{max-height:520px;overflow:auto;border:1px solid #d0d7de;border-radius:6px}
dl{display:grid;grid-template-columns:200px 1fr;gap:4px 14px;margin:6px 0}dt{color:#57606a}dd{margin:0}
.caption{color:#57606a;font-size:12px;margin:2px 0 0}
svg.plot{display:block;max-width:100%;height:auto;font-family:inherit}
svg .frame{fill:#fff;stroke:#8c959f;stroke-width:1}svg .grid{stroke:#eaeef2;stroke-width:1}
svg .tick{stroke:#8c959f}svg .ticklabel{font-size:11px;fill:#57606a}svg .axislabel{font-size:12px;fill:#1b1f24}
svg .paneltitle{font-size:12px;font-weight:600;fill:#1b1f24}svg .empty{font-size:14px;fill:#57606a}
svg .note{font-size:11px;fill:#9a6700}svg .threshold{stroke:#d4a72c;stroke-dasharray:5 4;stroke-width:1.2}
svg .dot,svg .lg-dot{fill:#8c959f;fill-opacity:.75;stroke:#fff;stroke-width:.8}
svg .dot.front,svg .lg-front{fill:#0969da;fill-opacity:1;stroke:#fff;stroke-width:.8}
svg .dot.improve{fill:#0969da;fill-opacity:1}
svg .front-line{fill:none;stroke:#0969da;stroke-width:1.6}
svg .best-so-far{fill:none;stroke:#0969da;stroke-width:2}
svg .best-marker,svg .lg-best{fill:#cf222e;stroke:#fff;stroke-width:1}
svg .orig-marker,svg .lg-orig{fill:none;stroke:#1b1f24;stroke-width:1.8}
svg .marklabel{font-size:11px;font-weight:600;fill:#1b1f24}svg .best-label{fill:#cf222e}
svg .miss{stroke:#cf222e;stroke-width:1.6;fill:none}svg .legend text{font-size:11px;fill:#1b1f24}
"""


# -------------------------------------------------------------------------------------- page
def render_html(report: dict, records: list["Record"], front_ids: set[int], *,
                objectives: Sequence[Objective] = DEFAULT_OBJECTIVES) -> str:
    """The report page for `report` (report.json's dict) and the run store's `records`.

    `front_ids`: ids of the Pareto-front records (graphopt.pareto.front_ids(records)).
    `objectives`: only described in the page (what the front was computed over).
    Renders with no records, one, or thousands, and when the run found no feasible candidate.
    """
    report = _d(report)
    records = list(records or [])
    front = set(front_ids or ())
    model = _d(report.get("model"))
    target = _d(report.get("target"))
    best = report.get("best") if isinstance(report.get("best"), dict) else None
    base = report.get("baseline") if isinstance(report.get("baseline"), dict) else None
    fidelity = _d(report.get("fidelity"))
    search = _d(report.get("search"))
    confirmed = report.get("confirmed") if isinstance(report.get("confirmed"), dict) else None
    status = str(report.get("status") or ("ok" if best else "infeasible"))
    best_id = best.get("candidate_id") if best else None
    base_id = base.get("candidate_id") if base else next((r.id for r in records if not r.genotype), None)
    metric = str(fidelity.get("metric") or "fidelity")
    min_fid = _num(fidelity.get("min_required"))
    threads = target.get("threads", (base or {}).get("threads"))
    model_name = model.get("path") or "model"
    target_name = target.get("name") or "?"

    p: list[str] = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>'
                    '<meta name="viewport" content="width=device-width, initial-scale=1"/>'
                    f"<title>graphopt: {_e(model_name)} on {_e(target_name)}</title>"
                    f"<style>{CSS}</style></head><body>"]

    # ---- header
    badge = "badge" if status == "ok" else ("badge warn" if status == "interrupted" else "badge bad")
    p.append(f'<header id="header"><h1>graphopt report <span class="{badge}" id="status">{_e(status)}</span></h1>')
    p.append(f'<p class="sub">model <code>{_e(model_name)}</code>'
             + (f" ({_e(model.get('nodes'))} nodes, sha256 <code>{_e(str(model.get('sha256'))[:12])}</code>)"
                if model.get("sha256") else "")
             + f" \u00b7 target <strong>{_e(target_name)}</strong>"
             + (f" ({_e(target.get('compiler'))})" if target.get("compiler") else "")
             + (f" on {_e(target.get('device'))}" if target.get("device") else "") + "</p>")
    p.append(f'<p class="sub" id="latency-how">latency: <strong>{_e(_method_words(report.get("latency_method")))}'
             f"</strong> \u00b7 tuning: {_e(_tuned_words(report.get('tuned')))}"
             f" \u00b7 threads: {_e(threads) if threads is not None else DASH}"
             + (f" \u00b7 {_e(target.get('timing'))}" if target.get("timing") else "") + "</p>")

    if best is None:
        err = (base or {}).get("error")
        p.append('<div class="alert" id="failure"><h2>No feasible candidate: this run found no graph to deliver</h2>'
                 f"<p>status <strong>{_e(status)}</strong>; the search stopped because: "
                 f"{_e(search.get('stopped_because') or 'unknown')}.</p>"
                 + (f"<p>original model: status <strong>{_e(base.get('status'))}</strong>; error: "
                    f"<code>{_e(err) if err else 'none recorded'}</code></p>" if base else
                    "<p>The original model was never evaluated.</p>")
                 + "</div>")
    elif status != "ok":
        why = _e(search.get("stopped_because") or status)
        p.append(f'<div class="warnbox" id="partial">This run ended early ({why}):'
                 " the numbers below cover the candidates done before it stopped.</div>")
    if best is not None and base and base.get("error"):
        p.append(f'<div class="warnbox">original model: <code>{_e(base.get("error"))}</code></div>')

    # ---- headline cards
    def card(k: str, v: str, h: str = "", cid: str = "") -> str:
        idattr = f' id="{cid}"' if cid else ""
        return (f'<div class="card"{idattr}><div class="k">{_e(k)}</div><div class="v">{v}</div>'
                + (f'<div class="h">{h}</div>' if h else "") + "</div>")

    speed = _num(report.get("speedup"))
    cards = [card("original", _ms((base or {}).get("median_ms")), "median, search measurement", "card-baseline"),
             card("best", _ms(best.get("median_ms")) if best else DASH,
                  (f"candidate #{_e(best_id)}, {len(best.get('moves') or [])} moves" if best else "none feasible"),
                  "card-best"),
             card("speedup", f"\u00d7{speed:.3f}" if speed else DASH, "original / best, one measurement each",
                  "card-speedup")]
    if confirmed:
        cs = _num(confirmed.get("speedup"))
        cards.append(card("confirmed speedup", f"\u00d7{cs:.3f}" if cs else DASH,
                          f"{_ms(confirmed.get('original_ms'))} vs {_ms(confirmed.get('best_ms'))}, "
                          f"{_e(confirmed.get('rounds'))} alternating rounds", "card-confirmed"))
    cards.append(card(f"fidelity ({metric})", _fid(fidelity.get("best") if best else None),
                      f"required \u2265 {_e(fidelity.get('min_required'))}" if min_fid is not None else "",
                      "card-fidelity"))
    trust = _d(report.get("trust"))
    if trust and not trust.get("trusted", True):
        cards.append(card("result", '<span class="badge bad">NOT TO BE TRUSTED</span>',
                          _e(trust.get("warning") or ""), "card-trust"))
    held = _d(report.get("held_out"))
    if held and held.get("original") is not None:
        hm = _d(held.get("metric"))
        u = "%" if hm.get("units") == "%" else ""

        def hv(v: Any) -> str:
            return DASH if _num(v) is None else (f"{_num(v):.2f}{u}" if hm.get("units") else f"{_num(v):.6f}")
        cards.append(card(f"held-out {_e(hm.get('name'))}", f"{hv(held.get('best'))}",
                          f"original {hv(held.get('original'))}, {_e(held.get('samples'))} held-out samples"
                          + (f"; {_e(hm['basis'])}" if hm.get("basis") else ""),
                          "card-held-out"))
    if fidelity.get("synthetic"):
        cards.append(card("data", '<span class="badge bad">SYNTHETIC</span>',
                          "random inputs; pass --data for real calibration data", "card-data"))
    elif fidelity:
        cards.append(card("data", "real", f"<code>{_e(fidelity.get('data'))}</code>, "
                          f"{_e(fidelity.get('samples'))} samples", "card-data"))
    p.append('<div class="cards" id="headline">' + "".join(cards) + "</div></header>")

    # ---- plots
    svg, cap = _pareto_svg(records, front, best_id, base_id, min_fid, metric)
    obj_words = ", ".join(f"{'lower' if s == 'min' else 'higher'} {a}" for a, s in objectives)
    p.append('<section id="pareto"><h2>Latency against fidelity</h2>' + svg
             + f'<p class="caption">{_e(cap)} The front: candidates no other measured candidate beats on every '
               f"objective ({_e(obj_words)}); with size as an objective a front point can look dominated in this "
               "2-D view. Failed and infeasible candidates have no latency and are not plotted. "
               "Hover a dot for its numbers.</p></section>")
    svg, cap = _search_svg(records, best_id, base_id)
    p.append('<section id="search"><h2>Search progress</h2>' + svg
             + f'<p class="caption">{_e(cap)}</p></section>')

    # ---- moves of the best
    p.append('<section id="best-moves"><h2>Moves of the best candidate</h2>')
    if best is None:
        p.append('<p id="moves-none">No best candidate, so no moves.</p>')
    else:
        p.append(_moves_table(best))
    p.append("</section>")
    if best is not None:
        p.append(_layers_table(best))

    # ---- all candidates
    by = _d(_d(search.get("candidates")).get("by_status"))
    counts = ", ".join(f"{_e(v)} {_e(k)}" for k, v in by.items()) if by else f"{len(records)} in the store"
    p.append(f'<section id="all-candidates"><h2>All candidates ({len(records)})</h2><p class="caption">{counts}.'
             " Latency: the target's median; spread from the same timed runs.</p>"
             f'<div class="scroll">{_candidates_table(records, front, best_id, base_id)}</div></section>')

    # ---- how every number was obtained
    how: list[tuple[str, str]] = [
        ("latency", _e(_method_words(report.get("latency_method")))),
        ("timing protocol", _e(target.get("timing") or "not stated by the target")),
        ("compiler / runtime", _e(target.get("compiler") or DASH)),
        ("device", _e(target.get("device") or DASH)),
        ("threads", _e(threads) if threads is not None else DASH),
        ("tuning", _e(_tuned_words(report.get("tuned")))),
        ("speedup", "original median / best median, each from its one measurement during the search"),
    ]
    if confirmed:
        how.append(("confirmed speedup", _e(confirmed.get("how") or "re-measured after the search")
                    + f" ({_e(confirmed.get('rounds'))} rounds)"))
    how += [
        ("fidelity metric", f"<code>{_e(metric)}</code>: "
                            f"{_e(fidelity.get('definition') or _METRIC_WORDS.get(metric, metric))}"
                            + (f" <strong>On the select split: {_e(fidelity['basis'])}.</strong>"
                               if fidelity.get("basis") else "")),
        ("fidelity data", ('<strong>SYNTHETIC</strong> random inputs' if fidelity.get("synthetic") else
                           f"<code>{_e(fidelity.get('data'))}</code>") + f", {_e(fidelity.get('samples'))} samples"
         if fidelity else DASH),
        ("fidelity method", _e(fidelity.get("how") or DASH)),
        ("fidelity constraint", f"\u2265 {_e(fidelity.get('min_required'))}; candidates below it are infeasible "
                                "and never compiled" if min_fid is not None else DASH),
        ("Pareto front", _e(f"non-dominated measured candidates over: {obj_words}; ties keep the lowest id")),
        ("search", _e(f"strategy {search.get('strategy')}, seed {search.get('seed')}, budget {search.get('budget')}, "
                      f"passes {', '.join(map(str, search.get('passes') or [])) or 'none'}; stopped because: "
                      f"{search.get('stopped_because')}") if search else DASH),
    ]
    dsplit = _d(report.get("data"))
    if dsplit:
        sz = _d(dsplit.get("sizes"))
        src = _d(dsplit.get("sources"))
        how.append(("data splits", _e(f"fit {sz.get('fit')} (calibration subset {sz.get('calibration')}), select "
                                      f"{sz.get('select')}, held-out {sz.get('held_out')} samples; fit/select from "
                                      f"{src.get('fit')}, held-out from {src.get('held_out')}. {dsplit.get('how', '')}")
                    + "".join(f" {_e(n)}" for n in dsplit.get("notes") or [])))
    if held:
        hm = _d(held.get("metric"))
        how.append(("held-out metric", f"<code>{_e(hm.get('name'))}</code>: {_e(hm.get('definition'))}; "
                    + _e(held.get("how") or "") + (f" (error: {_e(held.get('error'))})" if held.get("error") else "")))
    space = _d(search.get("space"))
    if space:
        how.append(("search space", _e(f"{space.get('sites')} sites, 10^{space.get('log10_genotypes')} genotypes")))
    if report.get("wall_time_s") is not None:
        t = _d(report.get("timings_s"))
        how.append(("wall time", _e(f"{report.get('wall_time_s')} s")
                    + (" (" + ", ".join(f"{_e(k)} {_e(v)} s" for k, v in t.items()) + ")" if t else "")))
    vers = _d(report.get("versions"))
    if vers:
        how.append(("versions", ", ".join(f"{_e(k)} {_e(v) if v else DASH}" for k, v in vers.items())))
    p.append('<section id="how"><h2>How every number was obtained</h2>' + _dl(how) + "</section>")
    p.append('<p class="caption">Generated by graphopt from report.json and the run store; this file loads nothing '
             "from the network.</p></body></html>\n")
    return "".join(p)


__all__ = ["render_html"]
