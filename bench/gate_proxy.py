"""Calibrating graphopt's label-free gate (docs/gate_proxy.md): estimators of the top-1 drop computed
on the UNLABELLED select photos vs the real drop on the labelled held-out photos, over EfficientNet-Lite0
candidates of graded quality.

    .venv/bin/python bench/gate_proxy.py [--work /tmp/gate_proxy] [--only NAME,...] [--samples N]

Steps (each cached under --work; rerun to resume):
  1. the run's splits (graphopt.evaluation.data.split_data with a run's default caps: 256 select photos from
     photos-unlabelled/, 64 calibration photos from the fit split; held-out = imagenet-sample/),
     preprocessed once into .npy;
  2. candidates: onnxruntime quantize_static variants (QDQ per-channel, per-tensor, reduce_range,
     QOperator, only Conv / only non-depthwise Conv), in-graph input crop / resize, and graphopt's
     own moves (int8, depth, width, kernel; repair and calibration on the 64 fit photos), with
     make demo's first two int8 candidates (demo_int8_50: conv_bn + every per-layer int8 gene;
     demo_int8_49: the same with the stem back in float, the layer its sensitivity ranked first);
  3. each candidate's logits on select and held-out (onnxruntime CPU, 2 threads);
  4. the estimators on select vs the real held-out drop: MAE, Spearman, and the --max-drop 1.0 verdicts.
The held-out labels only validate the estimator family; they choose no candidate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
LOADERS = ROOT / "models" / "loaders.py"


def cache_splits(work: Path, samples: int | None) -> None:
    if (work / "labels.npy").exists():
        return
    from graphopt.evaluation.data import open_data, split_data
    from graphopt.modelio.ir import load_model

    base = load_model(MODEL)
    data = open_data(f"{LOADERS}:effnet_photos", base.inputs)
    held = open_data(f"{LOADERS}:effnet_imagenet", base.inputs, "--eval-data")
    sp = split_data(data, held, needs_fit=True)  # a run's default caps: select 256, calibration 64
    ns = sp.select.num_samples if samples is None else min(samples, sp.select.num_samples)
    nh = sp.held_out.num_samples if samples is None else min(samples, sp.held_out.num_samples)
    np.save(work / "sel.npy", np.concatenate([sp.select.sample(i)["input"] for i in range(ns)]))
    np.save(work / "held.npy", np.concatenate([sp.held_out.sample(i)["input"] for i in range(nh)]))
    np.save(work / "calib.npy", sp.calibration["input"])
    lab = np.array([sp.held_out.label(i) for i in range(nh)]).reshape(nh, -1)[:, 0]
    np.save(work / "labels.npy", lab)


# ------------------------------------------------------------------------------ candidates
def ort_candidates(work: Path, only: set[str] | None = None) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if only is not None and not only & {"qdq_pc", "qdq_pt", "qdq_pc_rr", "qop_pc", "conv_only", "pw_only"}:
        return {}
    calib = np.load(work / "calib.npy")
    pre = work / "pre.onnx"
    if not pre.exists():
        quant_pre_process(str(MODEL), str(pre))
    pm = onnx.load(str(pre))
    group = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in pm.graph.node if n.op_type == "Conv"}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    variants = {"qdq_pc": dict(per_channel=True), "qdq_pt": dict(per_channel=False),
                "qdq_pc_rr": dict(per_channel=True, reduce_range=True),
                "qop_pc": dict(per_channel=True, quant_format=QuantFormat.QOperator),
                "conv_only": dict(per_channel=True, op_types_to_quantize=["Conv"]),
                "pw_only": dict(per_channel=True, nodes_to_quantize=[k for k, g in group.items() if g == 1])}
    out = {}
    for name, kw in variants.items():
        if only is not None and name not in only:
            continue
        p = work / f"{name}.onnx"
        if not p.exists():
            kw.setdefault("quant_format", QuantFormat.QDQ)
            quantize_static(str(pre), str(p), Reader(), **kw)
        out[name] = p
    return out


def input_candidates(work: Path, only: set[str] | None = None) -> dict[str, Path]:
    """The model behind an in-graph crop (centre r x r of the 224 input) or resize (to r x r)."""
    import onnx
    from onnx import helper, numpy_helper

    out = {}
    for kind in ("crop", "resize"):
        for r in (192, 176, 160):
            if only is not None and f"{kind}{r}" not in only:
                continue
            p = work / f"{kind}{r}.onnx"
            out[f"{kind}{r}"] = p
            if p.exists():
                continue
            g = onnx.load(str(MODEL))
            name = g.graph.input[0].name
            for node in g.graph.node:
                node.input[:] = [name + "_r" if x == name else x for x in node.input]
            if kind == "resize":
                g.graph.initializer.append(numpy_helper.from_array(np.array([1, 3, r, r], np.int64), "gp_sizes"))
                nd = helper.make_node("Resize", [name, "", "", "gp_sizes"], [name + "_r"], mode="linear", antialias=1)
            else:
                o = (224 - r) // 2
                g.graph.initializer.extend([numpy_helper.from_array(np.array([o, o], np.int64), "gp_st"),
                                            numpy_helper.from_array(np.array([o + r, o + r], np.int64), "gp_en"),
                                            numpy_helper.from_array(np.array([2, 3], np.int64), "gp_ax")])
                nd = helper.make_node("Slice", [name, "gp_st", "gp_en", "gp_ax"], [name + "_r"])
            g.graph.node.insert(0, nd)
            del g.graph.value_info[:]
            for op in g.opset_import:
                if op.domain in ("", "ai.onnx"):
                    op.version = max(op.version, 18)
            onnx.save(g, str(p))
    return out


def graphopt_candidates(work: Path, only: set[str] | None = None) -> dict[str, Path]:
    import onnx

    from graphopt.driver import materialize, move_context
    from graphopt.exact import build_space
    from graphopt.modelio.ir import load_model
    from graphopt.registry import PASSES

    base = load_model(MODEL)
    passes = {n: PASSES.create(n) for n in ("conv_bn", "width", "kernel", "depth", "int8")}
    g = base.graph()
    space = build_space({n: p.sites(g) for n, p in passes.items()})
    ctx = move_context(base, {"input": np.load(work / "calib.npy")}, {})
    layers = [s.key for s in space.sites if s.key.startswith("int8:/")]

    def w(b):
        return f"width:/_blocks.{b}/_project_conv/Conv"

    genos = {
        "go_int8_all": {"int8:*": "all"},
        "go_int8_10": {k: "int8" for k in layers[:10]},
        "x_convbn_int8all": {"conv_bn:*exact": "fuse", "int8:*": "all"},
        "x_int8_50_nofuse": {k: "int8" for k in layers},  # every per-layer int8 gene, no conv_bn
        "demo_int8_50": {"conv_bn:*exact": "fuse", **{k: "int8" for k in layers}},  # make demo's candidate 1
        "demo_int8_49": {"conv_bn:*exact": "fuse", **{k: "int8" for k in layers if k != "int8:/_conv_stem/Conv"}},
        "go_depth13": {"depth:/_blocks.13/Add": "remove"},
        "go_depth9_13": {"depth:/_blocks.9/Add": "remove", "depth:/_blocks.13/Add": "remove"},
        "go_depth_3": {f"depth:/_blocks.{b}/Add": "remove" for b in (2, 9, 13)},
        "go_width11_75": {w(11): 0.75},
        "go_width_3x50": {w(b): 0.5 for b in (5, 8, 11)},
        "go_kernel9_3": {"kernel:/_blocks.9/_depthwise_conv/Conv": 3},
    }
    out = {}
    for name, geno in genos.items():
        if only is not None and name not in only:
            continue
        p = work / f"{name}.onnx"
        out[name] = p
        if not p.exists():
            model, _ = materialize(base, space, geno, passes, ctx)
            onnx.save(model, str(p))
    return out


def logits(work: Path, name: str, path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    dst = work / "out" / f"{name}.npz"
    if not dst.exists():
        dst.parent.mkdir(exist_ok=True)
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 2, 1, 3
        s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        iname = s.get_inputs()[0].name

        def run(x):
            return np.stack([s.run(None, {iname: np.ascontiguousarray(x[i:i + 1])})[0].reshape(-1) for i in range(len(x))])

        t = time.time()
        tmp = dst.with_suffix(".tmp.npz")
        np.savez(tmp, select=run(np.load(work / "sel.npy", mmap_mode="r")),
                 held=run(np.load(work / "held.npy", mmap_mode="r")))
        os.replace(tmp, dst)
        print(f"  {name}: {time.time() - t:.0f} s", flush=True)
    z = np.load(dst)
    return {"select": z["select"], "held": z["held"]}


# ------------------------------------------------------------------------------ estimators
def estimates(ref: np.ndarray, cand: np.ndarray, temperature: float = 1.0) -> dict[str, float]:
    """Label-free drop estimates (points) of `cand` against `ref` (logits [samples, classes])."""
    from graphopt.evaluation.metrics import soft_labels

    p, q = soft_labels(ref, temperature), soft_labels(cand, temperature)
    o, c = ref.argmax(1), cand.argmax(1)
    idx = np.arange(len(o))
    flip = o != c
    kl = np.sum(p * (np.log(np.clip(p, 1e-30, 1)) - np.log(np.clip(q, 1e-30, 1))), 1)
    return {"agreement": 100 * flip.mean(),  # (a) today's behaviour before soft_top1
            "soft": 100 * (p[idx, o].mean() - p[idx, c].mean()),  # (b) graphopt's soft_top1 drop
            "confidence_weighted": 100 * np.mean(p[idx, o] * flip),  # (d)
            "kl": float(kl.mean())}  # (c) not in points: rank correlation only


def analyse(work: Path, names: list[str]) -> dict:
    from graphopt.evaluation.metrics import soft_labels, spearman

    lab = np.load(work / "labels.npy")
    ref = logits(work, "original", MODEL)
    ok0 = ref["held"].argmax(1) == lab
    rng = np.random.default_rng(0)
    boot_h = rng.integers(0, len(lab), (2000, len(lab)))
    boot_s = rng.integers(0, len(ref["select"]), (2000, len(ref["select"])))
    rows, seen = [], {}
    for name in names:
        out = logits(work, name, work / f"{name}.onnx")
        key = out["held"].tobytes() + out["select"].tobytes()
        if key in seen:  # the same function as another candidate: counted once
            print(f"  {name}: outputs identical to {seen[key]}; counted once")
            continue
        seen[key] = name
        ok1 = out["held"].argmax(1) == lab
        p = soft_labels(ref["select"])
        c = out["select"].argmax(1)
        cost = p.max(1) - p[np.arange(len(c)), c]
        rows.append({"name": name, "top1": 100 * ok1.mean(), "real": 100 * (ok0.mean() - ok1.mean()),
                     "real_se": 100 * float(np.std(ok0[boot_h].mean(1) - ok1[boot_h].mean(1))),
                     "soft_se": 100 * float(np.std(cost[boot_s].mean(1))),
                     "select": estimates(ref["select"], out["select"]),
                     "select_T0.5": estimates(ref["select"], out["select"], 0.5)["soft"],
                     "select_T2": estimates(ref["select"], out["select"], 2.0)["soft"],
                     "held_images": estimates(ref["held"], out["held"])})
    rows.sort(key=lambda r: r["real"])
    real = np.array([r["real"] for r in rows])
    summary = {}
    for label, vals, points in (
            ("(a) agreement", [r["select"]["agreement"] for r in rows], True),
            ("(b) soft labels T=1 (graphopt)", [r["select"]["soft"] for r in rows], True),
            ("(b) soft labels T=0.5", [r["select_T0.5"] for r in rows], True),
            ("(b) soft labels T=2", [r["select_T2"] for r in rows], True),
            ("(c) KL(orig || cand)", [r["select"]["kl"] for r in rows], False),
            ("(d) confidence-weighted agreement", [r["select"]["confidence_weighted"] for r in rows], True),
            ("(b) T=1 on the held-out images (no labels)", [r["held_images"]["soft"] for r in rows], True)):
        v = np.array(vals)
        s = {"spearman": spearman(v, real)}
        if points:
            near = real <= 5.0
            s.update(mae=float(np.mean(np.abs(v - real))), mae_real_le_5=float(np.mean(np.abs(v[near] - real[near]))),
                     bias=float(np.mean(v - real)),
                     right_at_1=int(sum((a <= 1.0) == (b <= 1.0) for a, b in zip(v, real))),
                     wrongly_pass=[r["name"] for a, b, r in zip(v, real, rows) if a <= 1.0 < b],
                     wrongly_fail=[r["name"] for a, b, r in zip(v, real, rows) if b <= 1.0 < a])
        summary[label] = s
    return {"original_top1": 100 * ok0.mean(),
            "original_confidence_select": 100 * float(soft_labels(ref["select"]).max(1).mean()),
            "original_confidence_held": 100 * float(soft_labels(ref["held"]).max(1).mean()),
            "rows": rows, "summary": summary, "n_select": len(ref["select"]), "n_held": len(lab)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gate_proxy"))
    ap.add_argument("--only", default=None, help="comma-separated candidate names (default: all)")
    ap.add_argument("--samples", type=int, default=None, help="cap select and held-out (a quick check)")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    cache_splits(args.work, args.samples)
    names = []
    only = set(args.only.split(",")) if args.only else None
    for build in (ort_candidates, input_candidates, graphopt_candidates):
        names += list(build(args.work, only))
    res = analyse(args.work, names)
    print(f"original: held-out top-1 {res['original_top1']:.2f}%; mean confidence: select "
          f"{res['original_confidence_select']:.2f}%, held-out images {res['original_confidence_held']:.2f}%")
    print("| candidate | held-out top-1 % | real drop (+-SE) | (a) agreement drop | (b) soft T=1 (+-SE) | "
          "(d) conf.-weighted | (c) KL | (b) on held-out images |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        s = r["select"]
        print(f"| {r['name']} | {r['top1']:.2f} | {r['real']:.2f} (+-{r['real_se']:.2f}) | {s['agreement']:.2f} | "
              f"**{s['soft']:.2f}** (+-{r['soft_se']:.2f}) | {s['confidence_weighted']:.2f} | {s['kl']:.4f} | "
              f"{r['held_images']['soft']:.2f} |")
    for k, s in res["summary"].items():
        print(f"{k}: " + ", ".join(f"{a} {b:.3f}" if isinstance(b, float) else f"{a} {b}" for a, b in s.items()))
    (args.work / "gate_proxy.json").write_text(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
