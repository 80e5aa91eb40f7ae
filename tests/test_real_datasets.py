"""The real-dataset loaders, fed tiny files written here in each official on-disk format."""
from __future__ import annotations

import os
import pickle
import pickletools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d3tune.data import DATASETS, load_dataset
from d3tune.errors import UsageError


def usage_error(name: str, data_dir, match: str | None = None) -> str:
    with pytest.raises(UsageError) as info:
        load_dataset(name, data_dir)
    msg = str(info.value)
    assert "\n" not in msg, msg
    if match is not None:
        assert match in msg, msg
    return msg


# --- CIFAR-10 ----------------------------------------------------------------------------------

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_batch(label: str, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": label.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}


def write_cifar(root: Path, n: int = 3) -> dict[str, dict]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for seed, name in enumerate(CIFAR_FILES):
        batches[name] = cifar_batch(f"batch {name}", n, seed)
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    meta = {b"num_cases_per_batch": n, b"label_names": [b"airplane"] * 10, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def test_cifar10_loads_official_layout(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path)
    b1 = batches["data_batch_1"]
    # One known pixel: image 1, green plane, row 5, column 7 (row-major planes R, G, B).
    b1[b"data"][1] = 0
    b1[b"data"][1, 1 * 1024 + 5 * 32 + 7] = 201
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(b1, protocol=2))

    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (3, 3, 32, 32) and ds.y_test.dtype == torch.int64
    assert ds.num_classes == 10 and ds.hflip and ds.shape == (3, 32, 32)
    expected = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert ds.y_train.tolist() == expected
    assert ds.y_test.tolist() == batches["test_batch"][b"labels"]
    img = ds.x_train[1]
    assert img[1, 5, 7] == 201 and int(img.sum()) == 201
    assert torch.equal(ds.x_test.reshape(3, -1), torch.as_tensor(batches["test_batch"][b"data"]))
    # data_dir may also be the batches folder itself.
    assert load_dataset("cifar10", tmp_path / "cifar-10-batches-py").x_train.shape[0] == 15


def test_cifar10_accepts_numpy1_pickles(tmp_path: Path) -> None:
    """The official files were written by numpy 1.x, which names numpy.core.multiarray."""
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    raw = path.read_bytes()
    old = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert old != raw or b"numpy.core.multiarray\n" in raw
    path.write_bytes(old)
    assert load_dataset("cifar10", tmp_path).x_test.shape == (3, 3, 32, 32)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["whole", "nested"])
def test_cifar10_refuses_malicious_pickle(tmp_path: Path, where: str) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    target = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    if where == "whole":
        obj = Payload(marker)
    else:  # a well-formed batch with the payload hidden among the labels
        obj = cifar_batch("x", 3, 0)
        obj[b"labels"] = [1, Payload(marker), 2]
    target.write_bytes(pickle.dumps(obj, protocol=2))
    msg = usage_error("cifar10", tmp_path, str(target))
    assert "refusing to unpickle" in msg and "system" in msg
    assert not marker.exists()


def str_keys(batch: dict) -> dict:
    """A batch as Python 3 tools hold it: the official files are Python 2 pickles, and reading
    them with ``encoding="latin1"`` (torchvision's reader does) makes every key and byte string
    a str; such a dict pickled again is the form these tests write."""
    def text(v):
        return v.decode("latin1") if isinstance(v, bytes) else v
    return {text(k): [text(x) for x in v] if isinstance(v, list) else text(v)
            for k, v in batch.items()}


def numpy1_spelling(raw: bytes) -> bytes:
    """The pickle numpy 1.x would write: numpy.core.* for numpy._core.* (GLOBAL opcodes up to
    protocol 3, length-prefixed strings from 4 on; optimize() re-frames what changed length)."""
    raw = raw.replace(b"cnumpy._core.", b"cnumpy.core.")
    raw = re.sub(rb"\x8c(.)numpy\._core\.",
                 lambda m: b"\x8c" + bytes([m.group(1)[0] - 1]) + b"numpy.core.", raw, flags=re.S)
    return pickletools.optimize(raw)


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 4: Python 3.8-3.13's default; 5: 3.14's
def test_cifar10_accepts_str_keys(tmp_path: Path, protocol: int) -> None:
    batches = write_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for name in CIFAR_FILES:
        converted = str_keys(batches[name])
        assert set(converted) == {"batch_label", "labels", "data", "filenames"}
        (folder / name).write_bytes(pickle.dumps(converted, protocol=protocol))
    ds = load_dataset("cifar10", tmp_path)
    expected = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert ds.y_train.tolist() == expected
    assert torch.equal(ds.x_test.reshape(3, -1), torch.as_tensor(batches["test_batch"][b"data"]))
    # Written by numpy 1.x, the same pickle names numpy.core.* (protocol 5: numeric._frombuffer).
    raw = (folder / "test_batch").read_bytes()
    old = numpy1_spelling(raw)
    assert old != raw and b"numpy._core" not in old
    (folder / "test_batch").write_bytes(old)
    assert torch.equal(load_dataset("cifar10", tmp_path).x_test.reshape(3, -1),
                       torch.as_tensor(batches["test_batch"][b"data"]))


