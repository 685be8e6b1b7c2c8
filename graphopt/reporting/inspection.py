"""`graphopt inspect`: what is in a model, and where each pass could act on it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from .analysis import analyze, format_table
from ..modelio.controlflow import guard_sites, leave_alone
from ..modelio.ir import load_model, op_histogram
from ..registry import PASSES, parse_names
from ..world import create_passes


def inspect_model(model: str | Path, passes: str | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
                  top: int = 15) -> dict[str, Any]:
    base = load_model(model, shapes, symbolic_ok=True)  # dims --shape does not give stay symbolic
    stats = analyze(base.proto)
    names = parse_names(PASSES, passes) if passes else PASSES.names()
    graph = base.graph()
    per_pass: dict[str, Any] = {}
    for name, p in create_passes(names).items():  # the passes as a run builds them (graphopt.world)
        sites, guarded = guard_sites(graph, p.sites(graph))  # what a run keeps, and why the rest goes
        rejected = p.rejections(graph) + guarded
        seen = {n for n, _ in rejected}
        rejected += [(n, why) for n, why in leave_alone(graph) if n not in seen]
        per_pass[name] = {
            "description": p.description,
            "sites": [{"key": s.key, "nodes": list(s.nodes), "choices": list(s.choices),
                       "exact_choice": s.exact_choice, "cost_flops": s.cost, "note": s.note} for s in sites],
            "rejected": [{"node": n, "why": why} for n, why in rejected],
        }
    return {
        "model": str(model), "sha256": base.sha256, "opsets": {o.domain or "ai.onnx": o.version
                                                               for o in base.proto.opset_import},
        "inputs": [{"name": s.name, "shape": _dims(base.proto, s.name, s.shape), "dtype": str(s.dtype)}
                   for s in base.inputs],
        "defaulted_dims": base.defaulted_dims,
        "outputs": base.output_names, "nodes": len(base.proto.graph.node), "op_histogram": op_histogram(base.proto),
        "stats": stats.to_dict(), "passes": per_pass, "_stats": stats, "_top": top, "notes": base.notes,
    }


def _dims(proto, name: str, shape) -> list:
    """An input's dims as the loaded graph declares them: ints, or the symbolic name ('?' if none)."""
    for vi in proto.graph.input:
        if vi.name == name:
            return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or "?")
                    for d in vi.type.tensor_type.shape.dim]
    return list(shape)


def format_inspection(info: dict[str, Any]) -> str:
    lines = [f"model: {info['model']} ({info['nodes']} nodes; opsets "
             + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()) + ")"]
    lines.append("inputs: " + ", ".join(f"{i['name']} {i['dtype']}[{'x'.join(map(str, i['shape']))}]"
                                        for i in info["inputs"]))
    lines.append("outputs: " + ", ".join(info["outputs"]))
    lines.append("ops: " + ", ".join(f"{op} x{n}" for op, n in info["op_histogram"].items()))
    lines.append("")
    lines.append(format_table(info["_stats"], top=info["_top"]))
    lines.append("")
    lines.append("passes:")
    for name, p in info["passes"].items():
        sites = p["sites"]
        choices = Counter(tuple(s["choices"]) for s in sites)
        ch = "; ".join(f"choices {list(c)}" + (f" x{k}" if len(choices) > 1 else "") for c, k in choices.items())
        lines.append(f"  {name}: {len(sites)} sites" + (f" ({ch})" if sites else "") + f" - {p['description']}")
        for s in sorted(sites, key=lambda s: -s["cost_flops"])[:5]:
            lines.append(f"    {s['key']}  {s['note']}")
        if len(sites) > 5:
            lines.append(f"    ... {len(sites) - 5} more (--json lists all)")
        if p["rejected"]:
            why = Counter(r["why"] for r in p["rejected"])
            lines.append(f"    not sites: {len(p['rejected'])} ("
                         + "; ".join(f"{w} x{k}" for w, k in why.most_common(4)) + ")")
    for note in info.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
