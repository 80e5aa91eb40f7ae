"""Tiny-ImageNet (200 classes, 64x64) from a local copy of the official tiny-imagenet-200.

Why the val split is the test set: the official test split ships without labels. Why class
indices follow wnids.txt order: that file defines the class set, and its order is what
BackdoorBench and torchvision-style loaders use, so label k means the same class everywhere.

Layout, with data_dir either the parent of ``tiny-imagenet-200/`` or that folder itself::

    wnids.txt
    train/<wnid>/images/*.JPEG
    val/images/*.JPEG
    val/val_annotations.txt   (tab-separated: filename, wnid, x0, y0, x1, y1)
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from d3tune.data import Dataset, Profile, from_uint8_arrays, register
from d3tune.data.images import decode_images, one_line
from d3tune.errors import UsageError

log = logging.getLogger(__name__)

NAME = "tiny-imagenet"
FOLDER = "tiny-imagenet-200"
SIDE = 64
IMAGE_SUFFIXES = (".jpeg", ".jpg")
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
PROFILE = Profile(arch="preactresnet18")  # the paper's defaults
LAYOUT = (f"expected the official {FOLDER} layout (wnids.txt, train/<wnid>/images/*.JPEG, "
          f"val/images/*.JPEG, val/val_annotations.txt)")


def _root(data_dir: Path) -> Path:
    for candidate in (data_dir / FOLDER, data_dir):
        if (candidate / "wnids.txt").is_file():
            return candidate
    raise UsageError(f"{NAME}: {data_dir / FOLDER / 'wnids.txt'} not found: {LAYOUT}")


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UsageError(f"{NAME}: {path} not found: {LAYOUT}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{NAME}: cannot read {path} as text: {one_line(e)}") from None


def _wnids(root: Path) -> list[str]:
    path = root / "wnids.txt"
    wnids = [w.strip() for w in _read_lines(path) if w.strip()]
    if not wnids:
        raise UsageError(f"{NAME}: {path} is empty: expected one WordNet id (e.g. n01443537) "
                         f"a line")
    seen: set[str] = set()
    for w in wnids:
        if w in seen or any(c.isspace() for c in w) or "/" in w:
            raise UsageError(f"{NAME}: {path}: {w!r} is a duplicate or not a WordNet id: "
                             f"expected one distinct id a line")
        seen.add(w)
    return wnids


def _training_set(root: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for k, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise UsageError(f"{NAME}: {folder} not found (class {wnid} is in wnids.txt): "
                             f"{LAYOUT}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            log.warning("tiny-imagenet: %s has no .JPEG images", folder)
        paths += files
        labels += [k] * len(files)
    return paths, labels


def _val_set(root: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    images = root / "val" / "images"
    if not images.is_dir():
        raise UsageError(f"{NAME}: {images} not found: {LAYOUT}")
    path = root / "val" / "val_annotations.txt"
    index = {w: k for k, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    for line_no, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise UsageError(f"{NAME}: {path} line {line_no}: expected tab-separated "
                             f"'filename<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1', got {line[:80]!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise UsageError(f"{NAME}: {path} line {line_no}: wnid {wnid!r} is not in "
                             f"{root / 'wnids.txt'}")
        if not name or Path(name).name != name:
            raise UsageError(f"{NAME}: {path} line {line_no}: {name!r} is not a plain file name")
        paths.append(images / name)
        labels.append(index[wnid])
    return paths, labels


@register(NAME, PROFILE, needs_data_dir=True)
def load(data_dir: Path | None) -> Dataset:
    if data_dir is None:
        raise UsageError(f"dataset {NAME!r} needs --data-dir (data.data_dir): a local folder")
    root = _root(Path(data_dir))
    wnids = _wnids(root)
    train_paths, y_train = _training_set(root, wnids)
    test_paths, y_test = _val_set(root, wnids)
    if not train_paths:
        raise UsageError(f"{NAME}: {root / 'train'} holds no .JPEG images: {LAYOUT}")
    if not test_paths:
        raise UsageError(f"{NAME}: {root / 'val' / 'val_annotations.txt'} lists no images: "
                         f"{LAYOUT}")
    x_train = decode_images(train_paths, SIDE, NAME, "val_annotations.txt")
    x_test = decode_images(test_paths, SIDE, NAME, "val_annotations.txt")
    log.info("tiny-imagenet: %d train / %d val images, %d classes from %s", len(x_train),
             len(x_test), len(wnids), root)
    return from_uint8_arrays(NAME, x_train, np.asarray(y_train), x_test, np.asarray(y_test),
                             num_classes=len(wnids), mean=MEAN, std=STD, hflip=True)
