"""Backdoor attacks as batched tensor functions.

An attack is one module that registers an ``AttackEntry``: a frozen ``Params`` dataclass (its
trigger knobs, validated at the edge) and ``make(ctx) -> Trigger``. A ``Trigger`` maps a uint8
image batch to its triggered uint8 version; the same trigger poisons the training set and builds
the poisoned test set, so ASR and RA measure exactly the planted backdoor.

The selection of poisoned samples, relabelling (all-to-one / all-to-all) and the poisoned test
set are shared here, so an attack only says what its trigger looks like. Attacks that need more
than a fixed trigger plug in through optional hooks on ``AttackEntry`` instead of special cases:

- ``poison_train``: the training-time version of the trigger differs from the test-time one
  (label-consistent: adversarial perturbation + trigger on training images, trigger alone at test).
- ``extra_train``: the attack adds samples of its own (WaNet's "noise mode" cross samples).
- ``train_backdoor`` + ``restore``: a stateful attack whose trigger is learned *with* the
  classifier (Input-Aware). Its trigger carries ``state`` tensors; the trial stores them in the
  model cache under ``attack.`` and a cache hit rebuilds the trigger with ``restore``, so the
  evaluation applies exactly the trigger the model was trained with. Attacks whose trigger is
  merely expensive to compute (TrojanNN) use ``restore`` alone to skip the work on a cache hit.
- ``load_backdoor``: the backdoored model was trained elsewhere and is read from a file
  (``backdoorbench``: a BackdoorBench ``attack_result.pt``), together with its poisoned test set;
  nothing is poisoned or trained, and the trigger itself is never needed.

``Backdoor`` runs these steps lazily for one trial; ``poison`` is the one-shot form.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from d3tune.data import Dataset
from d3tune.errors import UsageError
from d3tune.registry import Registry, import_builtins

Trigger = Callable[[torch.Tensor], torch.Tensor]
STATE_PREFIX = "attack."  # cache-entry tensors with this prefix are the trigger's state


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
class StatefulTrigger:
    """A trigger built from learned or optimised tensors. ``state`` (name -> tensor) is what the
    attack's ``restore`` needs to rebuild ``apply``; the trial caches it next to the model."""

    apply: Trigger
    state: dict[str, torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)


@dataclass(frozen=True)
class Trainer:
    """The trial's backdoored-model training, handed to the attack: ``trainer(x, y, loss_fn=None,
    after_step=None) -> model`` trains a fresh model with the trial's optimiser, schedule,
    augmentation and seed on ``x, y`` (``loss_fn``/``after_step`` go to ``d3tune.train.fit``).
    ``epochs`` and ``batch_size`` let an attack schedule what it trains alongside."""

    run: Callable[..., nn.Module]
    epochs: int
    batch_size: int

    def __call__(self, x: torch.Tensor, y: torch.Tensor, **hooks: Any) -> nn.Module:
        return self.run(x, y, **hooks)


PoisonTrainFn = Callable[[AttackContext, Trigger, torch.Tensor, torch.Tensor], torch.Tensor]
ExtraTrainFn = Callable[[AttackContext, Trigger, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Generator], tuple[torch.Tensor, torch.Tensor]]
TrainBackdoorFn = Callable[[AttackContext, "AttackConfig", Trainer], tuple[nn.Module, Trigger]]
RestoreFn = Callable[[AttackContext, Mapping[str, torch.Tensor]], Trigger]


@dataclass(frozen=True)
class ImportedBackdoor:
    """A backdoored model trained outside d3tune, with the poisoned test set it was judged on.

    ``state_dict`` uses d3tune's parameter names for ``arch`` but may lack the ``normalize.*``
    buffers (the other tool normalised in its data pipeline): the trial builds the model with
    ``mean``/``std`` (the dataset's own when None). ``key`` (a content hash of the file) stands
    in for the cache key in results.
    """

    source: str
    key: str
    state_dict: dict[str, torch.Tensor]
    arch: str
    dataset: str | None  # d3tune's name for the data it was trained on (None: no loader)
    data_hint: str  # the tool's own name/path for that data, for error messages
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    x_bd_test: torch.Tensor  # uint8 (N, C, H, W)
    y_bd_target: torch.Tensor
    y_bd_true: torch.Tensor


