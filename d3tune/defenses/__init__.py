"""Post-training defenses, one module each, all with the same signature.

``run(model, x_clean, y_clean, cfg, ctx)`` changes ``model`` in place using only the small clean
set, calling ``ctx.on_epoch(epoch, logs)`` after every epoch so the caller can evaluate, report
to Tune and stop early. Defense-specific knobs live in the module's frozen ``Params``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from d3tune.registry import Registry, import_builtins
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
# The same defense on M members at once (d3tune/batched.py): models, clean sets and contexts
# one per member, trained in place, each as ``run`` would train it alone.
BatchedDefenseFn = Callable[[Sequence[nn.Module], Sequence[torch.Tensor], Sequence[torch.Tensor],
                             DefenseConfig, Sequence[DefenseContext]], None]


@dataclass(frozen=True)
class DefenseEntry:
    """A defense and what the rest of d3tune needs to know about it, kept beside its code (as
    timm keeps a model's config beside the model), so a plugin defense joins a leaderboard or
    ``d3tune.defend`` with no edit to d3tune.

    ``space``: its search space for leaderboards ({"defense.<knob>": distribution}), ranges
    around its own defaults that contain them; None: a leaderboard spec must give one.
    ``uses_head``: it works on the classifier head (``ctx.head``); ``head_knob`` names the
    param that overrides it (``d3tune.defend`` on a foreign model needs one or the other).
    ``citation``: the paper, one line. ``cost``: seconds of one member evaluation relative to
    D3's, as measured on digits (docs/results/leaderboard_b2): a leaderboard without a
    ``defenses`` list runs the method first, then the cheapest first. ``fast``: ``Params``
    knobs that make the method cheap while every step of it still runs (its smoke tests use
    them, so a new defense brings its own and no test needs an edit). ``batched``: the method
    on several members as one batched computation, where it has one (robust searches'
    ``member_batch``)."""

    run: DefenseFn
    params: type = NoParams
    space: Mapping[str, Any] | None = None
    uses_head: bool = False
    head_knob: str | None = None
    citation: str = ""
    cost: float = 1.0
    fast: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    batched: BatchedDefenseFn | None = None


DEFENSES: Registry[DefenseEntry] = Registry("defense")

# The common fine-tuning schedule's ranges (the profile's defaults on digits: lr 0.01, 40
# epochs, batch 32), shared by the spaces of the defenses that use it. ANP, I-BAU and SAU run
# their own optimisers and do not search them.
FINETUNE_SPACE: Mapping[str, Any] = MappingProxyType({
    "defense.lr": {"loguniform": [0.002, 0.05]},
    "defense.epochs": {"int": [20, 60]},
    "defense.batch_size": {"choice": [16, 32, 64]},
})


def register(name: str, params: type = NoParams, *, space: Mapping[str, Any] | None = None,
             uses_head: bool = False, head_knob: str | None = None, citation: str = "",
             cost: float = 1.0, fast: Mapping[str, Any] | None = None,
             batched: BatchedDefenseFn | None = None):
    def add(run: DefenseFn) -> DefenseFn:
        DEFENSES.add(name, DefenseEntry(run, params, MappingProxyType(dict(space))
                                        if space is not None else None,
                                        uses_head or head_knob is not None, head_knob,
                                        citation, cost, MappingProxyType(dict(fast or {})),
                                        batched))
        return run

    return add


def leaderboard_order(names: list[str] | tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The order a leaderboard runs defenses in when its spec lists none: D3 (the method)
    first, then by measured cost, cheapest first (ANP, the slowest, last)."""
    names = list(DEFENSES.names() if names is None else names)
    return tuple(sorted(names, key=lambda n: (n != "d3", DEFENSES[n].cost, n)))


def params_of(cfg: DefenseConfig) -> Any:
    return cfg.params if cfg.params is not None else DEFENSES[cfg.name].params()


import_builtins(__name__, __path__)  # each module registers its method: one file each
