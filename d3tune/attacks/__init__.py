"""Backdoor attacks as batched tensor functions.

An attack is one module that registers an ``AttackEntry``: a frozen ``Params`` dataclass (its
trigger knobs, validated at the edge) and ``make(ctx) -> Trigger``. A ``Trigger`` maps a uint8
image batch to its triggered uint8 version; the same trigger poisons the training set and builds
the poisoned test set, so ASR and RA measure exactly the planted backdoor.

The selection of poisoned samples, relabelling (all-to-one / all-to-all) and the poisoned test
set are shared here, so an attack only says what its trigger looks like.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from d3tune.data import Dataset
from d3tune.errors import UsageError
from d3tune.registry import Registry

Trigger = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NoParams:
    """For attacks without knobs of their own."""


@dataclass(frozen=True)
class AttackContext:
    """Everything a trigger may depend on; the generator makes it reproducible from the seed."""

    dataset: Dataset
    params: Any
    target: int
    generator: torch.Generator
    device: torch.device = torch.device("cpu")


@dataclass(frozen=True)
class AttackEntry:
    make: Callable[[AttackContext], Trigger]
    params: type = NoParams
    clean_label: bool = False  # poison only target-class samples and keep their labels
    all2all: bool = True  # whether the all-to-all mode makes sense for this trigger


ATTACKS: Registry[AttackEntry] = Registry("attack")


def register(name: str, params: type = NoParams, clean_label: bool = False, all2all: bool = True):
    def add(make: Callable[[AttackContext], Trigger]):
        ATTACKS.add(name, AttackEntry(make, params, clean_label, all2all))
        return make

    return add


@dataclass(frozen=True)
class AttackConfig:
    """Which attack and how much poison. ``params`` is the attack's own frozen Params."""

    name: str = "badnets"
    ratio: float = field(default=0.1, metadata={"ge": 0.0, "le": 1.0})
    target: int = field(default=0, metadata={"ge": 0})
    mode: str = field(default="all2one", metadata={"choices": ("all2one", "all2all")})
    params: Any = None


@dataclass(frozen=True)
class Poisoned:
    """The attacker's training set and the poisoned test set (non-target images, triggered)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    poison_mask: torch.Tensor  # bool (N,), True where the training sample carries the trigger
    x_bd_test: torch.Tensor
    y_bd_target: torch.Tensor  # the label the attacker wants (ASR)
    y_bd_true: torch.Tensor  # the true label (RA)
    trigger: Trigger


def backdoor_labels(labels: torch.Tensor, cfg: AttackConfig, num_classes: int) -> torch.Tensor:
    if cfg.mode == "all2all":
        return (labels + 1) % num_classes
    return torch.full_like(labels, cfg.target)


def choose_poisoned(labels: torch.Tensor, cfg: AttackConfig, clean_label: bool,
                    generator: torch.Generator) -> torch.Tensor:
    """A bool mask of exactly round(ratio * N) samples (fewer if a clean-label attack runs out of
    target-class samples), drawn uniformly with the trial's generator."""
    n = len(labels)
    want = int(round(cfg.ratio * n))
    pool = torch.arange(n)
    if clean_label:
        pool = pool[labels.cpu() == cfg.target]
    # Otherwise BackdoorBench samples from all classes (target-class picks keep their label).
    pick = pool[torch.randperm(len(pool), generator=generator)[: min(want, len(pool))]]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[pick] = True
    return mask.to(labels.device)


def poison(dataset: Dataset, cfg: AttackConfig, generator: torch.Generator,
           device: torch.device = torch.device("cpu")) -> Poisoned:
    entry = ATTACKS[cfg.name]
    if cfg.target >= dataset.num_classes:
        raise UsageError(f"attack.target: {cfg.target} is not a class of {dataset.name!r} "
                         f"(0..{dataset.num_classes - 1})")
    if cfg.mode == "all2all" and not entry.all2all:
        raise UsageError(f"attack.mode: {cfg.name!r} supports only 'all2one'")
    params = cfg.params if cfg.params is not None else entry.params()
    trigger = entry.make(AttackContext(dataset, params, cfg.target, generator, device))

    mask = choose_poisoned(dataset.y_train, cfg, entry.clean_label, generator)
    x_train = dataset.x_train.clone()
    y_train = dataset.y_train.clone()
    if mask.any():
        x_train[mask] = trigger(x_train[mask])
        if not entry.clean_label:
            y_train[mask] = backdoor_labels(y_train[mask], cfg, dataset.num_classes)

    keep = (dataset.y_test != cfg.target) if cfg.mode == "all2one" else \
        torch.ones_like(dataset.y_test, dtype=torch.bool)
    x_bd = trigger(dataset.x_test[keep])
    y_true = dataset.y_test[keep]
    return Poisoned(x_train, y_train, mask, x_bd, backdoor_labels(y_true, cfg, dataset.num_classes),
                    y_true, trigger)


def scaled(size: int, base: int, at: int = 32) -> int:
    """A trigger dimension defined for ``at``-pixel images, scaled to ``size`` (at least 1)."""
    return max(1, round(base * size / at))


from d3tune.attacks import badnets, blended  # noqa: E402,F401  (importing registers)
