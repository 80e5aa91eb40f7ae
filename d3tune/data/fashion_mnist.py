"""Fashion-MNIST (Xiao, Rasul, Vollgraf, 2017): 70,000 28x28 grayscale photos of clothing, 10 classes.

Why this one: it is the real image set that installs offline here. Debian's package
``dataset-fashion-mnist`` puts the original four gzipped IDX files under
``/usr/share/datasets/fashion-mnist``, which is where we look by default; ``--data-dir`` points
at another copy: the same four files, gzipped or extracted, in that folder or in torchvision's
``FashionMNIST/raw/`` under it. Official split: 60,000 train / 10,000 test, 6,000 / 1,000 per
class.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from d3tune.data import Dataset, Profile, from_uint8_arrays, register
from d3tune.data.idx import read_idx
from d3tune.errors import UsageError

log = logging.getLogger(__name__)

NAME = "fashion_mnist"
APT_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
         "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
NUM_CLASSES = 10
SIDE = 28
# Over the 60,000 training images (0..1 scale).
MEAN = (0.2860,)
STD = (0.3530,)

# Chosen from measurements on 2 CPU cores (docs/fashion_mnist.md), 2026-12-05:
# - 10,000 training images (a fixed class-stratified cut, ``data.train_size``; 1,000 per class):
#   the small CNN trains at ~14 s an epoch there (60,000 would be ~85 s), and 12 epochs reach
#   ACC 0.867 with BadNets planted (ASR 0.986); 15 epochs gave 0.878 for 25 % more time.
# - D3 on the BadNets model, seed 0 (ACC drop / ASR after): 5 % clean in batches of 64 for 20
#   epochs (160 steps) 12.1 points / 0.000; batch 32: 10.1 / 0.000; 10 % (1,000 images) batch 64:
#   9.3 / 0.000; 10 % batch 32 (640 steps): 6.1 / 0.000; 10 % batch 64 for 40 epochs: 6.0 / 0.000
#   at twice the time. Plain FT at 10 %: 0.2 points, ASR 0.699. So 10 %, batch 32, 20 epochs.
PROFILE = Profile(arch="cnn", attack_epochs=12, attack_batch_size=128, attack_lr=0.05,
                  clean_ratio=0.10, defense_epochs=20, defense_batch_size=32, defense_lr=0.01,
                  train_size=10_000)


def _folder(data_dir: Path | None) -> Path:
    """The folder holding the four files: ``data_dir`` itself or its torchvision layout."""
    if data_dir is None:
        if not DEFAULT_DIR.is_dir():
            raise UsageError(f"data.data_dir: dataset {NAME!r} not found at {DEFAULT_DIR}: install "
                             f"Debian's package {APT_PACKAGE} (apt-get install {APT_PACKAGE}) or "
                             f"pass --data-dir with the four IDX files")
        data_dir = DEFAULT_DIR
    for candidate in (data_dir, data_dir / "FashionMNIST" / "raw", data_dir / "fashion-mnist"):
        if any(_file(candidate, stem) for stem in FILES.values()):
            return candidate
    raise UsageError(f"data.data_dir: {data_dir} holds no Fashion-MNIST IDX files (expected "
                     f"{', '.join(FILES.values())}, gzipped or not, there or in FashionMNIST/raw/)")


def _file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _read(folder: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for key, stem in FILES.items():
        path = _file(folder, stem)
        if path is None:
            raise UsageError(f"data.data_dir: {folder / stem}(.gz) not found ({NAME} needs "
                             f"{', '.join(FILES.values())})")
        arrays[key] = read_idx(path, 3 if key.startswith("x") else 1)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape[1:] != (SIDE, SIDE):
            raise UsageError(f"data.data_dir: {folder}: {split} images are "
                             f"{x.shape[1]}x{x.shape[2]}, expected {SIDE}x{SIDE}")
        if len(x) != len(y):
            raise UsageError(f"data.data_dir: {folder}: {len(x)} {split} images but {len(y)} labels")
        if len(y) and int(y.max()) >= NUM_CLASSES:
            raise UsageError(f"data.data_dir: {folder}: {split} labels must be in "
                             f"0..{NUM_CLASSES - 1}, got {int(y.max())}")
    return arrays


@register(NAME, PROFILE, needs_data_dir=False)
def load(data_dir: Path | None = None) -> Dataset:
    folder = _folder(data_dir)
    a = _read(folder)
    log.info("%s: %d train / %d test images from %s", NAME, len(a["x_train"]), len(a["x_test"]),
             folder)
    return from_uint8_arrays(NAME, a["x_train"][:, None], a["y_train"], a["x_test"][:, None],
                             a["y_test"], num_classes=NUM_CLASSES, mean=MEAN, std=STD, hflip=True)
