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
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from d3tune.data import Dataset, Profile, from_uint8_arrays, register
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
CHUNK = 256  # images per thread-pool task: enough to amortise the task overhead


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


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
                         f"{_one_line(e)}") from None
    return paths, labels


def _decode_into(out: np.ndarray, paths: Sequence[Path], start: int) -> None:
    from PIL import Image

    for i, p in enumerate(paths, start):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (SIDE, SIDE):
                    im = im.resize((SIDE, SIDE), Image.Resampling.BILINEAR)
                out[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        except FileNotFoundError:
            raise UsageError(f"{NAME}: {p} not found (listed in its CSV): {LAYOUT}") from None
        except Exception as e:  # noqa: BLE001 -- a bad image file is the user's, not a bug
            raise UsageError(f"{NAME}: {p} is not a readable image: {type(e).__name__}: "
                             f"{_one_line(e)}") from None


def _decode_all(paths: Sequence[Path]) -> np.ndarray:
    """Decode + resize in threads: PIL releases the GIL while decoding and resampling."""
    out = np.empty((len(paths), 3, SIDE, SIDE), dtype=np.uint8)
    starts = range(0, len(paths), CHUNK)
    workers = max(1, min(32, os.cpu_count() or 1, len(starts)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gtsrb-decode")
    try:
        futures = [pool.submit(_decode_into, out, paths[s:s + CHUNK], s) for s in starts]
        for fut in futures:
            fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


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
    x_train = _decode_all(train_paths)
    x_test = _decode_all(test_paths)
    log.info("gtsrb: %d train / %d test images from %s", len(x_train), len(x_test), root)
    return from_uint8_arrays(NAME, x_train, np.asarray(y_train), x_test, np.asarray(y_test),
                             num_classes=NUM_CLASSES, mean=MEAN, std=STD, hflip=False)
