"""report.html, part 1: value formatting and the two inline SVG plots (Pareto front, search progress).

Split out of graphopt/reporting/html_report.py (which builds the page)."""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from ..runstore.store import Record


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
    """The record's latency stats in the terms of rec.latency_ms: paired timing (graphopt.timing) scaled."""
    m = _d(rec.measurement)
    lat, f = _d(m.get("latency")), _num(_d(_d(m.get("extra")).get("paired")).get("factor"))
    if not lat or f is None:
        return lat
    return {k: (v * f if k.endswith("_ms") and _num(v) is not None else v) for k, v in lat.items()}


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
