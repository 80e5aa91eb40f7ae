"""Trial configuration: frozen dataclasses, built and validated once from plain data.

Specs (YAML, CLI flags, Tune's sampled configs) are nested dicts. ``trial_config`` turns one into
a ``TrialConfig`` or raises ``UsageError`` naming the dotted field and what was expected; inner
code never sees raw dicts. Unknown keys are errors with a did-you-mean. Range and choice rules
sit next to each field as dataclass metadata (ge, gt, le, lt, choices).

Attack and defense sections are flat for users (``defense: {name: d3, lr: 0.01, eps: 0.1}``):
keys that are not common fields go to the chosen method's own ``Params`` dataclass.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from d3tune.attacks import ATTACKS, AttackConfig
from d3tune.data import DATASETS, TEST_SPLITS, Profile
from d3tune.defenses import DEFENSES, DefenseConfig
from d3tune.errors import UsageError, did_you_mean
from d3tune.eval_schedule import DEFAULT_EVAL_SHARE
from d3tune.models import MODELS


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    data_dir: str | None = None
    clean_ratio: float | None = field(default=None, metadata={"gt": 0.0, "le": 1.0})
    clean_count: int | None = field(default=None, metadata={"ge": 1})  # overrides clean_ratio
    # training images kept (a fixed stratified subset); None: the profile's (all, unless the
    # profile cuts a large set for CPU budgets); a value >= the set's size keeps every image
    train_size: int | None = field(default=None, metadata={"ge": 10})
    # which test images score the trial: all, or one of two fixed class-stratified halves
    # (``split_test``), so a robust search and its holdout never score on the same images
    test_split: str = field(default="all", metadata={"choices": TEST_SPLITS})


@dataclass(frozen=True)
class ModelConfig:
    arch: str | None = None  # None: the dataset profile's architecture


@dataclass(frozen=True)
class TrainConfig:
    """How the attacker trains the backdoored model."""

    epochs: int | None = field(default=None, metadata={"ge": 1})
    batch_size: int | None = field(default=None, metadata={"ge": 1})
    lr: float | None = field(default=None, metadata={"gt": 0.0})
    momentum: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0})
    weight_decay: float = field(default=5e-4, metadata={"ge": 0.0})


# Per-epoch evaluation subset size, per test set (clean; poisoned). Why 256: a stratified sample
# of 256 puts a per-epoch ACC/ASR within one binomial standard deviation of
# sqrt(p(1-p)/256) <= 0.031 of the full set's (0.014 at ACC 0.95 or ASR 0.05), and costs 512
# images per epoch against CIFAR-10's 19000. ASHA never sees subset values: its rung epochs
# are scored on the full sets (trial.run_trial's full_eval_at). The measurement on recorded D3
# curves is benchmarks/eval_subset.py; see benchmarks/README.md for its figures and status.
DEFAULT_EVAL_SUBSET = 256


@dataclass(frozen=True)
class EvalConfig:
    """Per-epoch evaluation can dominate a trial's time (on a PreActResNet-18 record, scoring
    every epoch was 72 % of a D3 trial), yet only the curves, the scheduler's decision points
    and the last epoch read it. So (d3tune/eval_schedule.py) by default a trial evaluates the
    first epoch, then every k-th, k from a cost model (training an image ~ 3 forward passes)
    so that periodic evaluation stays within ``share`` of training time (``every: N`` fixes k),
    and always ASHA's rung epochs and the last; k depends only on the config, so curves are as
    reproducible as metrics. Epochs before the last are scored on a fixed, class-stratified
    subset of ``subset`` images of each test set. ``--eval-full`` (``every: 1``, ``subset: 0``)
    scores every epoch on the full sets. The "before" metrics, rung epochs, the last epoch and
    the final metrics of a trial stopped early always use the full test sets, so final
    ACC/ASR/RA/DER and scheduler decisions do not depend on these settings."""

    every: int | None = field(default=None, metadata={"ge": 1})
    share: float = field(default=DEFAULT_EVAL_SHARE, metadata={"gt": 0.0, "le": 1.0})
    subset: int = field(default=DEFAULT_EVAL_SUBSET, metadata={"ge": 0})


@dataclass(frozen=True)
class TrialConfig:
    seed: int = field(default=0, metadata={"ge": 0})
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # adopted: defense knobs left unset come from the adopted defaults (d3tune/adopted_defaults.py)
    # before the profile and the built-in values; builtin: skip that layer
    defaults: str = field(default="adopted", metadata={"choices": ("adopted", "builtin")})
    data: DataConfig = DataConfig()
    attack: AttackConfig = AttackConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    defense: DefenseConfig = DefenseConfig()
    eval: EvalConfig = EvalConfig()


# ---------------------------------------------------------------------------------------------
# Generic validation of a dict against a frozen dataclass


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        return _coerce(value, inner[0], where)
    if is_dataclass(tp):
        return build(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an integer beyond float range
                finite = False
            if not finite:
                raise UsageError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UsageError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _check_rules(value: Any, meta: Mapping[str, Any], where: str) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise UsageError(f"{where}: {value!r} is not one of {', '.join(map(str, meta['choices']))}"
                         f"{did_you_mean(str(value), [str(c) for c in meta['choices']])}")
    for key, ok, words in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                           ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if key in meta and not ok(value, meta[key]):
            raise UsageError(f"{where}: expected a value {words} {meta[key]}, got {value!r}")


def build(cls: type, data: Any, where: str, extra: type | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``; keys that are not fields of ``cls`` go to the
    ``extra`` dataclass (a method's Params) stored in ``cls.params``."""
    if data is None:
        data = {}
    if is_dataclass(data):
        return data
    if not isinstance(data, Mapping):
        raise UsageError(f"{where or 'spec'}: expected a mapping of fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    own = {f.name: f for f in fields(cls) if f.name != "params" or extra is None}
    extra_fields = {f.name: f for f in fields(extra)} if extra is not None else {}
    kwargs: dict[str, Any] = {}
    extra_kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key in own:
            target, f, hint = kwargs, own[key], hints[key]
        elif key in extra_fields:
            target, f = extra_kwargs, extra_fields[key]
            hint = typing.get_type_hints(extra)[key]
        else:
            known = sorted(own) + sorted(extra_fields)
            raise UsageError(f"{path}: unknown field{did_you_mean(str(key), known)}; "
                             f"known: {', '.join(known)}")
        coerced = _coerce(value, hint, path)
        _check_rules(coerced, f.metadata, path)
        target[key] = coerced
    if extra is not None:
        kwargs["params"] = extra(**extra_kwargs)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Trial configs


def trial_config(data: Any, where: str = "") -> TrialConfig:
    """Validate a nested dict into a TrialConfig (names checked against the registries)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UsageError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    prefix = f"{where}." if where else ""
    sections: dict[str, Any] = {}
    for key, cls in (("attack", ATTACKS), ("defense", DEFENSES)):
        section = data.pop(key, None) or {}
        if not isinstance(section, Mapping):
            raise UsageError(f"{prefix}{key}: expected a mapping, got {type(section).__name__}")
        default = AttackConfig.name if key == "attack" else DefenseConfig.name
        name = section.get("name", default)
        if not isinstance(name, str):
            raise UsageError(f"{prefix}{key}.name: expected a string, got {name!r}")
        try:
            entry = cls[name]
        except UsageError as exc:
            raise UsageError(f"{prefix}{key}.name: {exc}") from None
        base = AttackConfig if key == "attack" else DefenseConfig
        if key == "defense" and data.get("defaults", TrialConfig.defaults) == "adopted":
            section = _with_adopted(section, data, name, f"{prefix}{key}")
        sections[key] = build(base, section, f"{prefix}{key}", extra=entry.params)
    cfg = build(TrialConfig, data, where)
    cfg = replace(cfg, **sections)
    for path, registry, name in (("data.name", DATASETS, cfg.data.name),
                                 ("model.arch", MODELS, cfg.model.arch)):
        if name is not None and name not in registry:
            try:
                registry[name]
            except UsageError as exc:
                raise UsageError(f"{prefix}{path}: {exc}") from None
    return cfg


def _with_adopted(section: Mapping[str, Any], data: Mapping[str, Any], defense: str,
                  where: str) -> Mapping[str, Any]:
    """The defense section with the knobs it leaves unset taken from the adopted defaults of
    (dataset, defense); a bad adopted file or value is one line naming the file."""
    from d3tune import adopted_defaults as adopted

    data_section = data.get("data")
    dataset = (data_section.get("name", DataConfig.name) if isinstance(data_section, Mapping)
               else DataConfig.name)
    if not isinstance(dataset, str):
        return section
    entry = adopted.lookup(dataset, defense)
    if entry is None:
        return section
    try:
        build(DefenseConfig, {**entry.knobs, "name": defense}, where,
              extra=DEFENSES[defense].params)
    except UsageError as exc:
        raise UsageError(f"{exc} (an adopted default, from {entry.path})") from None
    return {**entry.knobs, **section}


def profile_of(cfg: TrialConfig) -> Profile:
    return DATASETS[cfg.data.name].profile


def resolve(cfg: TrialConfig) -> TrialConfig:
    """Fill every field left as None from the dataset's profile, so the result says exactly
    what ran (and hashes the same however the defaults were spelled)."""
    prof = profile_of(cfg)
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return replace(
        cfg,
        data=replace(cfg.data, clean_ratio=pick(cfg.data.clean_ratio, prof.clean_ratio),
                     train_size=pick(cfg.data.train_size, prof.train_size)),
        model=replace(cfg.model, arch=pick(cfg.model.arch, prof.arch)),
        train=replace(cfg.train, epochs=pick(cfg.train.epochs, prof.attack_epochs_of(cfg.attack.name)),
                      batch_size=pick(cfg.train.batch_size, prof.attack_batch_size),
                      lr=pick(cfg.train.lr, prof.attack_lr)),
        defense=replace(cfg.defense, epochs=pick(cfg.defense.epochs, prof.defense_epochs),
                        batch_size=pick(cfg.defense.batch_size, prof.defense_batch_size),
                        lr=pick(cfg.defense.lr, prof.defense_lr),
                        params=cfg.defense.params if cfg.defense.params is not None
                        else DEFENSES[cfg.defense.name].params()),
        attack=replace(cfg.attack, params=cfg.attack.params if cfg.attack.params is not None
                       else ATTACKS[cfg.attack.name].params()),
    )


def to_dict(obj: Any) -> dict[str, Any]:
    """Nested plain dict; a method's Params are flattened into its section (the spec form)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name == "params":
            if value is not None:
                out.update(dataclasses.asdict(value))
        elif is_dataclass(value):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = value
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params and search spaces use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(d: Mapping[str, Any]) -> dict[str, Any]:
    """{'a.b': 1} -> {'a': {'b': 1}}; nested values are merged."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        node = out
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"{key}: {part!r} is both a value and a section")
        if isinstance(value, Mapping):
            node.setdefault(parts[-1], {}).update(unflatten(value))
        else:
            node[parts[-1]] = value
    return out
