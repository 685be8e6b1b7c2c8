"""trim_padding: exact on small padded transformers built in code; near misses refused with reasons."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt.modelio.ir import export_graph, import_graph
from graphopt.passes.trim_padding import TRIMMED_DIM, TrimPadding, check
from graphopt.genotype import Site
from graphopt.plugin import MoveContext
from graphopt.registry import PASSES

S, HIDDEN, HEADS = 12, 16, 2


def tiny_encoder(head: str = "mean", seed: int = 0) -> onnx.ModelProto:
    """A one-layer padded sentence encoder [1, S] -> [1, HIDDEN], exported by torch with the sequence
    length hard-coded (position ids arange(S), Reshape [1, S, H, D] and [1, S, HIDDEN] constants).
    head: "mean" (mask-weighted mean pooling), "tokens" (also outputs the token states, keeping the
    token axis), "flatten" (a Linear over all S * HIDDEN values: the padding matters)."""
    import torch

    torch.manual_seed(seed)
    d = HIDDEN // HEADS

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, HIDDEN)
            self.pos = torch.nn.Embedding(S, HIDDEN)
            self.qkv = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
            self.o = torch.nn.Linear(HIDDEN, HIDDEN)
            self.ln = torch.nn.LayerNorm(HIDDEN)
            self.ff = torch.nn.Linear(HIDDEN, HIDDEN)
            self.flat = torch.nn.Linear(S * HIDDEN, HIDDEN)

        def forward(self, input_ids, attention_mask):
            x = self.emb(input_ids) + self.pos(torch.arange(S).unsqueeze(0))
            q, k, v = (p(x).reshape(1, S, HEADS, d).transpose(1, 2) for p in self.qkv)
            bias = (1.0 - attention_mask[:, None, None, :].float()) * -1e9
            a = torch.softmax(q @ k.transpose(2, 3) / d ** 0.5 + bias, dim=-1) @ v
            x = self.ln(x + self.o(a.transpose(1, 2).reshape(1, S, HIDDEN)))
            x = x + torch.relu(self.ff(x))
            if head == "flatten":
                return self.flat(x.reshape(1, S * HIDDEN))
            m = attention_mask.unsqueeze(-1).float()
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return (pooled, x) if head == "tokens" else pooled

    ids = torch.ones(1, S, dtype=torch.long)
    f = io.BytesIO()
    outs = ["emb", "tokens"] if head == "tokens" else ["emb"]
    torch.onnx.export(Enc().eval(), (ids, torch.ones_like(ids)), f, input_names=["input_ids", "attention_mask"],
                      output_names=outs, opset_version=17, dynamo=False)
    return onnx.load_from_string(f.getvalue())


def _feeds(n: int = 6, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.zeros((1, S), np.int64)
        if i % 3 == 2:  # holes inside the sentence, then padding
            mask[0, : S - 3] = rng.integers(0, 2, S - 3)
            mask[0, 0] = 1
        else:
            mask[0, : rng.integers(1, S + 1)] = 1
        out.append({"input_ids": rng.integers(0, 50, (1, S)).astype(np.int64), "attention_mask": mask})
    return out


def _apply(model: onnx.ModelProto) -> onnx.ModelProto:
    p = TrimPadding()
    g = import_graph(model)
    sites = p.sites(g)
    assert len(sites) == 1 and sites[0].choices == ("keep", "trim") and sites[0].exact_choice == "trim"
    ctx = MoveContext(base_model=load_model_proto(model))
    assert p.apply(g, sites[0], "trim", ctx)
    out = p.finalize(export_graph(g), [(sites[0], "trim")], ctx)  # onnx.checker inside both
    # token-axis tensors carry one symbolic length, so onnxruntime's fusions see equal shapes
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in out.graph.value_info}
    ln = next(n.output[0] for n in out.graph.node if n.op_type == "LayerNormalization")
    assert dims[ln][1:] == [TRIMMED_DIM, HIDDEN], dims.get(ln)
    return out


def load_model_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    """The base model as the driver holds it: shapes inferred."""
    return onnx.shape_inference.infer_shapes(model)


def _run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_trim_is_exact_on_a_padded_encoder_for_any_mask():
    model = tiny_encoder()
    trimmed = _apply(model)
    onnx.checker.check_model(trimmed)
    assert [i.name for i in trimmed.graph.input] == ["input_ids", "attention_mask"]  # the interface is unchanged
    assert any(n.op_type == "Slice" for n in trimmed.graph.node)
    for feed in _feeds():
        np.testing.assert_allclose(_run(trimmed, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-6)
    # the trimmed graph really runs on fewer tokens: an intermediate [1, L, HIDDEN] tensor has L = 3
    short = {"input_ids": np.ones((1, S), np.int64), "attention_mask": np.array([[1, 1, 1] + [0] * (S - 3)])}
    probe = onnx.ModelProto()
    probe.CopyFrom(trimmed)
    ln = next(n for n in probe.graph.node if n.op_type == "LayerNormalization")
    probe.graph.output.append(onnx.helper.make_tensor_value_info(ln.output[0], onnx.TensorProto.FLOAT, None))
    assert _run(probe, short)[-1].shape == (1, 3, HIDDEN)
    # an all-zero mask keeps one token and still matches the original
    zero = {"input_ids": np.ones((1, S), np.int64), "attention_mask": np.zeros((1, S), np.int64)}
    np.testing.assert_allclose(_run(trimmed, zero)[0], _run(model, zero)[0], rtol=1e-5, atol=1e-6)


def test_near_misses_are_refused_with_their_reason():
    p = TrimPadding()
    tokens = import_graph(tiny_encoder("tokens"))
    assert p.sites(tokens) == []
    [(where, why)] = p.rejections(tokens)
    assert "output 'tokens'" in why and "keeps the token axis" in why
    flat = import_graph(tiny_encoder("flatten"))  # the trial run catches the Reshape over all S * HIDDEN values
    assert p.sites(flat) == []
    why = p.rejections(flat)[0][1]
    assert "trimmed graph" in why or "differs from the original" in why, why
    # apply() runs the trial on the candidate too: an inexact trim is never built
    site = Site("trim_padding:attention_mask", "trim_padding", (), ("keep", "trim"), exact_choice="trim")
    before = len(flat.nodes)
    assert p.apply(flat, site, "trim", MoveContext(base_model=tiny_encoder("flatten"))) is False
    assert len(flat.nodes) == before
    m = tiny_encoder()
    m.graph.input[1].name = "segment_ids"  # no input names a mask: the padding is not known
    for n in m.graph.node:
        n.input[:] = ["segment_ids" if x == "attention_mask" else x for x in n.input]
    why = check(import_graph(m))[0]
    assert isinstance(why, str) and "no rank-2 graph input named like an attention mask" in why


def test_registered_and_one_exact_gene(tmp_path):
    from graphopt.exact import build_space
    from graphopt.reporting.inspection import inspect_model

    assert PASSES.get("trim_padding") is TrimPadding
    g = import_graph(tiny_encoder())
    space = build_space({"trim_padding": TrimPadding().sites(g)})
    assert [s.key for s in space.sites] == ["trim_padding:*exact"]
    path = tmp_path / "t.onnx"
    onnx.save(tiny_encoder("tokens"), path)
    text = str(inspect_model(str(path), passes=["trim_padding"]))
    assert "keeps the token axis" in text


def test_static_shape_targets_drop_the_pass():
    from graphopt.registry import TARGETS
    from graphopt.timing import static_shape_conflicts

    why = static_shape_conflicts({"trim_padding": TrimPadding()}, TARGETS.get("x86"))
    assert "not applicable to target x86" in why["trim_padding"]
    assert static_shape_conflicts({"trim_padding": TrimPadding()}, TARGETS.get("ort")) == {}


@pytest.mark.slow
def test_trim_is_exact_on_a_transformers_bert_export():
    """transformers' own BERT (mask built with arange tables and Expand shapes that hard-code S)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg, add_pooling_layer=False).eval()

    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = bert

        def forward(self, input_ids, attention_mask):
            h = self.b(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).float()
            return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    ids = torch.ones(1, S, dtype=torch.long)
    f = io.BytesIO()
    torch.onnx.export(Pool(), (ids, torch.ones_like(ids)), f, input_names=["input_ids", "attention_mask"],
                      output_names=["emb"], opset_version=17, dynamo=False)
    model = onnx.load_from_string(f.getvalue())
    trimmed = _apply(model)
    for feed in _feeds():
        feed["input_ids"] %= 64
        np.testing.assert_allclose(_run(trimmed, feed)[0], _run(model, feed)[0], rtol=1e-5, atol=1e-6)


