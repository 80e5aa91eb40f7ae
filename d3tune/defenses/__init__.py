"""Post-training defenses, one module each, all with the same signature.

``run(model, x_clean, y_clean, cfg, ctx)`` changes ``model`` in place using only the small clean
set, calling ``ctx.on_epoch(epoch, logs)`` after every epoch so the caller can evaluate, report
to Tune and stop early. Defense-specific knobs live in the module's frozen ``Params``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from d3tune.registry import Registry
from d3tune.train import Augment


@dataclass(frozen=True)
class NoParams:
    """For defenses without knobs beyond the common ones."""


@dataclass(frozen=True)
class DefenseConfig:
    """Common optimisation knobs; None means the dataset profile's default (see data.Profile)."""

    name: str = "d3"
    epochs: int | None = field(default=None, metadata={"ge": 1})
    lr: float | None = field(default=None, metadata={"gt": 0.0})
    batch_size: int | None = field(default=None, metadata={"ge": 1})
    momentum: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0})
    weight_decay: float = field(default=0.0, metadata={"ge": 0.0})
    params: Any = None


@dataclass(frozen=True)
class DefenseContext:
    """What the runner gives a defense besides the model and the clean data."""

    num_classes: int
    head: str  # the architecture's classifier head (D3's default selected layer)
    aug: Augment
    generator: torch.Generator
    device: torch.device
    on_epoch: Callable[[int, dict[str, float]], bool | None]
    resume: dict[str, Any] | None = None  # a state ``save`` produced: continue from there
    save: Callable[[dict[str, Any]], None] | None = None  # checkpoint after every epoch


DefenseFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, DefenseConfig, DefenseContext], None]


@dataclass(frozen=True)
class DefenseEntry:
    run: DefenseFn
    params: type = NoParams


DEFENSES: Registry[DefenseEntry] = Registry("defense")


def register(name: str, params: type = NoParams):
    def add(run: DefenseFn) -> DefenseFn:
        DEFENSES.add(name, DefenseEntry(run, params))
        return run

    return add


def params_of(cfg: DefenseConfig) -> Any:
    return cfg.params if cfg.params is not None else DEFENSES[cfg.name].params()


from d3tune.defenses import anp, d3, fp, fst, ft, ft_sam, ibau, nad, sau  # noqa: E402,F401  (importing registers)
