"""GTSRB (German traffic signs, 43 classes) from a local copy of the official release.

Why whole images resized to 32x32 (no ROI crop): that is what BackdoorBench and the D3 paper
feed their CIFAR-sized networks, so results stay comparable. Why no mirror augmentation: signs
are not mirror-symmetric (a left-turn sign flipped is a right-turn sign).

Layout, with data_dir either the parent of ``GTSRB/`` or ``GTSRB/`` itself::

    GTSRB/Final_Training/Images/00000/GT-00000.csv   (+ its .ppm images), ... 00042/
    GTSRB/Final_Test/Images/*.ppm
    GT-final_test.csv   (from GTSRB_Final_Test_GT.zip; in Final_Test/Images/ or the root)
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from d3tune.data import Dataset, Profile, from_uint8_arrays, register
from d3tune.data.images import decode_images, one_line
from d3tune.errors import UsageError

log = logging.getLogger(__name__)

NAME = "gtsrb"
NUM_CLASSES = 43
SIDE = 32
TEST_CSV = "GT-final_test.csv"
COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
NEEDED = ("Filename", "ClassId")  # the only columns we use; the rest may be absent
MEAN = (0.3403, 0.3121, 0.3214)
STD = (0.2724, 0.2608, 0.2669)
PROFILE = Profile()  # the paper's defaults
LAYOUT = "expected the official GTSRB layout (GTSRB/Final_Training/Images/<class>/GT-<class>.csv)"


def _root(data_dir: Path) -> Path:
    for candidate in (data_dir / "GTSRB", data_dir):
        if (candidate / "Final_Training").is_dir():
            return candidate
    raise UsageError(f"{NAME}: {data_dir / 'GTSRB' / 'Final_Training' / 'Images'} not found: "
                     f"{LAYOUT}")


def _read_csv(path: Path, folder: Path) -> tuple[list[Path], list[int]]:
    """Image paths (resolved against ``folder``) and labels from one semicolon-separated CSV."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=";")
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in NEEDED if c not in header]
            if missing:
                hint = (" (this is the unlabelled test CSV: use GT-final_test.csv from "
                        "GTSRB_Final_Test_GT.zip)" if path.name.endswith(".test.csv") else "")
                raise UsageError(f"{NAME}: {path} has no column {', '.join(missing)}: expected a "
                                 f"';'-separated CSV with columns {';'.join(COLUMNS)}{hint}")
            reader.fieldnames = header
            paths, labels = [], []
            for row in reader:
                name, label = (row.get("Filename") or "").strip(), (row.get("ClassId") or "").strip()
                if not name and not label:
                    continue  # a blank line
                line = reader.line_num
                try:
                    y = int(label)
                except ValueError:
                    raise UsageError(f"{NAME}: {path} line {line}: ClassId {label!r} is not an "
                                     f"integer") from None
                if not 0 <= y < NUM_CLASSES:
                    raise UsageError(f"{NAME}: {path} line {line}: ClassId {y} out of range: "
                                     f"expected 0..{NUM_CLASSES - 1}")
                if not name or Path(name).name != name:
                    raise UsageError(f"{NAME}: {path} line {line}: Filename {name!r} is not a "
                                     f"plain file name")
                paths.append(folder / name)
                labels.append(y)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{NAME}: cannot read {path} as a ';'-separated CSV: "
                         f"{one_line(e)}") from None
    return paths, labels


def _training_set(root: Path) -> tuple[list[Path], list[int]]:
    images = root / "Final_Training" / "Images"
    if not images.is_dir():
        raise UsageError(f"{NAME}: {images} not found: {LAYOUT}")
    class_dirs = sorted(d for d in images.iterdir() if d.is_dir() and d.name.isdigit())
    if not class_dirs:
        raise UsageError(f"{NAME}: {images} has no class folders (00000..00042): {LAYOUT}")
    paths: list[Path] = []
    labels: list[int] = []
    for d in class_dirs:
        csv_path = d / f"GT-{d.name}.csv"
        if not csv_path.is_file():
            raise UsageError(f"{NAME}: {csv_path} not found: {LAYOUT}")
        p, y = _read_csv(csv_path, d)
        paths += p
        labels += y
    if len(class_dirs) != NUM_CLASSES:
        log.warning("gtsrb: %s has %d class folders, expected %d", images, len(class_dirs),
                    NUM_CLASSES)
    return paths, labels


def _test_set(root: Path, data_dir: Path) -> tuple[list[Path], list[int]]:
    images = root / "Final_Test" / "Images"
    if not images.is_dir():
        raise UsageError(f"{NAME}: {images} not found: expected the official GTSRB layout "
                         f"(GTSRB/Final_Test/Images/*.ppm)")
    places = [images / TEST_CSV, root / "Final_Test" / TEST_CSV, root / TEST_CSV,
              data_dir / TEST_CSV]
    for csv_path in dict.fromkeys(places):  # de-duplicated, order kept
        if csv_path.is_file():
            return _read_csv(csv_path, images)
    raise UsageError(f"{NAME}: {images / TEST_CSV} not found: expected the test labels "
                     f"{TEST_CSV} (GTSRB_Final_Test_GT.zip) in Final_Test/Images/ or {root}")


@register(NAME, PROFILE, needs_data_dir=True)
def load(data_dir: Path | None) -> Dataset:
    if data_dir is None:
        raise UsageError(f"dataset {NAME!r} needs --data-dir (data.data_dir): a local folder")
    data_dir = Path(data_dir)
    root = _root(data_dir)
    train_paths, y_train = _training_set(root)
    test_paths, y_test = _test_set(root, data_dir)
    if not train_paths or not test_paths:
        empty = root / ("Final_Training" if not train_paths else "Final_Test") / "Images"
        raise UsageError(f"{NAME}: {empty} lists no images in its CSVs: {LAYOUT}")
    x_train = decode_images(train_paths, SIDE, NAME, "its CSV")
    x_test = decode_images(test_paths, SIDE, NAME, "its CSV")
    log.info("gtsrb: %d train / %d test images from %s", len(x_train), len(x_test), root)
    return from_uint8_arrays(NAME, x_train, np.asarray(y_train), x_test, np.asarray(y_test),
                             num_classes=NUM_CLASSES, mean=MEAN, std=STD, hflip=False)
