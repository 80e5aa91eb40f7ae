"""What every spec shares: search distributions (``Dist``), resources, per-defense knobs,
local paths, and the validators the sweep, ablation, robust and leaderboard loaders use.

Why public and in one place: each loader checks its own fields, but a distribution, an integer
or an override must fail the same way everywhere (one line naming the spec field).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d3tune.config import flatten, trial_config, unflatten
from d3tune.errors import UsageError, did_you_mean

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice")


@dataclass(frozen=True)
class Dist:
    """One searched knob: a dotted trial field and its distribution (``kind``, ``args``),
    sampled by Optuna (define-by-run) or given to Tune as a domain."""
    path: str  # dotted trial field, e.g. defense.lr
    kind: str
    args: tuple[Any, ...]
    only_for: str | None = None  # a defense name: the knob exists only when that defense runs

    @property
    def param_name(self) -> str:
        """Optuna's name: per-defense knobs get their own (same field, other meaning)."""
        return f"{self.path}@{self.only_for}" if self.only_for else self.path

    def suggest(self, trial: Any) -> Any:
        """Define-by-run sampling (conditional spaces such as per-defense knobs)."""
        name, a = self.param_name, self.args
        if self.kind == "uniform":
            return trial.suggest_float(name, a[0], a[1])
        if self.kind == "loguniform":
            return trial.suggest_float(name, a[0], a[1], log=True)
        if self.kind in ("int", "logint"):
            return trial.suggest_int(name, a[0], a[1], log=self.kind == "logint")
        return trial.suggest_categorical(name, list(a))

    def tune_domain(self):
        """The knob as a Ray Tune search domain (``tune.uniform``, ``tune.choice``, ...); int
        bounds are inclusive, as in the spec."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "int":
            return tune.randint(self.args[0], self.args[1] + 1)  # inclusive upper bound
        if self.kind == "logint":
            return tune.lograndint(self.args[0], self.args[1] + 1)
        return tune.choice(list(self.args))

    def extremes(self) -> list[Any]:
        """The values a spec check tries: every choice, or the two bounds of a range."""
        return list(self.args) if self.kind == "choice" else [self.args[0], self.args[1]]


@dataclass(frozen=True)
class ResourceSpec:
    """CPUs and GPUs per trial (a GPU fraction packs several trials on one GPU); the trial runs
    torch at ``cpu`` threads."""
    cpu: float = field(default=1.0, metadata={"gt": 0.0})
    gpu: float = field(default=0.0, metadata={"ge": 0.0})  # fractions pack several trials/GPU


def expect(cond: bool, where: str, what: str) -> None:
    """Raise ``UsageError('WHERE: WHAT')`` (one line naming the spec field) unless ``cond``
    holds."""
    if not cond:
        raise UsageError(f"{where}: {what}")


def integer(value: Any, where: str, low: int) -> int:
    """``value`` as an integer >= ``low``; raises UsageError naming ``where`` otherwise
    (booleans are not integers)."""
    expect(isinstance(value, int) and not isinstance(value, bool) and value >= low, where,
            f"expected an integer >= {low}, got {value!r}")
    return value


def check_override(base: dict[str, Any], overrides: Mapping[str, Any], where: str) -> None:
    """Build the trial config these overrides would give; errors name the spec field."""
    merged = unflatten({**flatten(base), **overrides})
    try:
        trial_config(merged)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def finite(x: int | float) -> bool:
    """Whether ``x`` is a finite number (an integer beyond float range is not)."""
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond float range
        return False


def parse_dist(path: str, raw: Any, where: str) -> Dist:
    """A ``{kind: args}`` mapping as a ``Dist`` for trial field ``path``; raises UsageError
    naming ``where`` for an unknown kind, bad bounds or a log range that reaches 0."""
    expect(isinstance(raw, Mapping) and len(raw) == 1, where,
            f"expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {raw!r}")
    (kind, args), = raw.items()
    expect(kind in DISTRIBUTIONS, where, f"unknown distribution {kind!r}"
            f"{did_you_mean(str(kind), DISTRIBUTIONS)}; use one of {', '.join(DISTRIBUTIONS)}")
    expect(isinstance(args, list) and len(args) >= (1 if kind == "choice" else 2), where,
            f"{kind} expects a list " + ("of values" if kind == "choice" else "[low, high]"))
    if kind != "choice":
        expect(len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                       and finite(a) for a in args), where,
                f"{kind} expects [low, high] numbers, got {args!r}")
        expect(args[0] < args[1], where, f"low must be < high, got {args!r}")
        if kind in ("loguniform", "logint"):
            expect(args[0] > 0, where, f"{kind} needs low > 0, got {args[0]!r}")
        if kind in ("int", "logint"):
            expect(all(float(a).is_integer() for a in args), where,
                    f"{kind} expects integer bounds, got {args!r}")
            args = [int(a) for a in args]
    return Dist(path, kind, tuple(args))


def per_defense(data: Mapping[str, Any], base: dict[str, Any], source: str,
                 space: list[Dist]) -> list[Dist]:
    """`per_defense: {NAME: {field: dist}}`: knobs sampled only when defense NAME is chosen;
    `defense.name` must be a choice in `space` covering every NAME."""
    raw = data.get("per_defense")
    if raw is None:
        return []
    where = f"{source}: per_defense"
    expect(isinstance(raw, Mapping), where, "expected a mapping defense -> {field: dist}")
    names = next((d.args for d in space if d.path == "defense.name" and d.kind == "choice"), ())
    out = []
    for defense, knobs in raw.items():
        expect(defense in names, f"{where}.{defense}",
                f"not among space.defense.name's choices {list(names)}")
        expect(isinstance(knobs, Mapping), f"{where}.{defense}", "expected {field: dist}")
        for path, dist_raw in flatten_space(knobs).items():
            d = parse_dist(path, dist_raw, f"{where}.{defense}.{path}")
            for value in d.extremes():
                check_override(base, {"defense.name": defense, path: value},
                                f"{where}.{defense}.{path}")
            out.append(Dist(d.path, d.kind, d.args, only_for=str(defense)))
    return out


def flatten_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """Allow both `defense.lr: {...}` and nested `defense: {lr: {...}}` spellings."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        # {kind: [args]} is a distribution (an unknown kind is reported as such); other
        # mappings are sections of nested field names.
        is_dist = isinstance(value, Mapping) and len(value) == 1 and (
            next(iter(value)) in DISTRIBUTIONS or isinstance(next(iter(value.values())), list))
        if isinstance(value, Mapping) and not is_dist:
            out.update({f"{key}.{k}": v for k, v in flatten_space(value).items()})
        else:
            out[str(key)] = value
    return out


PATH_FIELDS = ("data.data_dir", "attack.result")  # trial fields naming local files or folders


def absolute(value: Any) -> Any:
    """A local path as an absolute one (relative to the working directory, ``~`` expanded);
    anything else unchanged."""
    return str(Path(value).expanduser().absolute()) if isinstance(value, str) and value else value
