"""Data loaders for the bundled models, from the files vendored under models/data/ (graphopt --data).

    graphopt run models/efficientnet_lite0.onnx --target ort --passes conv_bn,int8 \\
        --data models/loaders.py:effnet_photos --eval-data models/loaders.py:effnet_imagenet \\
        --metric imagenet_top1 --max-drop 0.5
    graphopt run models/minilm.onnx --target ort --passes attention,int8 \\
        --data models/loaders.py:minilm_sentences --eval-data models/loaders.py:minilm_sts_test \\
        --metric sts_spearman --max-drop 0.5

Each function returns a random-access dataset (len, getitem): samples are decoded / tokenized
when graphopt reads them, so nothing is held in memory at once.

  effnet_photos     photos-unlabelled/ (1000, unlabelled): fit and select. EfficientNet-Lite0
                    preprocessing (models/efficientnet_lite0.py): short side 256 bicubic, centre
                    crop 224, (x - 127) / 128 -> {"input": [1, 3, 224, 224] float32}.
  effnet_imagenet   imagenet-sample/ (1000, one per class), label = ImageNet class index:
                    HELD-OUT only (top-1).
  minilm_sentences  STS-B train pairs (label (pair id, score); the two sentences of a pair are
                    one group, so they land in the same split) then the WordNet example sentences
                    (unlabelled): fit and select. Tokenized as models/minilm.py does (seq 128).
  minilm_sts_test   STS-B test pairs, label (pair id, score): HELD-OUT only (Spearman).

Rule (models/data/README.md): imagenet-sample/ and sts-test.csv never feed calibration, repair,
distillation or candidate selection; they are only passed as --eval-data.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"graphopt_models_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@lru_cache(maxsize=None)
def _effnet():
    return _sibling("efficientnet_lite0")


@lru_cache(maxsize=None)
def _minilm():
    return _sibling("minilm")


# ------------------------------------------------------------------------------ images
def preprocess_image(path: str | Path) -> np.ndarray:
    """A photo file -> [1, 3, 224, 224] float32, the bundled EfficientNet-Lite0's preprocessing."""
    from PIL import Image

    with Image.open(path) as im:
        img = np.asarray(im.convert("RGB"))
    return _effnet().center_sample(img)


class ImageFolder:
    """Photos in a folder (sorted by name), decoded on access; optional integer labels."""

    def __init__(self, files: list[Path], labels: list[int] | None = None):
        self.files = files
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return {"input": preprocess_image(self.files[i])}


def effnet_photos() -> ImageFolder:
    """photos-unlabelled/: 1000 unlabelled photos for fit and select."""
    return ImageFolder(sorted((DATA / "photos-unlabelled").glob("*.jpg")))


def effnet_imagenet() -> ImageFolder:
    """imagenet-sample/: 1000 labelled ImageNet photos, held-out evaluation only."""
    root = DATA / "imagenet-sample"
    rows = [ln.split("\t") for ln in (root / "labels.tsv").read_text().splitlines()[1:] if ln.strip()]
    return ImageFolder([root / r[0] for r in rows], [int(r[1]) for r in rows])


# ------------------------------------------------------------------------------ sentences
def read_sts(split: str) -> list[tuple[str, str, float]]:
    """STS-B `train` / `dev` / `test` pairs: (sentence 1, sentence 2, score 0-5)."""
    out = []
    for line in (DATA / "sts-b" / f"sts-{split}.csv").read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        if len(cols) >= 7:
            out.append((cols[5], cols[6], float(cols[4])))
    return out


def read_wordnet() -> list[str]:
    lines = (DATA / "sentences" / "wordnet-examples.txt").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip()]


class Sentences:
    """Sentences tokenized on access into the bundled MiniLM's three [1, 128] int64 inputs.
    labels[i] = (pair id, score) for the sentences of a scored pair, None otherwise;
    groups[i] = the pair id (or a unique id), so a pair stays in one split."""

    def __init__(self, sentences: list[str], labels: list, groups: list):
        self.sentences, self.labels, self.groups = sentences, labels, groups
        self._tok = None

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, i: int):
        if self._tok is None:
            self._tok = _minilm().tokenizer()
        enc = self._tok([self.sentences[i]], padding="max_length", max_length=_minilm().SEQ, truncation=True,
                        return_tensors="np")
        return {k: np.ascontiguousarray(enc[k].astype(np.int64)) for k in _minilm().INPUTS}


def _pairs(pairs: list[tuple[str, str, float]], first_id: int = 0):
    sents, labels, groups = [], [], []
    for k, (a, b, score) in enumerate(pairs):
        for s in (a, b):
            sents.append(s)
            labels.append(np.array([first_id + k, score], dtype=np.float64))
            groups.append(first_id + k)
    return sents, labels, groups


def minilm_sentences() -> Sentences:
    """STS-B train pairs (scored) + WordNet example sentences: fit and select."""
    sents, labels, groups = _pairs(read_sts("train"))
    extra = read_wordnet()
    base = len(groups) and (max(groups) + 1)
    sents += extra
    labels += [None] * len(extra)
    groups += list(range(base, base + len(extra)))
    return Sentences(sents, labels, groups)


def minilm_sts_test() -> Sentences:
    """STS-B test pairs (1379, scored): held-out evaluation only."""
    return Sentences(*_pairs(read_sts("test")))