def test_cifar10_str_key_batch_still_checked(tmp_path: Path) -> None:
    """The str-key form goes through the same restricted unpickler and the same checks."""
    write_cifar(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    marker = tmp_path / "pwned"
    batch = str_keys(cifar_batch("x", 3, 0))
    batch["labels"] = [1, Payload(marker), 2]
    target.write_bytes(pickle.dumps(batch, protocol=4))
    msg = usage_error("cifar10", tmp_path, str(target))
    assert "refusing to unpickle" in msg and "system" in msg and not marker.exists()
    batch = str_keys(cifar_batch("x", 3, 0))
    batch["data"] = np.zeros((3, 100), dtype=np.uint8)
    target.write_bytes(pickle.dumps(batch, protocol=5))
    usage_error("cifar10", tmp_path, "(N, 3072)")
    del batch["labels"]
    target.write_bytes(pickle.dumps(batch, protocol=5))
    usage_error("cifar10", tmp_path, "'labels'")


def test_cifar10_rejects_wrong_format(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    target.write_bytes(b"not a pickle at all")
    usage_error("cifar10", tmp_path, str(target))
    bad = cifar_batch("x", 2, 0)
    bad[b"data"] = np.zeros((2, 100), dtype=np.uint8)
    target.write_bytes(pickle.dumps(bad, protocol=2))
    usage_error("cifar10", tmp_path, "(N, 3072)")
    bad = cifar_batch("x", 2, 0)
    bad[b"labels"] = [0, 10]
    target.write_bytes(pickle.dumps(bad, protocol=2))
    usage_error("cifar10", tmp_path, "0..9")
    target.unlink()
    usage_error("cifar10", tmp_path, str(target))


def test_cifar10_missing_folder_and_no_data_dir(tmp_path: Path) -> None:
    usage_error("cifar10", tmp_path, str(tmp_path / "cifar-10-batches-py"))
    usage_error("cifar10", None, "data_dir")
    usage_error("cifar10", tmp_path / "nope", "nope")


# --- GTSRB -------------------------------------------------------------------------------------

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def colour(label: int, i: int) -> tuple[int, int, int]:
    return (label * 5 % 256, 10 * i % 256, 200)


def write_gtsrb(root: Path, test_csv_in_images: bool = True) -> tuple[list[int], list[int]]:
    train_labels, test_labels = [0, 0, 7, 42], [42, 7, 0]
    base = root / "GTSRB"
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(train_labels):
        by_class.setdefault(y, []).append(i)
    for y, idx in by_class.items():
        d = base / "Final_Training" / "Images" / f"{y:05d}"
        d.mkdir(parents=True)
        rows = [HEADER]
        for i in idx:
            w, h = 30 + i, 41 - i  # real GTSRB images are 15..250 px, never square-guaranteed
            Image.new("RGB", (w, h), colour(y, i)).save(d / f"{i:05d}_00000.ppm")
            rows.append(f"{i:05d}_00000.ppm;{w};{h};5;5;{w - 5};{h - 5};{y}")
        (d / f"GT-{y:05d}.csv").write_text("\n".join(rows) + "\n")
    images = base / "Final_Test" / "Images"
    images.mkdir(parents=True)
    rows = [HEADER]
    for i, y in enumerate(test_labels):
        Image.new("RGB", (33, 35), colour(y, i)).save(images / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;33;35;5;5;28;30;{y}")
    (images / "GT-final_test.test.csv").write_text(HEADER.rsplit(";", 1)[0] + "\n")
    csv_dir = images if test_csv_in_images else root
    (csv_dir / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return train_labels, test_labels


@pytest.mark.parametrize("csv_in_images", [True, False])
def test_gtsrb_loads_official_layout(tmp_path: Path, csv_in_images: bool) -> None:
    train_labels, test_labels = write_gtsrb(tmp_path, csv_in_images)
    ds = load_dataset("gtsrb", tmp_path)
    assert ds.x_train.shape == (4, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (3, 3, 32, 32)
    assert ds.num_classes == 43 and not ds.hflip
    assert ds.y_train.tolist() == train_labels and ds.y_test.tolist() == test_labels
    for i, y in enumerate(train_labels):  # solid colours survive the resize exactly
        assert ds.x_train[i, :, 16, 16].tolist() == list(colour(y, i))
    for i, y in enumerate(test_labels):
        assert ds.x_test[i, :, 0, 31].tolist() == list(colour(y, i))


def test_gtsrb_accepts_gtsrb_folder_itself(tmp_path: Path) -> None:
    write_gtsrb(tmp_path, test_csv_in_images=True)
    assert load_dataset("gtsrb", tmp_path / "GTSRB").x_train.shape[0] == 4


def test_gtsrb_bad_files(tmp_path: Path) -> None:
    write_gtsrb(tmp_path)
    csv_path = tmp_path / "GTSRB" / "Final_Training" / "Images" / "00007" / "GT-00007.csv"
    good = csv_path.read_text()
    csv_path.write_text(good.replace(";ClassId", "").replace(";7\n", "\n"))
    usage_error("gtsrb", tmp_path, str(csv_path))
    csv_path.write_text(good.replace(";7\n", ";43\n"))
    usage_error("gtsrb", tmp_path, "out of range")
    csv_path.write_text(good)
    ppm = csv_path.parent / "00002_00000.ppm"
    ppm.write_bytes(b"P6 garbage")
    usage_error("gtsrb", tmp_path, str(ppm))
    ppm.unlink()
    usage_error("gtsrb", tmp_path, str(ppm))
    test_csv = tmp_path / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.csv"
    test_csv.unlink()
    usage_error("gtsrb", tmp_path, "GT-final_test.csv")


def test_gtsrb_missing_folder(tmp_path: Path) -> None:
    usage_error("gtsrb", tmp_path, str(tmp_path / "GTSRB" / "Final_Training" / "Images"))
    (tmp_path / "GTSRB" / "Final_Training").mkdir(parents=True)
    usage_error("gtsrb", tmp_path, str(tmp_path / "GTSRB" / "Final_Training" / "Images"))
    usage_error("gtsrb", None)


# --- Tiny-ImageNet -----------------------------------------------------------------------------

WNIDS = ["n02124075", "n01443537", "n09193705"]  # deliberately not sorted


def write_tiny(root: Path) -> list[tuple[str, str]]:
    base = root / "tiny-imagenet-200"
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for k, wnid in enumerate(WNIDS):
        d = base / "train" / wnid / "images"
        d.mkdir(parents=True)
        for i in range(2):
            mode = "L" if (k, i) == (1, 1) else "RGB"  # a few real ones are greyscale
            fill = 90 if mode == "L" else (40 * k, 100, 200)
            Image.new(mode, (64, 64), fill).save(d / f"{wnid}_{i}.JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    val = base / "val" / "images"
    val.mkdir(parents=True)
    ann = [("val_0.JPEG", WNIDS[2]), ("val_1.JPEG", WNIDS[0]), ("val_2.JPEG", WNIDS[2]),
           ("val_3.JPEG", WNIDS[1])]
    for name, _ in ann:
        Image.new("RGB", (64, 64), (10, 20, 30)).save(val / name)
    (base / "val" / "val_annotations.txt").write_text(
        "".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in ann))
    return ann


def test_tiny_imagenet_loads_official_layout(tmp_path: Path) -> None:
    ann = write_tiny(tmp_path)
    for data_dir in (tmp_path, tmp_path / "tiny-imagenet-200"):
        ds = load_dataset("tiny-imagenet", data_dir)
        assert ds.x_train.shape == (6, 3, 64, 64) and ds.x_train.dtype == torch.uint8
        assert ds.x_test.shape == (4, 3, 64, 64)
        assert ds.num_classes == 3 and ds.hflip
        assert ds.y_train.tolist() == [0, 0, 1, 1, 2, 2]  # wnids.txt order, not sorted order
        assert ds.y_test.tolist() == [WNIDS.index(w) for _, w in ann] == [2, 0, 2, 1]
        px = ds.x_train[4, :, 32, 32].int()  # class 2: (80, 100, 200), JPEG-approximate
        assert (px - torch.tensor([80, 100, 200])).abs().max() <= 3
        grey = ds.x_train[3, :, 32, 32].int()
        assert (grey - 90).abs().max() <= 2


def test_tiny_imagenet_bad_files(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    ann = base / "val" / "val_annotations.txt"
    good = ann.read_text()
    ann.write_text(good + "val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    usage_error("tiny-imagenet", tmp_path, str(ann))
    ann.write_text(good.replace("\t", " "))
    usage_error("tiny-imagenet", tmp_path, "tab-separated")
    ann.write_text(good)
    jpeg = base / "val" / "images" / "val_1.JPEG"
    jpeg.write_bytes(b"\xff\xd8 truncated")
    usage_error("tiny-imagenet", tmp_path, str(jpeg))
    (base / "wnids.txt").write_text("\n".join(WNIDS + ["n00000001"]) + "\n")
    usage_error("tiny-imagenet", tmp_path, str(base / "train" / "n00000001" / "images"))


def test_tiny_imagenet_missing_folder(tmp_path: Path) -> None:
    usage_error("tiny-imagenet", tmp_path, str(tmp_path / "tiny-imagenet-200"))
    usage_error("tiny-imagenet", None)


def test_registered_with_paper_defaults() -> None:
    for name in ("cifar10", "gtsrb", "tiny-imagenet"):
        entry = DATASETS[name]
        assert entry.needs_data_dir
        assert entry.profile.arch == "preactresnet18" and entry.profile.clean_ratio == 0.05
