"""CIFAR-10 from a local copy of the official "python version" (cifar-10-batches-py).

Why a restricted unpickler: the batches are pickles, and unpickling a file someone handed us
runs whatever callables it names. A real batch only needs numpy's array reconstruction (and,
for batches re-written under Python 3 with protocol 2, ``_codecs.encode`` for bytes; with
protocol 5, numpy's ``_frombuffer``), so every other global is refused before it is ever looked
up, let alone called.

Why str keys too: the official files are Python 2 pickles whose keys load as bytes (``b'data'``),
but torchvision's reader loads them with ``encoding="latin1"``, which makes them str, and tools
built on it re-pickle the batches in that form. Both are the same data.
"""
from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from d3tune.data import Dataset, Profile, from_uint8_arrays, register
from d3tune.data.images import one_line
from d3tune.errors import UsageError

log = logging.getLogger(__name__)

NAME = "cifar10"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
NUM_CLASSES = 10
SIDE = 32
ROW = 3 * SIDE * SIDE  # one image: the R, G, B planes, each row-major
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PROFILE = Profile()  # the paper's defaults were tuned on CIFAR-10


def _multiarray_reconstruct() -> Any:
    try:  # numpy >= 2; importing numpy.core there only warns about a deprecated alias
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _frombuffer() -> Any:
    try:  # numpy >= 2
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _codecs_encode() -> Any:
    import _codecs

    return _codecs.encode


# (module, name) -> how to get the object. Both numpy spellings map to the installed one, so a
# batch pickled under numpy 1.x loads under numpy 2 and vice versa.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5 (Python 3.14's default)
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _Refused(Exception):
    """A global outside the allow-list; carries the dotted name for the user-facing message."""


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        getter = _ALLOWED.get((module, name))
        if getter is None:
            raise _Refused(f"{module}.{name}")
        return getter()


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    bad = f"{NAME}: {path} is not a CIFAR-10 python batch"
    if not path.is_file():
        raise UsageError(f"{NAME}: {path} not found: expected the official CIFAR-10 python layout "
                         f"({FOLDER}/data_batch_1..5, test_batch)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{NAME}: cannot read {path}: {one_line(e.strerror or e)}") from None
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as e:
        raise UsageError(f"{bad}: refusing to unpickle {str(e)!r}") from None
    except Exception as e:  # noqa: BLE001 -- any failure to parse a user's file is a usage error
        raise UsageError(f"{bad}: {type(e).__name__}: {one_line(e)}") from None

    if not isinstance(batch, dict):
        raise UsageError(f"{bad}: expected a dict, got {type(batch).__name__}")
    data, labels = _entry(batch, "data"), _entry(batch, "labels")
    if data is None or labels is None:
        raise UsageError(f"{bad}: expected keys 'data' and 'labels' (str or bytes), got "
                         f"{', '.join(sorted(map(repr, batch)))}")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == ROW):
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise UsageError(f"{bad}: expected 'data' a uint8 array of shape (N, {ROW}), got "
                         f"{dtype} {shape}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{bad}: expected 'labels' a list of ints") from None
    if y.shape != (len(data),):
        raise UsageError(f"{bad}: expected {len(data)} labels, got shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise UsageError(f"{bad}: labels must be in 0..{NUM_CLASSES - 1}, "
                         f"got {int(y.min())}..{int(y.max())}")
    return data.reshape(-1, 3, SIDE, SIDE), y


def _entry(batch: dict, key: str) -> Any:
    """``batch[b'key']`` as the official files spell it, else ``batch['key']``."""
    value = batch.get(key.encode())
    return batch.get(key) if value is None else value


def _batches_dir(data_dir: Path) -> Path:
    for candidate in (data_dir / FOLDER, data_dir):
        if (candidate / TEST_FILE).exists() or (candidate / TRAIN_FILES[0]).exists():
            return candidate
    raise UsageError(f"{NAME}: {data_dir / FOLDER} not found: expected the official CIFAR-10 "
                     f"python layout ({FOLDER}/data_batch_1..5, test_batch) in data_dir or as it")


@register(NAME, PROFILE, needs_data_dir=True)
def load(data_dir: Path | None) -> Dataset:
    if data_dir is None:
        raise UsageError(f"dataset {NAME!r} needs --data-dir (data.data_dir): a local folder")
    root = _batches_dir(Path(data_dir))
    train = [_read_batch(root / f) for f in TRAIN_FILES]
    x_test, y_test = _read_batch(root / TEST_FILE)
    x_train = np.concatenate([x for x, _ in train])  # a fresh, writable array
    y_train = np.concatenate([y for _, y in train])
    log.info("cifar10: %d train / %d test images from %s", len(x_train), len(x_test), root)
    return from_uint8_arrays(NAME, x_train, y_train, np.ascontiguousarray(x_test).copy(), y_test,
                             num_classes=NUM_CLASSES, mean=MEAN, std=STD, hflip=True)
