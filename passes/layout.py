"""Compile the model's convolutions in another data layout: a compiler-aware move (exact).

The graph is not changed: ONNX convolutions are NCHW by definition, and nothing in the ONNX
graph can say "run this conv in NHWC". The move records the layout in the model's
metadata_props (`graphopt.layout`), and the TVM CPU targets (x86, rpi4; targets/llvm_cpu.py)
compile it that way (Relax ConvertLayout to NHWC/HWIO, as the `layout` target option does).
A target that does not read the entry (ort, cuda, rpi4 --estimate) runs the model as before,
so there the move costs nothing and gains nothing; it exists so that the search, judged by the
tuned target, decides the layout per model instead of the user.
x86's default (`layout=auto`) already compiles a float conv net in NHWC where it vectorizes wide
(docs/compiler.md), so there the move matters with `layout=nchw`, on rpi4, and for int8 models.

Keeps its own sites / apply, not match(): its one site is the whole model, not a node.
Why not NCHWc: its blocking (onnxruntime's layout) is not legalized by
TVM 0.27's Relax (ConvertLayout emits `conv2d(data_layout="NCHW8c")`, which LegalizeOps
leaves as is and the VM cannot emit; measured, docs/compiler.md). The target option `prepack`
gets the weights half of it: MetaSchedule picks a blocked weight layout per kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from graphopt.modelio.hints import LAYOUT, set_hint
from graphopt.plugin import MoveContext, Pass, Site

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs

LAYOUTS = ("nhwc",)  # besides the default nchw (see the module docstring for NCHWc)


class ConvLayout(Pass):
    name = "layout"
    description = ("compile the convolutions in NHWC on the TVM CPU targets (exact: a hint in the model's "
                   "metadata; other targets ignore it)")
    fidelity = "exact"
    stage = 95  # last: its finalize writes the hint on the model every other finalize (int8) produced
    OPTIONS = ()  # reads no pass options
    choices = ("keep",) + LAYOUTS
    exact_choice = "nhwc"

    def sites(self, graph: "gs.Graph") -> list[Site]:
        convs = [n.name for n in graph.nodes if n.op == "Conv" and self._is_2d(n)]
        if not convs:
            return []
        return [Site(key="layout:*", pass_name=self.name, nodes=(), choices=self.choices,
                     exact_choice=self.exact_choice, cost=0.0,
                     note=f"compile the {len(convs)} 2-D convs in NHWC (TVM CPU targets; a metadata hint)")]

    @staticmethod
    def _is_2d(node: "gs.Node") -> bool:
        w = node.inputs[1] if len(node.inputs) > 1 else None
        shape = getattr(w, "shape", None)
        return shape is not None and len(shape) == 4

    def rejections(self, graph: "gs.Graph") -> list[tuple[str, str]]:
        return [] if self.sites(graph) else [("(graph)", "no 2-D Conv: the layout of nothing would change")]

    def apply(self, graph: "gs.Graph", site: Site, choice: Any, ctx: MoveContext) -> bool:
        """Checks the choice; finalize() writes the hint on the exported model."""
        self.check_choice(site, choice)
        return True

    def finalize(self, model: "onnx.ModelProto", moves: list[tuple[Site, Any]], ctx: MoveContext) -> "onnx.ModelProto":
        set_hint(model, LAYOUT, moves[-1][1])
        return model