LoadBackdoorFn = Callable[[Any], ImportedBackdoor]


@dataclass(frozen=True)
class AttackEntry:
    """A registered attack: its trigger factory, Params, and the optional hooks (module doc)."""

    make: Callable[[AttackContext], Trigger]
    params: type = NoParams
    clean_label: bool = False  # poison only target-class samples and keep their labels
    all2all: bool = True  # whether the all-to-all mode makes sense for this trigger
    # (ctx, trigger, x_selected, y_selected) -> poisoned training images; default: trigger(x)
    poison_train: PoisonTrainFn | None = None
    # (ctx, trigger, x_train, y_train, poison_mask, generator) -> (x_train', y_train'): the
    # poisoned training set with the attack's own extra samples appended
    extra_train: ExtraTrainFn | None = None
    # (ctx, cfg, train) -> (model, trained trigger): trains the classifier together with the trigger
    train_backdoor: TrainBackdoorFn | None = None
    # (ctx, state) -> trigger: rebuilds a StatefulTrigger from its cached state
    restore: RestoreFn | None = None
    # (params) -> ImportedBackdoor: the model comes from a file instead of being trained
    load_backdoor: LoadBackdoorFn | None = None


ATTACKS: Registry[AttackEntry] = Registry("attack")


def register(name: str, params: type = NoParams, clean_label: bool = False, all2all: bool = True,
             *, poison_train: PoisonTrainFn | None = None, extra_train: ExtraTrainFn | None = None,
             train_backdoor: TrainBackdoorFn | None = None, restore: RestoreFn | None = None,
             load_backdoor: LoadBackdoorFn | None = None):
    def add(make: Callable[[AttackContext], Trigger]):
        ATTACKS.add(name, AttackEntry(make, params, clean_label, all2all, poison_train,
                                      extra_train, train_backdoor, restore, load_backdoor))
        return make

    return add


def trained_attacks() -> list[str]:
    """Attacks that poison data and train a model (every one but the importers): what a
    benchmark over "all attacks" means."""
    return [n for n in ATTACKS.names() if ATTACKS[n].load_backdoor is None]


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


def trigger_state(trigger: Trigger) -> dict[str, torch.Tensor]:
    """The tensors a cache entry must keep to rebuild ``trigger`` (none for a fixed trigger)."""
    return dict(trigger.state) if isinstance(trigger, StatefulTrigger) else {}


def split_state(tensors: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A cache entry's tensors -> (model state dict, trigger state without the prefix)."""
    model = {k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)}
    state = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
    return model, state


