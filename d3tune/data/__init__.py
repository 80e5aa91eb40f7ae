"""Datasets as tensors: uint8 NCHW images and int64 labels, plus what training needs to know.

Each dataset is one module that registers a loader ``load(data_dir) -> Dataset`` together
with its defaults (``Profile``). Real datasets read a local folder and never download anything.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from d3tune.errors import UsageError
from d3tune.registry import Registry, import_builtins


@dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory. Images are uint8 (N, C, H, W); labels int64 (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # mirror augmentation is only valid where classes are mirror-symmetric

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def fingerprint(self) -> str:
        """A short content hash: shapes, every label and a strided sample of training and test
        images. Why: a cached backdoored model must not be reused when the data changed (a
        different synthetic size, another copy of a dataset folder), and hashing every pixel of
        a large set would cost more than it protects."""
        import hashlib

        h = hashlib.sha256(repr((self.name, tuple(self.x_train.shape),
                                 tuple(self.x_test.shape), self.num_classes)).encode())
        for t in (self.y_train, self.y_test, self.x_train[:: max(1, len(self.x_train) // 64)],
                  self.x_test[:: max(1, len(self.x_test) // 16)]):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def to(self, device: torch.device | str) -> "Dataset":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Dataset(self.name, move(self.x_train), move(self.y_train), move(self.x_test),
                       move(self.y_test), self.num_classes, self.mean, self.std, self.hflip)


@dataclass(frozen=True)
class Profile:
    """Per-dataset defaults, used wherever a trial config leaves a field unset.

    Why per dataset: D3's behaviour depends on the number of optimiser steps, and 5 % of a
    1,400-image set is one batch per epoch, whereas 5 % of CIFAR-10 is ten. See README.
    """

    arch: str = "preactresnet18"
    attack_epochs: int = 100
    attack_batch_size: int = 128
    attack_lr: float = 0.01
    clean_ratio: float = 0.05
    defense_epochs: int = 100
    defense_batch_size: int = 256
    defense_lr: float = 0.01
    # (attack, epochs) pairs: attacks that need a longer schedule to plant their backdoor here
    attack_epochs_for: tuple[tuple[str, int], ...] = ()
    # training images used (a fixed class-stratified subset, ``subset_train``); None: all
    train_size: int | None = None

    def attack_epochs_of(self, attack: str) -> int:
        return dict(self.attack_epochs_for).get(attack, self.attack_epochs)


@dataclass(frozen=True)
class DatasetEntry:
    load: Callable[[Path | None], Dataset]
    profile: Profile
    needs_data_dir: bool


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register(name: str, profile: Profile, needs_data_dir: bool):
    def add(load: Callable[[Path | None], Dataset]):
        DATASETS.add(name, DatasetEntry(load, profile, needs_data_dir))
        return load

    return add


def load_dataset(name: str, data_dir: str | Path | None = None,
                 train_size: int | None = None) -> Dataset:
    """The named dataset, its training set cut to ``train_size`` images (``subset_train``).
    A dataset with a default location (``needs_data_dir`` False) still takes ``data_dir``."""
    entry = DATASETS[name]
    path: Path | None = None
    if entry.needs_data_dir and data_dir is None:
        raise UsageError(f"dataset {name!r} needs --data-dir (data.data_dir): a local folder")
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise UsageError(f"data.data_dir: {str(path)!r} is not a directory (dataset {name!r})")
    data = entry.load(path)
    return data if train_size is None else subset_train(data, train_size)


SUBSET_SEED = 0


def subset_train(data: Dataset, size: int) -> Dataset:
    """The first ``size`` images of a fixed class-stratified shuffle of the training set.

    Why fixed (not the trial's seed): like a dataset's own split, the subset is part of the
    data, so every trial of a sweep trains on the same images and a seed changes only what a
    seed changes elsewhere (poison selection, init, order). Why stratified: a 10,000-image cut
    of Fashion-MNIST keeps exactly 1,000 per class. The test set is never cut."""
    n = len(data.y_train)
    if size >= n:
        return data
    g = torch.Generator().manual_seed(SUBSET_SEED)
    # Shuffle, then order by rank within class so any prefix takes classes in turn.
    perm = torch.randperm(n, generator=g)
    y = data.y_train.cpu()[perm]
    rank = torch.empty(n, dtype=torch.int64)
    for c in y.unique():
        idx = (y == c).nonzero().flatten()
        rank[idx] = torch.arange(len(idx))
    order = perm[torch.sort(rank * data.num_classes + y, stable=True).indices][:size]
    order = order.sort().values.to(data.y_train.device)
    return replace(data, x_train=data.x_train[order].contiguous(),
                   y_train=data.y_train[order].contiguous())


TEST_SPLITS = ("all", "search", "holdout")


def half_indices(labels: torch.Tensor, part: str) -> torch.Tensor:
    """Sorted indices of ``part`` ("search" or "holdout") of a labelled set: two fixed halves,
    class-stratified (each class split as evenly as its count allows, the odd image going to
    "search"), under a fixed seed like ``subset_train``: the split is part of the data."""
    if part not in ("search", "holdout"):
        raise ValueError(f"test split {part!r}: expected 'search' or 'holdout'")
    y = labels.cpu()
    g = torch.Generator().manual_seed(SUBSET_SEED + 1)
    perm = torch.randperm(len(y), generator=g)
    take = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        idx = perm[(y[perm] == c).nonzero().flatten()]
        take[idx[: (len(idx) + 1) // 2]] = True
    mine = take if part == "search" else ~take
    return mine.nonzero().flatten().to(labels.device)


def split_test(data: Dataset, part: str) -> Dataset:
    """The dataset with its test set cut to ``part`` of ``TEST_SPLITS``. Why: a robust search
    scores its settings on test images; confirming the chosen one on the same images (other
    seeds or not) lets the selection's luck on those images pass for robustness. The training
    set, and so every backdoored model and its cache key, is untouched."""
    if part == "all":
        return data
    keep = half_indices(data.y_test, part)
    return replace(data, x_test=data.x_test[keep].contiguous(),
                   y_test=data.y_test[keep].contiguous())


def from_uint8_arrays(name: str, x_train, y_train, x_test, y_test, *, num_classes: int,
                      mean, std, hflip: bool) -> Dataset:
    """Build a Dataset from NCHW/NHWC-agnostic numpy or torch arrays (NCHW expected)."""
    as_img = lambda a: torch.as_tensor(a, dtype=torch.uint8).contiguous()  # noqa: E731
    as_lbl = lambda a: torch.as_tensor(a, dtype=torch.int64).contiguous()  # noqa: E731
    return Dataset(name, as_img(x_train), as_lbl(y_train), as_img(x_test), as_lbl(y_test),
                   num_classes, tuple(float(m) for m in mean), tuple(float(s) for s in std), hflip)


import_builtins(__name__, __path__)  # each module registers its method: one file each
