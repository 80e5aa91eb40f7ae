"""Import a backdoored model that BackdoorBench trained (its ``attack_result.pt``).

Why: the D3 paper's numbers come from BackdoorBench checkpoints, so running D3 on exactly those
models is the most direct comparison. Why this care: ``attack_result.pt`` is a pickle, and a
pickle can run arbitrary code when loaded. We load it only with ``torch.load(weights_only=True)``,
allowing exactly the numpy globals a genuine file needs (../shared/VERIFIED.md): numpy's array
reconstruction, scalars, ``dtype`` and the numeric dtype classes. Anything else in the file is
refused before it can run, and reported as a one-line ``UsageError`` naming the path.

The poisoned test images are PNG files that BackdoorBench wrote next to the record
(``<record>/bd_test_dataset/<label>/<index>.png``); the paths stored in the file are relative
to where the attack ran, so they are resolved against the folder of the ``.pt`` file (first as
stored, then from their ``bd_test_dataset`` component on). Reading them with Pillow happens
once, at the edge; everything after is uint8 NCHW tensors.
"""
from __future__ import annotations

import logging
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from d3tune.errors import UsageError

log = logging.getLogger(__name__)

# BackdoorBench model name -> ours. Same layer names and shapes (see d3tune/models).
MODEL_NAMES = {"preactresnet18": "preactresnet18", "vgg19_bn": "vgg19_bn"}
UNSUPPORTED_MODELS = {
    "vit_b_16": "an ImageNet-pretrained ViT-B/16 on 224-pixel inputs; d3tune's ViT is the small "
                "'vit_small', whose weights differ",
    "vgg19": "VGG-19 without BatchNorm; d3tune has 'vgg19_bn' only",
}
# BackdoorBench dataset name -> ours, and BackdoorBench's normalisation for it
# (utils/aggregate_block/dataset_and_transform_generate.py: get_dataset_normalization). The
# imported model expects its inputs normalised like this, so build it with these mean/std.
DATASET_NAMES = {"cifar10": "cifar10", "gtsrb": "gtsrb", "tiny": "tiny_imagenet"}
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
BD_TEST_FOLDER = "bd_test_dataset"