def test_a_static_shape_target_drops_the_pass_in_a_run(tmp_path, caplog):
    """Through the driver: a target that compiles static shapes gets no trim_padding sites, a warning
    and report.json `not_applicable`, and the run goes on."""
    from graphopt import optimize
    from graphopt.plugin import Artifact, LatencyStats, Measurement, Target
    from graphopt.registry import TARGETS

    class StaticFake(Target):
        name = "static_fake"
        static_shapes = True

        def compile(self, model, workdir):
            return Artifact(target=self.name, handle=len(model.graph.node))

        def measure(self, artifact, inputs):
            return Measurement(latency=LatencyStats.from_samples([float(artifact.handle)]), method="estimated",
                               tuned=None)

    p, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(tiny_encoder(), p)
    feeds = _feeds(8)
    np.savez(data, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    TARGETS.register("static_fake", StaticFake)
    try:
        with caplog.at_level("WARNING"):
            res = optimize(p, "static_fake", passes="trim_padding", budget=1, data=data, metric="cosine",
                           min_fidelity=0.5, out=tmp_path / "o")
    finally:
        TARGETS.unregister("static_fake")
    why = res.report["not_applicable"]["trim_padding"]
    assert "not applicable to target static_fake" in why and "static shapes" in why
    assert any("not applicable to target static_fake" in r.getMessage() for r in caplog.records)
    assert res.report["search"]["space"]["sites"] == 0 and res.report["best"]["is_original"] is True
