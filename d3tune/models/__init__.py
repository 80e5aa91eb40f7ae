"""Architectures by name. Every model normalises its own input, so attacks see raw pixels.

A model takes images as uint8 (0..255) or float (0..1) NCHW tensors; its first module,
``Normalize``, converts and standardises them. Each registry entry also names the model's
classifier head, the module D3 selects by default.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from d3tune.registry import Registry, import_builtins


class Normalize(nn.Module):
    """uint8 or [0, 1] float images -> standardised float. Kept as buffers so it moves with .to()."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class ModelSpec:
    """What a constructor needs to know about the data."""

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[ModelSpec], nn.Module]
    head: str  # name of the classifier-head module (D3's default selected layer)


MODELS: Registry[ModelEntry] = Registry("architecture")


def register(name: str, head: str):
    def add(build: Callable[[ModelSpec], nn.Module]):
        MODELS.add(name, ModelEntry(build, head))
        return build

    return add


ARCH_ATTR = "d3tune_arch"  # set on every model build_model returns: its registry name


def build_model(name: str, spec: ModelSpec) -> nn.Module:
    """Build architecture ``name`` and tag it with that name, so code handed only the module
    (``d3tune.defend``) still finds its registered classifier head."""
    model = MODELS[name].build(spec)
    setattr(model, ARCH_ATTR, name)
    return model


import_builtins(__name__, __path__)  # each module registers its method: one file each