def _safe_numpy_globals() -> list[Any]:
    """Exactly what a genuine record needs besides tensors: numpy array reconstruction, numpy
    scalars, ``numpy.dtype`` and the numeric dtype classes. The same objects are also allowed
    under their NumPy 1.x names (``numpy.core.multiarray``), which records written with NumPy 1
    spell; nothing else is allowed."""
    from numpy._core import multiarray

    dtype_classes = [type(np.dtype(t)) for t in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64")]
    return [multiarray._reconstruct, multiarray.scalar, np.dtype, np.ndarray, *dtype_classes,
            (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (multiarray.scalar, "numpy.core.multiarray.scalar")]


@dataclass(frozen=True)
class AttackResult:
    """A BackdoorBench attack record, as tensors.

    ``state_dict`` keeps BackdoorBench's parameter names, which are ours for the supported
    architectures; it has no ``normalize.*`` buffers (BackdoorBench normalises in its data
    transforms), so build our model with ``mean``/``std`` below and load with those two keys
    missing. Poisoned test images are uint8 (N, C, H, W) in the order of their original test
    index.
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    model_name: str  # BackdoorBench's name
    arch: str  # d3tune's architecture registry name
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    clean_data: str  # BackdoorBench's dataset name (e.g. 'cifar10')
    dataset: str | None  # d3tune's dataset name, or None if d3tune has no loader for it
    data_path: str  # where BackdoorBench read the clean data (as recorded)
    mean: tuple[float, ...] | None  # BackdoorBench's normalisation for the dataset, if known
    std: tuple[float, ...] | None
    x_bd_test: torch.Tensor  # uint8 (N, C, H, W)
    y_bd_target: torch.Tensor  # int64 (N,): the label the attacker wants (ASR)
    y_bd_true: torch.Tensor  # int64 (N,): the original label (RA)
    bd_test_index: torch.Tensor  # int64 (N,): index of each image in the clean test set
    poison_train_index: torch.Tensor | None  # int64: poisoned training indices, if recorded


def _fail(path: Path, why: str) -> UsageError:
    return UsageError(f"{path}: {' '.join(str(why).split())}")


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6: a zip holding <name>/data.pkl
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)  # how the older format begins


def _not_a_checkpoint(path: Path) -> str | None:
    """Why the file cannot be a torch checkpoint, judged from its bytes alone (None: it may be).

    Why look first: torch's own errors for such files say nothing a user can act on (an empty
    reason, "Unsupported operand 73", an internal miniz message) or escape as a KeyError."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_MAGIC))
    except OSError as exc:
        return f"cannot read it ({exc.strerror or type(exc).__name__})"
    if not head:
        return "empty file, not a torch checkpoint"
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return ("truncated or damaged: it begins like the zip archive torch.save writes but "
                    "does not end like one (an incomplete download or copy?)")
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            return f"damaged zip archive, not a readable torch checkpoint ({exc})"
        if not any(n.endswith("/data.pkl") for n in names):
            return "a zip archive without data.pkl, not a torch checkpoint"
        return None
    if head[:1] == b"\x80" and head[2:] == LEGACY_MAGIC[2:]:
        return None
    return ("not a torch checkpoint: neither the zip archive torch.save writes nor torch's older "
            "pickle format")


def _unpickler_reason(exc: Exception) -> str:
    """The weights-only unpickler's own reason, without torch's advice on unsafe loading."""
    _, _, tail = str(exc).partition("WeightsUnpickler error:")
    tail = tail.split("Check the documentation")[0]
    line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
    return re.split(r" was not an allowed|\.? Please use", line)[0].strip()[:160]


def _first_sentence(exc: Exception) -> str:
    text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", " ".join(str(exc).split()))
    text = text.split(". ")[0].strip()[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _load_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _fail(path, "no such file (expected a BackdoorBench attack_result.pt)")
    why_not = _not_a_checkpoint(path)
    if why_not is not None:
        raise _fail(path, why_not)
    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()), warnings.catch_warnings():
            # torch warns about the pickle protocol of files it then refuses: noise for users.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = _unpickler_reason(exc)
        if "GLOBAL" in why or "allowlisted" in why:
            raise _fail(path, f"refused to load: it needs code beyond tensors, numpy arrays and "
                              f"plain values, so it is not a genuine BackdoorBench record ({why})"
                        ) from None
        raise _fail(path, "not a readable torch checkpoint: its pickle is damaged or uses what "
                          "a safe load does not read" + (f" ({why})" if why else "")) from None
    except Exception as exc:  # noqa: BLE001 -- any failure to parse a user's file is a usage error
        raise _fail(path, f"not a readable torch checkpoint ({_first_sentence(exc)})") from None
    if not isinstance(record, Mapping):
        raise _fail(path, f"expected a dict (BackdoorBench attack_result), got "
                          f"{type(record).__name__}")
    return dict(record)


def _field(record: Mapping[str, Any], path: Path, *keys: str) -> Any:
    node: Any = record
    for i, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            raise _fail(path, f"missing field {'.'.join(keys[: i + 1])!r} (not a BackdoorBench "
                              f"attack_result.pt?)")
        node = node[key]
    return node


def _image_shape(img_size: Any, path: Path) -> tuple[int, int, int]:
    try:
        h, w, c = (int(v) for v in img_size)
    except (TypeError, ValueError):
        raise _fail(path, f"img_size {img_size!r} is not (H, W, C)") from None
    if c not in (1, 3) or h < 1 or w < 1:
        raise _fail(path, f"img_size {img_size!r} is not (H, W, C) with C 1 or 3")
    return c, h, w


def _resolve_image(stored: str, folder: Path, path: Path) -> Path:
    """An image path from the record: as stored (absolute, or relative to the record's folder),
    else its part from ``bd_test_dataset`` on, under the record's folder."""
    p = Path(stored)
    candidates = [p if p.is_absolute() else folder / p]
    parts = p.parts
    if BD_TEST_FOLDER in parts:
        candidates.append(folder.joinpath(*parts[parts.index(BD_TEST_FOLDER):]))
    for c in candidates:
        if c.is_file():
            return c
    raise _fail(path, f"poisoned test image {stored!r} not found (looked at "
                      f"{', '.join(str(c) for c in candidates)})")


def _read_png(file: Path, shape: tuple[int, int, int], path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    if file.suffix.lower() != ".png":
        raise _fail(path, f"poisoned test image {file} is not a .png file")
    try:
        with Image.open(file) as img:
            arr = np.asarray(img.convert("RGB" if c == 3 else "L"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise _fail(file, f"unreadable PNG ({exc})") from None
    if arr.shape[:2] != (h, w):
        raise _fail(file, f"image is {arr.shape[1]}x{arr.shape[0]}, the record says {w}x{h}")
    return arr.reshape(h, w, c)


def _bd_test(record: Mapping[str, Any], shape: tuple[int, int, int], folder: Path,
             path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data_dict = _field(record, path, "bd_test", "bd_data_container", "data_dict")
    if not isinstance(data_dict, Mapping) or not data_dict:
        raise _fail(path, "bd_test.bd_data_container.data_dict is empty or not a dict")
    images, targets, trues, index = [], [], [], []
    for key in sorted(data_dict, key=int):
        item = data_dict[key]
        try:
            stored, (target, true) = str(item["path"]), item["other_info"][:2]
            target, true = int(target), int(true)
        except (KeyError, TypeError, ValueError, IndexError):
            raise _fail(path, f"bd_test entry {key!r} has no path/other_info [poisoned label, "
                              f"original label]") from None
        images.append(_read_png(_resolve_image(stored, folder, path), shape, path))
        targets.append(target)
        trues.append(true)
        index.append(int(key))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    as_long = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return x, as_long(targets), as_long(trues), as_long(index)


def _poison_train_index(record: Mapping[str, Any]) -> torch.Tensor | None:
    bd_train = record.get("bd_train")
    if not isinstance(bd_train, Mapping) or bd_train.get("poison_indicator") is None:
        return None
    indicator = np.asarray(bd_train["poison_indicator"])
    return torch.from_numpy(np.flatnonzero(indicator == 1).astype(np.int64))


@dataclass(frozen=True)
class Header:
    """What a record says about its model and data, without reading the poisoned test images:
    enough to fill a trial's dataset and architecture and to check them (``d3tune run``)."""

    model_name: str
    arch: str
    num_classes: int
    image_shape: tuple[int, int, int]
    clean_data: str
    dataset: str | None
    data_path: str


def _header(record: Mapping[str, Any], path: Path) -> Header:
    model_name = str(_field(record, path, "model_name"))
    if model_name in UNSUPPORTED_MODELS:
        raise _fail(path, f"model {model_name!r} is not supported: "
                          f"{UNSUPPORTED_MODELS[model_name]}")
    if model_name not in MODEL_NAMES:
        raise _fail(path, f"model {model_name!r} is not supported; supported BackdoorBench "
                          f"models: {', '.join(sorted(MODEL_NAMES))}")
    try:
        num_classes = int(_field(record, path, "num_classes"))
    except (TypeError, ValueError):
        raise _fail(path, "field 'num_classes' is not an integer") from None
    shape = _image_shape(_field(record, path, "img_size"), path)
    clean_data = str(_field(record, path, "clean_data"))
    return Header(model_name, MODEL_NAMES[model_name], num_classes, shape, clean_data,
                  DATASET_NAMES.get(clean_data), str(record.get("data_path", "")))


def read_header(path: str | Path) -> Header:
    """The record's model and data description (safe load; the PNGs are not read)."""
    path = Path(path).expanduser()
    return _header(_load_record(path), path)


def load_attack_result(path: str | Path) -> AttackResult:
    """Load ``attack_result.pt`` (and its ``bd_test_dataset`` PNGs) without running its code.

    Raises ``UsageError`` (one line, naming the file) for anything that cannot be read safely:
    a missing or corrupt file, a pickle needing globals other than the allowed numpy ones, a
    missing field, an unsupported model, a missing or malformed image.
    """
    path = Path(path).expanduser()
    record = _load_record(path)
    head = _header(record, path)
    state = _field(record, path, "model")
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise _fail(path, "field 'model' is not a state dict of tensors")
    x, y_target, y_true, index = _bd_test(record, head.image_shape, path.parent, path)
    mean, std = NORMALIZATION.get(head.clean_data, (None, None))
    log.info("loaded %s: %s on %s, %d poisoned test images", path, head.model_name,
             head.clean_data, len(x))
    return AttackResult(
        path=path, state_dict=dict(state), model_name=head.model_name, arch=head.arch,
        num_classes=head.num_classes, image_shape=head.image_shape, clean_data=head.clean_data,
        dataset=head.dataset, data_path=head.data_path, mean=mean, std=std, x_bd_test=x,
        y_bd_target=y_target, y_bd_true=y_true, bd_test_index=index,
        poison_train_index=_poison_train_index(record))