def with_state(model_state: Mapping[str, torch.Tensor],
               state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``split_state``: one flat tensor dict for the cache."""
    return {**model_state, **{STATE_PREFIX + k: v for k, v in state.items()}}


class Backdoor:
    """One trial's attack, computed lazily so a cache hit skips the training-set work.

    Order of use: ``train`` (only when the backdoored model must be built) or ``restore`` (on a
    cache hit), then ``test_set``. Generator draws happen in a fixed order (trigger, then the
    poisoned subset, then extra samples), so a seed always gives the same poisoned data.
    """

    def __init__(self, dataset: Dataset, cfg: AttackConfig, generator: torch.Generator,
                 device: torch.device = torch.device("cpu")) -> None:
        entry = ATTACKS[cfg.name]
        if cfg.target >= dataset.num_classes:
            raise UsageError(f"attack.target: {cfg.target} is not a class of {dataset.name!r} "
                             f"(0..{dataset.num_classes - 1})")
        if cfg.mode == "all2all" and not entry.all2all:
            raise UsageError(f"attack.mode: {cfg.name!r} supports only 'all2one'")
        params = cfg.params if cfg.params is not None else entry.params()
        self.dataset, self.cfg, self.entry = dataset, cfg, entry
        self.ctx = AttackContext(dataset, params, cfg.target, generator, device)
        self._trigger: Trigger | None = None

    @property
    def trigger(self) -> Trigger:
        if self._trigger is None:
            self._trigger = self.entry.make(self.ctx)
        return self._trigger

    def restore(self, state: Mapping[str, torch.Tensor]) -> None:
        """Rebuild the trigger from a cache entry's state (no-op for fixed triggers)."""
        if not state:
            return
        if self.entry.restore is None:
            raise ValueError(f"attack {self.cfg.name!r} keeps no trigger state to restore")
        self._trigger = self.entry.restore(self.ctx, state)

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, poison_mask) the attacker trains on; extra samples have mask False."""
        d, cfg, entry = self.dataset, self.cfg, self.entry
        if entry.train_backdoor is not None:  # it poisons batches on the fly while training
            return d.x_train, d.y_train, torch.zeros_like(d.y_train, dtype=torch.bool)
        trigger = self.trigger  # drawn from the generator before the poisoned subset
        mask = choose_poisoned(d.y_train, cfg, entry.clean_label, self.ctx.generator)
        x, y = d.x_train.clone(), d.y_train.clone()
        if mask.any():
            chosen = x[mask]
            x[mask] = (entry.poison_train(self.ctx, trigger, chosen, y[mask])
                       if entry.poison_train is not None else trigger(chosen))
            if not entry.clean_label:
                y[mask] = backdoor_labels(y[mask], cfg, d.num_classes)
        if entry.extra_train is not None:
            x, y = entry.extra_train(self.ctx, trigger, x, y, mask, self.ctx.generator)
            mask = torch.cat([mask, mask.new_zeros(len(y) - len(mask))])
        return x, y, mask

    def train(self, train: Trainer) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """Build the backdoored model with the trial's ``train``; returns it and the trigger
        state to cache."""
        if self.entry.train_backdoor is not None:
            model, self._trigger = self.entry.train_backdoor(self.ctx, self.cfg, train)
        else:
            x, y, _ = self.training_set()
            model = train(x, y)
        return model, trigger_state(self.trigger)

    def test_set(self, dataset: Dataset | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(triggered images, target labels, true labels): every non-target test image for
        all-to-one, every test image for all-to-all; of ``dataset``'s test set when given (a
        split of the one the backdoor was built on: ``data.split_test``)."""
        d, cfg = dataset or self.dataset, self.cfg
        keep = (d.y_test != cfg.target) if cfg.mode == "all2one" else \
            torch.ones_like(d.y_test, dtype=torch.bool)
        y_true = d.y_test[keep]
        return self.trigger(d.x_test[keep]), backdoor_labels(y_true, cfg, d.num_classes), y_true


def poison(dataset: Dataset, cfg: AttackConfig, generator: torch.Generator,
           device: torch.device = torch.device("cpu")) -> Poisoned:
    """Poison the training set and build the poisoned test set in one go. For attacks with a
    ``train_backdoor`` hook (trigger learned with the classifier) the training set is clean and the
    trigger is the untrained one: use ``Backdoor.train`` to build such a backdoor."""
    b = Backdoor(dataset, cfg, generator, device)
    x, y, mask = b.training_set()
    x_bd, y_target, y_true = b.test_set()
    return Poisoned(x, y, mask, x_bd, y_target, y_true, b.trigger)


def scaled(size: int, base: int, at: int = 32) -> int:
    """A trigger dimension defined for ``at``-pixel images, scaled to ``size`` (at least 1)."""
    return max(1, round(base * size / at))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float pixels on the 0..255 scale -> uint8, rounded and clipped (a trigger's last step)."""
    return x.round().clamp_(0, 255).to(torch.uint8)


def seed_from(generator: torch.Generator) -> int:
    """A child seed drawn from the trial's generator, for work that needs its own RNG."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


import_builtins(__name__, __path__)  # each module registers its method: one file each
