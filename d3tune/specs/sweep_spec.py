"""Sweep and ablation specs: YAML -> frozen dataclasses, validated before Ray starts.

A sweep searches trial fields with Optuna (TPE, one or several objectives) under ASHA; an
ablation is a grid: axes of trial fields crossed with attacks, datasets, architectures and
seeds, every cell one Tune trial. Both compile to the same engine run (``RunPlan``).
Every space path and every grid value is checked by building the trial config it would
produce, so a typo or an out-of-range bound fails at load time naming the spec field.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d3tune.config import build, flatten, trial_config, unflatten
from d3tune.errors import UsageError, did_you_mean
from d3tune.runstate import RunPaths
from d3tune.specs.fields import (
    PATH_FIELDS,
    Dist,
    ResourceSpec,
    absolute,
    check_override,
    expect,
    finite,
    flatten_space,
    integer,
    parse_dist,
    per_defense,
)
from d3tune.yamlio import load_yaml

REPORTED_METRICS = ("acc", "asr", "ra", "der", "loss", "loss_clean", "loss_dist")
# Sweep constraints: name -> (result, limit) -> value, feasible when <= 0 (Optuna's convention).
CONSTRAINTS = {
    "max_acc_drop": lambda r, limit: float(r["acc_before"]) - float(r["acc"]) - limit,
    "max_asr": lambda r, limit: float(r["asr"]) - limit,
    "min_acc": lambda r, limit: limit - float(r["acc"]),
}


def constraint_values(constraints: tuple[tuple[str, float], ...],
                      result: Mapping[str, Any]) -> dict[str, float]:
    """Each constraint's value for a trial's result (<= 0: within it); a result that lacks a
    metric a constraint needs counts as outside it."""
    out = {}
    for name, limit in constraints:
        try:
            out[name] = CONSTRAINTS[name](result, limit)
        except (KeyError, TypeError, ValueError):
            out[name] = 1.0
    return out


@dataclass(frozen=True)
class SchedulerSpec:
    """ASHA's settings for a sweep or ablation (``name: none`` runs every trial to the end)."""
    name: str = field(default="asha", metadata={"choices": ("asha", "none")})
    grace_period: int = field(default=5, metadata={"ge": 1})
    reduction_factor: float = field(default=2.0, metadata={"gt": 1.0})
    metric: str = field(default="der", metadata={"choices": REPORTED_METRICS})
    mode: str = field(default="max", metadata={"choices": ("max", "min")})


@dataclass(frozen=True)
class RunPlan:
    """What the engine needs, for sweeps and ablations alike."""

    kind: str  # "sweep" | "ablation"
    name: str
    source: str  # the spec's path (logged as an artifact)
    base: dict[str, Any]  # nested trial dict (validated)
    space: tuple[Dist, ...] = ()
    cells: tuple[dict[str, Any], ...] = ()  # ablation: one flat override dict per cell
    metric: tuple[str, ...] = ("der",)
    mode: tuple[str, ...] = ("max",)
    num_samples: int = 1
    search_seed: int = 0
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourceSpec = ResourceSpec()
    max_concurrent: int = 2
    max_failures: int = 1
    # A retried trial repeats at most this much defense work; 0 = checkpoint every epoch.
    # Every-epoch checkpoints cost ~12 ms/epoch on digits and a model-sized write per epoch
    # on a GPU (see benchmarks/README.md, sweep overhead).
    checkpoint_every_s: float = 30.0
    # Optuna constraints (sweeps): trials outside them are infeasible, never on a front.
    constraints: tuple[tuple[str, float], ...] = ()
    storage: str = "d3tune_results/sweeps"
    experiment: str = "d3tune"
    cache_dir: str | None = None

    @property
    def multi_objective(self) -> bool:
        """Whether the plan optimises several metrics (a Pareto front) rather than one."""
        return len(self.metric) > 1

    @property
    def paths(self) -> RunPaths:
        """Where the run keeps Tune's experiment and its own state (study, ledger)."""
        return RunPaths(self.name, self.storage)


_COMMON = {"name", "base", "resources", "max_concurrent", "max_failures", "checkpoint_every_s",
           "storage", "experiment", "cache_dir", "metric", "mode"}
SWEEP_KEYS = _COMMON | {"space", "per_defense", "num_samples", "seeds", "search_seed",
                        "scheduler", "constraints"}
ABLATION_KEYS = _COMMON | {"axes", "attacks", "datasets", "archs", "seeds", "scheduler"}


