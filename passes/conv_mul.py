"""Fold a Mul by a per-channel constant into the Conv before it (exact): Conv(x, W, b) * s
computes Conv(x, W * s, b * s) when s has one value per output channel (or one for all)."""

from __future__ import annotations

import numpy as np

from graphopt.plugin import Fail, Match, Pass
from graphopt.rewrite import input_of, new_constant, only_consumer, producer, set_input, take_over_outputs, value


class ConvMulFold(Pass):
    name = "conv_mul"
    description = "fold a Mul by a per-channel constant into the preceding Conv (exact)"
    fidelity = "exact"
    OPTIONS = ()
    stage = 10  # with the other exact fusions, before architecture moves
    anchor_ops = ("Mul",)
    choices = ("keep", "fold")
    exact_choice = "fold"

    def match(self, graph, mul):
        for i in (0, 1):  # which input of the Mul is the Conv's output
            conv, s = producer(mul.inputs[i]), value(mul.inputs[1 - i])
            if conv is not None and conv.op == "Conv" and s is not None:
                break
        else:
            return None  # not a Conv * constant: not this pass's pattern
        w, b_t = value(input_of(conv, 1)), input_of(conv, 2)
        if w is None or (b_t is not None and value(b_t) is None):
            return Fail(f"Conv {conv.name} weight or bias is not a constant", conv)
        cout, rank = w.shape[0], w.ndim  # the Conv output has the weight's rank
        per_channel = s.ndim <= rank and (s.size == 1 or (s.ndim >= rank - 1 and s.shape[s.ndim - rank + 1] == cout
                                                           and s.size == cout))
        if not per_channel:
            return Fail(f"Mul constant has shape {list(s.shape)}, not one value per channel of {cout}")
        why = only_consumer(graph, conv, mul)
        if why:
            return Fail(why, conv)
        return Match(conv, mul, scale=s.reshape(-1).astype(np.float64), note=f"Conv {conv.name} -> Mul {mul.name}")

    def rewrite(self, graph, m, choice, ctx):
        conv, mul = m.nodes
        w = value(conv.inputs[1])
        b_t = input_of(conv, 2)
        b = value(b_t).astype(np.float64) if b_t is not None else np.zeros(w.shape[0])
        s = np.broadcast_to(m.scale, (w.shape[0],))
        conv.inputs[1] = new_constant(graph, f"{mul.name}_folded_weight", w * s.reshape((-1,) + (1,) * (w.ndim - 1)), w.dtype)
        set_input(conv, 2, new_constant(graph, f"{mul.name}_folded_bias", b * s, w.dtype))
        take_over_outputs(graph, conv, mul)
