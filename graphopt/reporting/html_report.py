"""report.html: one self-contained page (inline CSS, inline SVG, no scripts, no network).

`render_html(report, records, front_ids)` takes the report.json dict (report.build_report),
the run store's records and the ids of the Pareto front (graphopt.reporting.pareto.front_ids) and
returns the page as a string. Every user-supplied string (model path, node names, errors)
goes through html.escape. The page is also well-formed XML (void elements self-closed, no
named entities), so tools can parse it with xml.etree as well as with html.parser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .html_plots import DASH, _d, _e, _fid, _lat, _ms, _num, _pareto_svg, _search_svg  # split for size
from .pareto import DEFAULT_OBJECTIVES, Objective

if TYPE_CHECKING:
    from ..runstore.store import Record


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
        paired = _d(_d(_d(r.measurement).get("extra")).get("paired"))
        if paired.get("raw_ms") is not None:  # the latency columns are in the original's window (graphopt.timing)
            tags.append(f"paired (measured {_ms(paired.get('raw_ms'))})")
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

    `front_ids`: ids of the Pareto-front records (graphopt.reporting.pareto.front_ids(records)).
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
             card("speedup", f"\u00d7{speed:.3f}" if speed else DASH,
                  "original / best, confirmed in alternating rounds" if report.get("search_speedup") is not None
                  else "original / best, as the search measured them", "card-speedup")]
    if confirmed:
        cs = _num(confirmed.get("speedup"))
        cards.append(card("confirmed speedup", f"\u00d7{cs:.3f}" if cs else DASH,
                          f"{_ms(confirmed.get('original_ms'))} vs {_ms(confirmed.get('best_ms'))}, "
                          f"{_e(confirmed.get('rounds'))} alternating rounds", "card-confirmed"))
    ref = _d(report.get("ort_reference"))
    if ref and _num(ref.get("same_graph")):  # graphopt.reporting.ort_reference: onnxruntime on the kept graph / the target's build
        cards.append(card("vs onnxruntime", f"\u00d7{_num(ref['same_graph']):.2f}", _e(ref.get("verdict") or ""),
                          "card-ort-reference"))
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
        ("speedup", "the confirmed speedup (below)" if report.get("search_speedup") is not None else
         "original median / best median, as the search measured them (paired: in the original's window)"),
    ]
    if confirmed:
        how.append(("confirmed speedup", _e(confirmed.get("how") or "re-measured after the search")
                    + f" ({_e(confirmed.get('rounds'))} rounds)"))
    paired = _d(_d(_d(best).get("notes")).get("paired"))
    if paired:  # graphopt/timing.py: the best's latency in the original's window of the host's load
        how.append(("paired timing", _e(paired.get("how") or "") + f" (the best: {_ms(paired.get('raw_ms'))} "
                    f"measured, the original {_ms(paired.get('original_ms'))} right after it)"))
    ref = _d(report.get("ort_reference"))
    if ref:
        how.append(("vs onnxruntime", _e(f"{ref.get('runtime', '')}, {ref.get('threads')} threads: {ref.get('how', '')}")))
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