def _objectives(data: Mapping[str, Any], source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    metric, mode = data.get("metric", "der"), data.get("mode", "max")
    metrics = tuple(metric) if isinstance(metric, list) else (metric,)
    modes = tuple(mode) if isinstance(mode, list) else (mode,)
    expect(len(metrics) == len(modes) and len(metrics) >= 1, f"{source}: metric/mode",
            f"need as many modes as metrics, got {list(metrics)} and {list(modes)}")
    for m in metrics:
        expect(m in REPORTED_METRICS, f"{source}: metric", f"{m!r} is not reported by trials"
                f"{did_you_mean(str(m), REPORTED_METRICS)}; trials report "
                f"{', '.join(REPORTED_METRICS)}")
    for m in modes:
        expect(m in ("max", "min"), f"{source}: mode", f"expected max or min, got {m!r}")
    return metrics, modes


def _common(data: Mapping[str, Any], source: str, allowed: set[str]) -> dict[str, Any]:
    expect(isinstance(data, Mapping), source,
            f"expected a mapping at the top of the spec, got {type(data).__name__}")
    for key in data:
        expect(key in allowed, f"{source}: {key}",
                f"unknown field{did_you_mean(str(key), allowed)}; known: {', '.join(sorted(allowed))}")
    base = data.get("base") or {}
    expect(isinstance(base, Mapping), f"{source}: base", "expected a mapping of trial fields")
    try:
        trial_config(base)
    except UsageError as exc:
        raise UsageError(f"{source}: base.{exc}") from None
    metric, mode = _objectives(data, source)
    name = data.get("name", Path(source).stem)
    expect(isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum(),
            f"{source}: name", f"expected letters, digits, '-' or '_', got {name!r}")
    for key in ("storage", "experiment", "cache_dir"):
        expect(data.get(key) is None or isinstance(data.get(key), str), f"{source}: {key}",
                f"expected a string, got {data.get(key)!r}")
    if isinstance(data.get("storage"), str) and "://" in data["storage"]:
        raise UsageError(f"{source}: storage: {data['storage']!r}: URIs are not supported yet "
                         "(the Optuna study and the MLflow run map live beside Tune's state); "
                         "use a folder, shared by all nodes on a cluster (e.g. NFS)")
    res = build(ResourceSpec, data.get("resources"), f"{source}: resources")
    expect(res.gpu <= 1 or float(res.gpu).is_integer(), f"{source}: resources.gpu",
            f"a fraction of one GPU (<= 1) or a whole number of GPUs, got {res.gpu}")
    return dict(
        name=name, source=source, base=dict(base), metric=metric, mode=mode, resources=res,
        max_concurrent=integer(data.get("max_concurrent", 2), f"{source}: max_concurrent", 1),
        max_failures=integer(data.get("max_failures", 1), f"{source}: max_failures", 0),
        checkpoint_every_s=_seconds(data.get("checkpoint_every_s", RunPlan.checkpoint_every_s),
                                    f"{source}: checkpoint_every_s"),
        storage=data.get("storage") or RunPlan.storage,
        experiment=data.get("experiment") or RunPlan.experiment,
        cache_dir=data.get("cache_dir"),
        scheduler=build(SchedulerSpec, data.get("scheduler"), f"{source}: scheduler"),
    )


def _seconds(value: Any, where: str) -> float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value >= 0)
    expect(ok, where, f"expected a number of seconds >= 0, got {value!r}")
    return float(value)


def _seeds(data: Mapping[str, Any], where: str) -> list[int]:
    """The spec's seeds: ``seeds``, or the one ``base.seed`` names (naming both is refused:
    a base seed the seed axis silently replaced would run another experiment)."""
    base_seed = (data.get("base") or {}).get("seed")
    if base_seed is not None:
        expect("seeds" not in data, where.replace(": seeds", ": base.seed"),
                "the seeds are set by `seeds`; give them there only")
    seeds = data.get("seeds", [0] if base_seed is None else [base_seed])
    expect(isinstance(seeds, list) and seeds, where, f"expected a non-empty list, got {seeds!r}")
    return [integer(s, where, 0) for s in seeds]


def sweep_plan(data: Any, source: str, num_samples: int | None = None) -> RunPlan:
    """Validate a sweep spec given as plain data into a ``RunPlan`` (``num_samples`` overrides
    the spec's); raises UsageError naming the field."""
    common = _common(data, source, SWEEP_KEYS)
    space_raw = data.get("space") or {}
    expect(isinstance(space_raw, Mapping) and space_raw, f"{source}: space",
            "expected a mapping of trial fields to distributions")
    space = []
    for path, raw in flatten_space(space_raw).items():
        dist = parse_dist(path, raw, f"{source}: space.{path}")
        for value in dist.extremes():
            check_override(common["base"], {path: value}, f"{source}: space.{path}")
        space.append(dist)
    space += per_defense(data, common["base"], source, space)
    seeds = _seeds(data, f"{source}: seeds")
    if len(seeds) > 1:  # Optuna then sees the seed as a parameter (importance shows its weight)
        space.append(Dist("seed", "choice", tuple(seeds)))
    else:
        common["base"] = unflatten({**flatten(common["base"]), "seed": seeds[0]})
    n = num_samples if num_samples is not None else data.get("num_samples", 8)
    return RunPlan(kind="sweep", space=tuple(space), num_samples=integer(n, f"{source}: num_samples", 1),
                   search_seed=integer(data.get("search_seed", 0), f"{source}: search_seed", 0),
                   constraints=_constraints(data.get("constraints"), f"{source}: constraints"),
                   **common)


