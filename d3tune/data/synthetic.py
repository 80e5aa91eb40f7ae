"""A generated CIFAR-shaped set (3x32x32, 10 classes) for fast tests of CIFAR-sized models.

Why generated: tests and GPU benchmarks need CIFAR's shape without a download. Each class is a
fixed smooth colour template; samples add a random brightness and pixel noise, so the task
is learnable but not trivial. Fully determined by its sizes (fixed seed).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from d3tune.data import Dataset, Profile, from_uint8_arrays, register

SEED = 1234
PROFILE = Profile(arch="preactresnet18", attack_epochs=10, attack_batch_size=128, attack_lr=0.01,
                  clean_ratio=0.05, defense_epochs=20, defense_batch_size=128, defense_lr=0.01)


def make(n_train: int = 2000, n_test: int = 500, num_classes: int = 10, size: int = 32,
         seed: int = SEED) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        x = templates[labels]
        x = x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g))
        x = x + 0.25 * torch.randn(x.shape, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    mean = x_train.float().mean(dim=(0, 2, 3)).div(255).tolist()
    std = x_train.float().std(dim=(0, 2, 3)).div(255).tolist()
    return from_uint8_arrays("synthetic", x_train, y_train, x_test, y_test,
                             num_classes=num_classes, mean=mean, std=std, hflip=True)


@register("synthetic", PROFILE, needs_data_dir=False)
def load(data_dir: Path | None = None) -> Dataset:
    # Size can be raised for GPU benchmarks (e.g. D3TUNE_SYNTHETIC_TRAIN=50000).
    return make(n_train=int(os.environ.get("D3TUNE_SYNTHETIC_TRAIN", 2000)),
                n_test=int(os.environ.get("D3TUNE_SYNTHETIC_TEST", 500)))