def _constraints(raw: Any, where: str) -> tuple[tuple[str, float], ...]:
    """`constraints: {max_acc_drop: 0.05}`: limits on a trial's final metrics (fractions)."""
    if raw is None:
        return ()
    expect(isinstance(raw, Mapping) and raw, where,
            f"expected a mapping such as {{max_acc_drop: 0.05}}, got {raw!r}")
    out = []
    for name, limit in raw.items():
        expect(name in CONSTRAINTS, f"{where}.{name}", f"unknown constraint"
                f"{did_you_mean(str(name), CONSTRAINTS)}; known: {', '.join(CONSTRAINTS)}")
        expect(isinstance(limit, (int, float)) and not isinstance(limit, bool)
                and finite(limit) and 0 <= limit <= 1, f"{where}.{name}",
                f"expected a fraction between 0 and 1, got {limit!r}")
        out.append((str(name), float(limit)))
    return tuple(out)


def ablation_plan(data: Any, source: str) -> RunPlan:
    """Validate an ablation (grid) spec given as plain data into a ``RunPlan`` with one cell per
    grid point; raises UsageError naming the field."""
    common = _common(data, source, ABLATION_KEYS)
    axes_raw = data.get("axes") or {}
    expect(isinstance(axes_raw, Mapping), f"{source}: axes", "expected a mapping field -> values")
    axes: list[list[dict[str, Any]]] = []
    for path, values in axes_raw.items():
        where = f"{source}: axes.{path}"
        expect(isinstance(values, list) and values, where, f"expected a non-empty list, got {values!r}")
        if path == "zip":  # values are dicts of fields that move together (e.g. arch + layer)
            expect(all(isinstance(v, Mapping) and v for v in values), where,
                    "zip expects a list of mappings")
            axes.append([dict(flatten(v)) for v in values])
        else:
            axes.append([{str(path): v} for v in values])
    for key, path in (("attacks", "attack.name"), ("datasets", "data.name"), ("archs", "model.arch")):
        if key in data:
            values = data[key]
            expect(isinstance(values, list) and values, f"{source}: {key}",
                    f"expected a non-empty list, got {values!r}")
            axes.append([{path: v} for v in values])
    axes.append([{"seed": s} for s in _seeds(data, f"{source}: seeds")])
    cells = []
    for combo in itertools.product(*axes):
        cell: dict[str, Any] = {}
        for part in combo:
            cell.update(part)
        cells.append(cell)
    checked: set[str] = set()
    for cell in cells:  # validate each distinct cell once (cheap: no data is loaded)
        sig = repr(sorted(cell.items(), key=lambda kv: kv[0]))
        if sig not in checked:
            checked.add(sig)
            check_override(common["base"], cell, f"{source}: axes")
    if "scheduler" not in data:  # a grid wants every cell to finish
        common["scheduler"] = SchedulerSpec(name="none")
    return RunPlan(kind="ablation", cells=tuple(cells), num_samples=1, **common)


def with_absolute_paths(plan: RunPlan) -> RunPlan:
    """Relative paths in a spec mean the folder the user ran d3tune from; Tune runs each trial
    in its own folder, so they are made absolute here, on the driver."""
    from dataclasses import replace

    fix = lambda flat: {k: absolute(v) if k in PATH_FIELDS else v  # noqa: E731
                        for k, v in flat.items()}
    space = tuple(replace(d, args=tuple(absolute(a) for a in d.args))
                  if d.path in PATH_FIELDS and d.kind == "choice" else d for d in plan.space)
    return replace(plan, base=unflatten(fix(flatten(plan.base))),
                   cells=tuple(fix(c) for c in plan.cells), space=space,
                   cache_dir=absolute(plan.cache_dir))


def load_plan(path: str | Path, kind: str, num_samples: int | None = None) -> RunPlan:
    """A sweep or ablation spec file (``kind``), validated, with its local paths made absolute;
    raises UsageError for a missing, empty or invalid file."""
    data = load_yaml(path)
    expect(data is not None, str(path), "empty spec")
    plan = sweep_plan(data, str(path), num_samples) if kind == "sweep" \
        else ablation_plan(data, str(path))
    return with_absolute_paths(plan)
