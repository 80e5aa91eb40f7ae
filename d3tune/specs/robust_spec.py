"""Robust-search specs: YAML -> a frozen ``RobustSpec``, validated once before Ray starts.

A robust search looks for one defense setting that holds on a whole *population* of threat
models (attacks and/or BackdoorBench records x datasets x architectures x clean-data regimes x
seeds), judged by its worst-case DER under a mean ACC-drop budget, and then confirms the best
few on ``holdout_seeds`` that the search never saw. The population and the holdout are explicit
lists of ``Member``s here, so every later stage (model build, trials, confirmation, report)
iterates over the same objects. Errors name the spec field, as for sweeps (``spec.py``).
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from d3tune.config import build, flatten, unflatten
from d3tune.errors import UsageError, did_you_mean
from d3tune.runstate import RunPaths
from d3tune.specs.fields import (
    Dist,
    ResourceSpec,
    absolute,
    check_override,
    expect,
    flatten_space,
    integer,
    parse_dist,
    per_defense,
)
from d3tune.yamlio import load_yaml

ROBUST_KEYS = {"name", "defense", "base", "population", "holdout_seeds", "holdout_attacks",
               "space", "per_defense", "budget", "max_acc_drop", "min_asr", "top_k",
               "tradeoff_budgets", "references", "search_seed", "time_budget_s",
               "compute_budget_s", "resources", "max_concurrent", "max_failures", "storage",
               "experiment", "cache_dir", "start_with", "split_test", "replicates",
               "adopt_tolerance", "member_batch"}
POPULATION_KEYS = {"attacks", "records", "datasets", "archs", "seeds", "clean_ratios"}
DATASET_ENTRY_KEYS = {"name", "data_dir", "train_size"}  # a population.datasets entry
RECORD_DATA_PATH = "_record_data_path"  # a record's recorded data folder, while resolving
# Trial fields that say *which threat model* a member is: the population owns them.
POPULATION_FIELDS = ("attack.", "data.name", "data.data_dir", "data.train_size",
                     "data.clean_ratio", "data.clean_count", "data.test_split", "model.arch",
                     "seed")
BUILTIN_REFERENCES = ("paper", "profile")
# Replicate r of a replicated search runs on the population's seeds + r * this (and the search
# seed + r): member ids then say which replicate they belong to (blended_s1002: replicate 1).
REPLICATE_SEED_STRIDE = 1000
# The paper's D3 optimisation schedule (../shared/D3_SPEC.md, step 3); its eps/lmd/p/init/radius
# are the defaults of D3's Params. The clean-data regime stays the population's: a reference
# row changes the defense's knobs, never the threat model it is judged on.
PAPER_SCHEDULE = {"defense.epochs": 100, "defense.batch_size": 256, "defense.lr": 0.01,
                  "defense.momentum": 0.9, "defense.weight_decay": 0.0}


@dataclass(frozen=True)
class Member:
    """One threat model of the population: flat trial overrides plus a readable id (the id
    names the member's MLflow metrics, e.g. ``der.blended_s1``)."""

    id: str
    overrides: tuple[tuple[str, Any], ...]

    @property
    def fields(self) -> dict[str, Any]:
        """The member's flat trial overrides as a dict."""
        return dict(self.overrides)

    @property
    def seed(self) -> int:
        """The member's seed (its attack, clean subset, initialisation and data order)."""
        return int(self.fields["seed"])


@dataclass(frozen=True)
class Reference:
    """A named setting confirmed on the holdout next to the finalists. ``setting`` holds flat
    ``defense.*`` fields; with ``replace_base`` the base's defense knobs are dropped first."""

    name: str
    setting: tuple[tuple[str, Any], ...]
    replace_base: bool = True
    builtin: bool = False  # the defense's built-in knobs, not the adopted defaults ("paper")


@dataclass(frozen=True)
class RobustSpec:
    """A validated robust search: its base, population and holdout members, the space, the
    protocol (budget, ACC budget, top_k, references, replicates) and where it runs and logs."""
    name: str
    source: str
    base: dict[str, Any]  # nested trial dict without population fields; defense.name set
    members: tuple[Member, ...]  # the search population
    # the same threat models on holdout_seeds, or (``holdout_attacks``) attacks the search
    # never sees, crossed with the population's other axes, on holdout_seeds
    holdout: tuple[Member, ...]
    space: tuple[Dist, ...]
    budget: int = 32  # Optuna trials (settings)
    max_acc_drop: float = 0.03  # mean ACC drop over the population (fraction)
    min_asr: float = 0.5  # a member whose backdoor reaches less ASR is left out
    top_k: int = 3  # finalists confirmed on the holdout
    tradeoff_budgets: tuple[float, ...] = ()  # extra finalists: the best complete one at each
    references: tuple[Reference, ...] = ()
    # settings the search evaluates first, as Optuna params (name -> value): ``start_with``
    start_points: tuple[tuple[tuple[str, Any], ...], ...] = ()
    search_seed: int = 0
    time_budget_s: float | None = None  # stop the search (not the confirmation) after this long
    # stop the search once its settings have spent this many member-seconds (the sum of every
    # member evaluation's own time, whatever the parallelism): equal compute, not equal trials
    compute_budget_s: float | None = None
    resources: ResourceSpec = ResourceSpec()
    max_concurrent: int = 2
    max_failures: int = 1
    storage: str = "d3tune_results/robust"
    experiment: str = "d3tune-robust"
    cache_dir: str | None = None
    # search members score on one fixed half of each test set, holdout members on the other
    # (``data.split_test``): selection and confirmation never share a test image
    split_test: bool = True
    # K full searches (own sampler and population seeds each), confirmed on the same holdout
    replicates: int = 1
    replicate: int = 0  # which replicate this spec is (``replicate_specs``)
    # adopting from a replicated search is refused when the replicates' holdout worst cases
    # spread by more than this (a default a rerun would not confirm is not robust)
    adopt_tolerance: float = 0.05
    # members of one setting trained together as one batched computation (d3tune/batched.py),
    # for defenses that have a batched form; 1: one after another. Figures agree to float
    # tolerance, not bit for bit, so it is recorded with the search
    member_batch: int = 1

    @property
    def paths(self) -> RunPaths:
        """Where the search keeps Tune's experiment and its own state (study, ledger, rows)."""
        return RunPaths(self.name, self.storage)

    @property
    def defense(self) -> str:
        """The defense searched."""
        return str(self.base["defense"]["name"])

    def with_budget(self, budget: int) -> "RobustSpec":
        """The spec with ``budget`` settings; raises UsageError for a budget < 1."""
        return replace(self, budget=integer(budget, "--budget", 1))

    def with_replicates(self, replicates: int, where: str = "--replicates") -> "RobustSpec":
        """The spec with K replicates, checked as the spec's own ``replicates`` is."""
        return _checked_replicates(replace(self, replicates=integer(replicates, where, 1)),
                                   where)


def _checked_replicates(spec: RobustSpec, where: str) -> RobustSpec:
    """Replicates need a holdout of several seeds, population seeds below the stride (so no two
    replicates share a seed), and no replicate's seed among the holdout seeds."""
    if spec.replicates == 1:
        return spec
    holdout = sorted({m.seed for m in spec.holdout})
    seeds = sorted({m.seed for m in spec.members})
    expect(len(holdout) >= 2, where, f"{spec.replicates} replicates need at least 2 holdout "
            f"seeds (the draws are replicate x holdout seed), got {holdout}")
    expect(max(seeds) < REPLICATE_SEED_STRIDE, where, f"replicate r searches on the population "
            f"seeds + {REPLICATE_SEED_STRIDE} r: population seeds must be below "
            f"{REPLICATE_SEED_STRIDE}, got {seeds}")
    every = {s + r * REPLICATE_SEED_STRIDE for s in seeds for r in range(spec.replicates)}
    shared = sorted(every & set(holdout))
    expect(not shared, where, f"holdout seed(s) {shared} are also seeds of a replicate's "
            f"population (replicate r uses the seeds + {REPLICATE_SEED_STRIDE} r)")
    return spec


def replicate_specs(spec: RobustSpec) -> list[RobustSpec]:
    """One robust spec per replicate: ``NAME-rR``, the population's seeds + R * stride, the
    search seed + R, the same holdout. With one replicate, the spec itself."""
    if spec.replicates == 1:
        return [spec]
    out = []
    for r in range(spec.replicates):
        shift = r * REPLICATE_SEED_STRIDE
        members = tuple(Member(f"{m.id[:m.id.rindex('_s')]}_s{m.seed + shift}",
                               tuple(sorted({**m.fields, "seed": m.seed + shift}.items())))
                        for m in spec.members)
        out.append(replace(spec, name=f"{spec.name}-r{r}", members=members,
                           search_seed=spec.search_seed + r, replicate=r))
    return out


def _fraction(value: Any, where: str, low: float = 0.0) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    expect(ok and low <= value <= 1.0, where, f"expected a fraction in [{low}, 1], got {value!r}")
    return float(value)


def _list(data: Mapping[str, Any], key: str, where: str, default: Any = None) -> list[Any]:
    values = data.get(key, default)
    expect(isinstance(values, list) and values, where,
            f"expected a non-empty list, got {values!r}")
    return values


def _seed_list(values: list[Any], where: str) -> list[int]:
    seeds = [integer(s, where, 0) for s in values]
    expect(len(set(seeds)) == len(seeds), where, f"a seed is listed twice: {seeds}")
    return seeds


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-") or "x"


def _attacks(pop: Mapping[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, flat attack overrides) for every attack and record of the population. A record
    brings its dataset and architecture too (read from its header), and, under the private key
    ``RECORD_DATA_PATH``, where it says its clean data was."""
    from d3tune.specs.records import record_fields

    out: list[tuple[str, dict[str, Any]]] = []
    for i, a in enumerate(pop.get("attacks") or []):
        w = f"{where}.attacks[{i}]"
        if isinstance(a, str):
            out.append((a, {"attack.name": a}))
        else:
            expect(isinstance(a, Mapping) and isinstance(a.get("name"), str), w,
                    f"expected an attack name or {{name: ..., knob: value}}, got {a!r}")
            flat = {f"attack.{k}": v for k, v in a.items()}
            extra = "-".join(f"{_slug(k)}{_slug(v)}" for k, v in a.items() if k != "name")
            out.append((f"{a['name']}-{extra}" if extra else a["name"], flat))
    records: list[Path] = []
    for i, r in enumerate(pop.get("records") or []):
        w = f"{where}.records[{i}]"
        expect(isinstance(r, str) and r, w, f"expected the path of an attack_result.pt, got {r!r}")
        full = Path(absolute(r))
        expect(full.resolve() not in [p.resolve() for p in records], w,
                f"{r} is listed twice")
        records.append(full)
    for i, full in enumerate(records):
        try:
            fields_, data_path = record_fields(full)
        except UsageError as exc:
            raise UsageError(f"{where}.records[{i}]: {exc}") from None
        out.append((_record_label(full, records), {**fields_, RECORD_DATA_PATH: data_path}))
    return out


def _record_label(path: Path, records: list[Path]) -> str:
    """``bb-<folder>``: the record's folder names it (BackdoorBench writes one folder per
    attack run); two records in folders of the same name get their parent folder too."""
    same = [p for p in records if p.parent.name == path.parent.name]
    if len(same) == 1:
        return f"bb-{_slug(path.parent.name)}"
    return f"bb-{_slug(path.parent.parent.name)}-{_slug(path.parent.name)}"


def _datasets(pop: Mapping[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, flat data fields) per ``population.datasets`` entry: a name, or
    ``{name: NAME, data_dir: FOLDER, train_size: N}`` for a dataset read from a folder."""
    values = _list(pop, "datasets", f"{where}.datasets")
    out: list[tuple[str, dict[str, Any]]] = []
    for i, v in enumerate(values):
        w = f"{where}.datasets[{i}]"
        entry = {"name": v} if isinstance(v, str) else v
        expect(isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                and set(entry) <= DATASET_ENTRY_KEYS, w, "expected a dataset name or {name: "
                f"NAME, data_dir: FOLDER, train_size: N}}, got {v!r}")
        flat: dict[str, Any] = {"data.name": entry["name"]}
        if entry.get("data_dir") is not None:
            expect(isinstance(entry["data_dir"], str) and entry["data_dir"], f"{w}.data_dir",
                    f"expected a folder, got {entry['data_dir']!r}")
            flat["data.data_dir"] = absolute(entry["data_dir"])
        if entry.get("train_size") is not None:
            flat["data.train_size"] = entry["train_size"]
        out.append((entry["name"], flat))
    names = [name for name, _ in out]
    expect(len(set(names)) == len(names), f"{where}.datasets", f"a dataset is listed twice: "
            f"{names}")
    return out


def _population(data: Mapping[str, Any], source: str,
                data_dirs: Mapping[str | None, str] | None = None
                ) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]] | None]:
    """The population's threat models (without seeds), its seeds, and the holdout's threat
    models when ``holdout_attacks`` names attacks the search never sees (None: the holdout
    repeats the population's threat models on its own seeds). ``data_dirs``: the command
    line's ``--data-dir`` (dataset name -> folder; None: the population's one dataset)."""
    where = f"{source}: population"
    pop = data.get("population")
    expect(isinstance(pop, Mapping), where, "expected a mapping with attacks and/or records, "
            "seeds, and optionally datasets, archs, clean_ratios")
    for key in pop:
        expect(key in POPULATION_KEYS, f"{where}.{key}", f"unknown field"
                f"{did_you_mean(str(key), POPULATION_KEYS)}; "
                f"known: {', '.join(sorted(POPULATION_KEYS))}")
    for key in ("attacks", "records"):
        expect(pop.get(key) is None or isinstance(pop.get(key), list), f"{where}.{key}",
                f"expected a list, got {pop.get(key)!r}")
    expect(bool(pop.get("attacks") or pop.get("records")), f"{where}.attacks",
            "the population needs at least one attack or record")
    attacks = _attacks(pop, where)
    labels = [label for label, _ in attacks]
    expect(len(set(labels)) == len(labels), f"{where}.attacks", f"listed twice: {labels}")
    axes: list[list[tuple[str, dict[str, Any]]]] = [attacks]
    if "datasets" in pop:
        named = _datasets(pop, where)
        axes.append([(_slug(name) if len(named) > 1 else "", flat) for name, flat in named])
    for key, path, tag in (("archs", "model.arch", ""), ("clean_ratios", "data.clean_ratio", "c")):
        if key in pop:
            values = _list(pop, key, f"{where}.{key}")
            expect(len(set(map(str, values))) == len(values), f"{where}.{key}",
                    f"a value is listed twice: {values}")
            # only an axis with several values goes into the member id (ids stay short)
            axes.append([(f"{tag}{_slug(v)}" if len(values) > 1 else "", {path: v})
                         for v in values])
    seeds = _seed_list(_list(pop, "seeds", f"{where}.seeds", [0]), f"{where}.seeds")
    models = _combine(axes)
    for i, (label, flat) in enumerate(a for a in attacks if RECORD_DATA_PATH in a[1]):
        expect(any(m["fields"].get("attack.result") == flat["attack.result"] for m in models),
                f"{where}.records[{i}]", f"{flat['attack.result']} holds a "
                f"{flat['model.arch']!r} trained on {flat['data.name']}, which the population's "
                f"datasets/archs leave out ({_axis_values(axes[1:])})")
    held: list[dict[str, Any]] | None = None
    if "holdout_attacks" in data:
        hw = f"{source}: holdout_attacks"
        _list(data, "holdout_attacks", hw)
        unseen = _attacks({"attacks": data["holdout_attacks"]}, hw)
        seen = {label for label, _ in attacks} | {f["attack.name"] for _, f in attacks}
        for (label, flat), raw in zip(unseen, data["holdout_attacks"]):
            expect(label not in seen and flat["attack.name"] not in seen, hw,
                    f"{label!r} is also a population attack: held-out attacks must be threat "
                    "models the search never sees")
        labels = [label for label, _ in unseen]
        expect(len(set(labels)) == len(labels), hw, f"listed twice: {labels}")
        held = _combine([unseen, *axes[1:]])
    folders = _folders(models + (held or []), data_dirs or {}, source)
    return ([_with_folder(m, folders) for m in models], seeds,
            None if held is None else [_with_folder(m, folders) for m in held])


def _axis_values(axes: list[list[tuple[str, dict[str, Any]]]]) -> str:
    values = [f"{k.rsplit('.', 1)[-1]} {v}" for axis in axes for _, part in axis
              for k, v in part.items() if k in ("data.name", "model.arch")]
    return ", ".join(values) or "none listed"


def _combine(axes: list[list[tuple[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values. A combination whose parts disagree on a field
    is no threat model and is left out: a record brings its own dataset and architecture, so
    it pairs only with the dataset entry (and arch) it was trained on."""
    models = []
    for combo in itertools.product(*axes):
        label = "_".join(part for part, _ in combo if part)
        fields_: dict[str, Any] = {}
        clash = False
        for _, part in combo:
            clash |= any(fields_.get(k, v) != v for k, v in part.items()
                         if k not in ("data.data_dir", "data.train_size"))
            fields_.update({k: v for k, v in part.items() if k not in fields_ or
                            k in ("data.data_dir", "data.train_size")})
        if not clash:
            models.append({"label": label, "fields": fields_})
    return models


def _dataset_of(model: Mapping[str, Any]) -> str:
    from d3tune.config import DataConfig

    return str(model["fields"].get("data.name", DataConfig.name))


def _folders(models: list[dict[str, Any]], data_dirs: Mapping[str | None, str],
             source: str) -> dict[str, str]:
    """Dataset name -> the folder ``--data-dir`` gives it (it overrides the spec's, as the
    command line does for ``d3tune run``). ``--data-dir DIR`` alone names the folder of the
    population's one dataset; with several, each needs ``--data-dir NAME=DIR``."""
    names = sorted({_dataset_of(m) for m in models})
    out: dict[str, str] = {}
    for name, folder in data_dirs.items():
        if name is None:
            expect(len(names) == 1, "--data-dir", f"the population spans {', '.join(names)}: "
                    "name the dataset (--data-dir NAME=DIR, repeatable) or set data_dir in "
                    f"{source}: population.datasets")
            name = names[0]
        expect(name in names, f"--data-dir {name}={folder}", f"no member of {source} uses "
                f"dataset {name!r} (its datasets: {', '.join(names)})")
        out[name] = absolute(folder)
    return out


def _with_folder(model: dict[str, Any], folders: Mapping[str, str]) -> dict[str, Any]:
    """The threat model with its data folder: the command line's, the spec's, or for a record
    the folder it recorded (found beside it or in the working directory, and said); a dataset
    that reads a folder and has none is one line naming the spec field."""
    from d3tune.data import DATASETS
    from d3tune.specs.records import record_data_dir

    fields_ = dict(model["fields"])
    data_path = fields_.pop(RECORD_DATA_PATH, None)
    name = _dataset_of(model)
    if name in folders:
        fields_["data.data_dir"] = folders[name]
    elif name in DATASETS.names() and DATASETS[name].needs_data_dir \
            and not fields_.get("data.data_dir"):
        field = f"population.datasets: [{{name: {name}, data_dir: FOLDER}}] or --data-dir"
        if data_path is None:
            raise UsageError(f"{field}: dataset {name!r} is read from a folder and none is "
                             "given")
        fields_["data.data_dir"] = record_data_dir(fields_["attack.result"], name, data_path,
                                                   field)
    return {**model, "fields": fields_}


def _members(models: list[dict[str, Any]], seeds: list[int],
             test_split: str = "all") -> tuple[Member, ...]:
    extra = {} if test_split == "all" else {"data.test_split": test_split}
    return tuple(Member(f"{m['label']}_s{s}",
                        tuple(sorted({**m["fields"], **extra, "seed": s}.items())))
                 for m in models for s in seeds)


def _is_population_field(path: str) -> bool:
    return any(path == f or (f.endswith(".") and path.startswith(f)) for f in POPULATION_FIELDS)


def _references(data: Mapping[str, Any], base: dict[str, Any],
                source: str) -> tuple[Reference, ...]:
    where = f"{source}: references"
    raw = data.get("references", [])
    expect(isinstance(raw, list), where, "expected a list of paper, profile or "
            "{name: NAME, setting: {defense.field: value}}")
    out: list[Reference] = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if isinstance(item, str):
            expect(item in BUILTIN_REFERENCES, w, f"unknown built-in reference {item!r}"
                    f"{did_you_mean(item, BUILTIN_REFERENCES)}; built-ins: paper, profile "
                    "(or give {name: NAME, setting: {...}})")
            setting = PAPER_SCHEDULE if item == "paper" else {}
            out.append(Reference(item, tuple(sorted(setting.items())), builtin=item == "paper"))
            continue
        expect(isinstance(item, Mapping) and set(item) <= {"name", "setting"}
                and isinstance(item.get("name"), str) and isinstance(item.get("setting"), Mapping),
                w, f"expected {{name: NAME, setting: {{defense.field: value}}}}, got {item!r}")
        flat = flatten(item["setting"])
        for path in flat:
            expect(path.startswith("defense."), f"{w}.setting.{path}",
                    "a reference sets defense.* fields only (the population is fixed)")
        out.append(Reference(item["name"], tuple(sorted(flat.items())), replace_base=False))
    names = [r.name for r in out]
    expect(len(set(names)) == len(names), where, f"a reference name is used twice: {names}")
    for ref in out:
        check_override(_defense_only(base, ref), dict(ref.setting),
                        f"{where}.{ref.name}")
    return tuple(out)


def _defense_only(base: dict[str, Any], ref: Reference) -> dict[str, Any]:
    """The base a reference runs on: with ``replace_base`` only the defense's name survives
    from the base's defense section (a built-in reference means exactly those knobs)."""
    if not ref.replace_base:
        return base
    flat = {k: v for k, v in flatten(base).items()
            if not k.startswith("defense.") or k == "defense.name"}
    return unflatten(flat)


def check_top_keys(data: Any, source: str, allowed: set[str]) -> None:
    """A spec is a mapping of known top-level fields (robust and leaderboard specs alike)."""
    expect(isinstance(data, Mapping), source,
            f"expected a mapping at the top of the spec, got {type(data).__name__}")
    for key in data:
        expect(key in allowed, f"{source}: {key}", f"unknown field"
                f"{did_you_mean(str(key), allowed)}; known: {', '.join(sorted(allowed))}")


def robust_plan(data: Any, source: str,
                data_dirs: Mapping[str | None, str] | None = None) -> RobustSpec:
    """Validate a robust spec given as plain data (YAML, or a dict built by a leaderboard).
    ``data_dirs``: ``--data-dir`` folders by dataset name (None: the population's one dataset),
    overriding the spec's. Raises UsageError naming the field."""
    check_top_keys(data, source, ROBUST_KEYS)
    name = data.get("name", Path(source).stem.split(".")[0])
    expect(isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum(),
            f"{source}: name", f"expected letters, digits, '-' or '_', got {name!r}")
    base_raw = data.get("base") or {}
    expect(isinstance(base_raw, Mapping), f"{source}: base", "expected a mapping of trial fields")
    base_flat = flatten(base_raw)
    for path in base_flat:
        expect(not _is_population_field(path), f"{source}: base.{path}",
                "a population field: set it under population (attacks, records, datasets, "
                "archs, clean_ratios, seeds; a dataset's folder and train_size in its "
                "population.datasets entry)")
        expect(not path.startswith("eval."), f"{source}: base.{path}", "a robust search scores "
                "each member once, on the full test sets after its last epoch: there is no "
                "per-epoch evaluation to set")
    defense = data.get("defense", base_flat.get("defense.name", "d3"))
    expect(isinstance(defense, str), f"{source}: defense",
            f"expected a defense name, got {defense!r}")
    base_flat["defense.name"] = defense
    base = unflatten(base_flat)
    check_override(base, {}, f"{source}: base")  # also checks the defense name

    models, seeds, held_models = _population(data, source, data_dirs)
    split = data.get("split_test", True)
    expect(isinstance(split, bool), f"{source}: split_test", f"expected true or false, got "
            f"{split!r}")
    members = _members(models, seeds, "search" if split else "all")
    for m in members[:: len(seeds)]:  # one per threat model: the seed is checked below
        check_override(base, m.fields, f"{source}: population ({m.id})")
    for m in _members(held_models or [], [0]):
        check_override(base, m.fields, f"{source}: holdout_attacks ({m.id})")
    holdout_seeds = _seed_list(_list(data, "holdout_seeds", f"{source}: holdout_seeds"),
                               f"{source}: holdout_seeds")
    shared = sorted(set(seeds) & set(holdout_seeds))
    expect(not shared, f"{source}: holdout_seeds", f"seed(s) {shared} are also population seeds; "
            "holdout seeds must never be seen by the search")

    space_raw = data.get("space")
    expect(isinstance(space_raw, Mapping) and space_raw, f"{source}: space",
            "expected a mapping of defense fields to distributions")
    space: list[Dist] = []
    for path, raw in flatten_space(space_raw).items():
        where = f"{source}: space.{path}"
        expect(path.startswith("defense."), where, "a robust search tunes defense.* fields; "
                "the threat model belongs to population")
        dist = parse_dist(path, raw, where)
        for value in dist.extremes():
            check_override(base, {**members[0].fields, path: value}, where)
        space.append(dist)
    space += per_defense(data, base, source, space)

    max_drop = _fraction(data.get("max_acc_drop", RobustSpec.max_acc_drop),
                         f"{source}: max_acc_drop")
    budgets = data.get("tradeoff_budgets", [])
    expect(isinstance(budgets, list), f"{source}: tradeoff_budgets",
            f"expected a list of fractions, got {budgets!r}")
    budgets = [_fraction(b, f"{source}: tradeoff_budgets") for b in budgets]
    for key in ("storage", "experiment", "cache_dir"):
        expect(data.get(key) is None or isinstance(data.get(key), str), f"{source}: {key}",
                f"expected a string, got {data.get(key)!r}")
    if isinstance(data.get("storage"), str) and "://" in data["storage"]:
        raise UsageError(f"{source}: storage: {data['storage']!r}: URIs are not supported yet; "
                         "use a folder, shared by all nodes on a cluster (e.g. NFS)")
    res = build(ResourceSpec, data.get("resources"), f"{source}: resources")
    expect(res.gpu <= 1 or float(res.gpu).is_integer(), f"{source}: resources.gpu",
            f"a fraction of one GPU (<= 1) or a whole number of GPUs, got {res.gpu}")
    spec = RobustSpec(
        name=name, source=source, base=base, members=members,
        holdout=_members(held_models or models, holdout_seeds, "holdout" if split else "all"),
        space=tuple(space), split_test=split,
        budget=integer(data.get("budget", RobustSpec.budget), f"{source}: budget", 1),
        max_acc_drop=max_drop,
        min_asr=_fraction(data.get("min_asr", RobustSpec.min_asr), f"{source}: min_asr"),
        top_k=integer(data.get("top_k", RobustSpec.top_k), f"{source}: top_k", 1),
        tradeoff_budgets=tuple(sorted(set(budgets))),
        references=_references(data, base, source),
        search_seed=integer(data.get("search_seed", 0), f"{source}: search_seed", 0),
        time_budget_s=_time_budget(data.get("time_budget_s"), f"{source}: time_budget_s"),
        compute_budget_s=_time_budget(data.get("compute_budget_s"),
                                      f"{source}: compute_budget_s"),
        resources=res,
        max_concurrent=integer(data.get("max_concurrent", 2), f"{source}: max_concurrent", 1),
        max_failures=integer(data.get("max_failures", 1), f"{source}: max_failures", 0),
        storage=data.get("storage") or RobustSpec.storage,
        experiment=data.get("experiment") or RobustSpec.experiment,
        cache_dir=absolute(data.get("cache_dir")),
        replicates=integer(data.get("replicates", 1), f"{source}: replicates", 1),
        adopt_tolerance=_fraction(data.get("adopt_tolerance", RobustSpec.adopt_tolerance),
                                  f"{source}: adopt_tolerance"),
        member_batch=integer(data.get("member_batch", 1), f"{source}: member_batch", 1))
    spec = _checked_replicates(spec, f"{source}: replicates")
    return replace(spec, start_points=_start_points(data, spec, source))


def _start_points(data: Mapping[str, Any], spec: RobustSpec,
                  source: str) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """``start_with: [reference, ...]``: those references' settings become the search's first
    trials (enqueued in Optuna). Why: with a small budget TPE's first trials are random draws
    from wide ranges, so without this the "tuned" setting can be worse than the default it
    replaces; starting from the default (as SMAC does) makes the search's winner at least as
    good as the default on the search members, whatever the budget. The reference's knobs are
    read from its resolved trial config, so they must be one value over the population and lie
    inside the space."""
    names = data.get("start_with", [])
    where = f"{source}: start_with"
    expect(isinstance(names, list) and all(isinstance(n, str) for n in names), where,
            f"expected a list of reference names, got {names!r}")
    expect(not names or all(d.only_for is None for d in spec.space), where,
            "start_with needs a space without per_defense knobs")
    refs = {r.name: r for r in spec.references}
    points = []
    for name in names:
        w = f"{where}.{name}"
        expect(name in refs, w, f"not a reference of this spec{did_you_mean(name, refs)}; "
                f"references: {', '.join(refs) or 'none'}")
        ref = refs[name]
        configs = [member_config(spec, m, dict(ref.setting), ref) for m in spec.members]
        point: dict[str, Any] = {}
        for d in spec.space:
            values = {_knob(cfg, d.path) for cfg in configs}
            expect(len(values) == 1, f"{w}: {d.path}", f"differs across the population "
                    f"({sorted(map(str, values))}); start_with needs one value")
            point[d.param_name] = _in_space(d, values.pop(), f"{w}: {d.path}")
        points.append(tuple(point.items()))
    return tuple(points)


def _knob(cfg: Any, path: str) -> Any:
    """A ``defense.*`` field of a resolved trial config: a common field or the defense's own."""
    name = path.removeprefix("defense.")
    if hasattr(cfg.defense, name):
        return getattr(cfg.defense, name)
    return getattr(cfg.defense.params, name)


def _in_space(d: Dist, value: Any, where: str) -> Any:
    """``value`` as the space spells it (a choice's own element), or one error line."""
    if d.kind in ("uniform", "loguniform", "int", "logint"):
        ok = isinstance(value, (int, float)) and d.args[0] <= value <= d.args[1]
        expect(ok, where, f"{value!r} lies outside the space [{d.args[0]}, {d.args[1]}]")
        return int(value) if d.kind in ("int", "logint") else float(value)
    match = [c for c in d.args if c == value and isinstance(c, bool) == isinstance(value, bool)]
    expect(bool(match), where, f"{value!r} is not one of the choices {list(d.args)}")
    return match[0]


def _time_budget(value: Any, where: str) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    expect(ok and value > 0, where, f"expected a number of seconds > 0, got {value!r}")
    return float(value)


def load_robust(path: str | Path,
                data_dirs: Mapping[str | None, str] | None = None) -> RobustSpec:
    """A robust spec file, validated (``data_dirs`` as for ``robust_plan``)."""
    data = load_yaml(path)
    expect(data is not None, str(path), "empty spec")
    return robust_plan(data, str(path), data_dirs)


# ---------------------------------------------------------------------------------------------
# From a spec to trial configs


def setting_fields(spec: RobustSpec, setting: Mapping[str, Any],
                   reference: Reference | None = None) -> dict[str, Any]:
    """The flat trial fields a setting runs with (base + setting), population excluded."""
    base = _defense_only(spec.base, reference) if reference is not None else spec.base
    return {**flatten(base), **setting}


def member_config(spec: RobustSpec, member: Member, setting: Mapping[str, Any],
                  reference: Reference | None = None):
    """The resolved trial config of ``setting`` on ``member``. Only the final metrics count in
    a robust search, so the defense evaluates once, at its last epoch (eval.every = epochs).
    The attack side resolves exactly as ``d3tune run --attack A --seed S`` does, so members
    share the model cache with single runs."""
    from d3tune.config import resolve, trial_config

    flat = {**setting_fields(spec, setting, reference), **member.fields}
    if reference is not None and reference.builtin:
        flat["defaults"] = "builtin"
    cfg = resolve(trial_config(unflatten(flat)))
    return replace(cfg, eval=replace(cfg.eval, every=cfg.defense.epochs, subset=None))


def datasets_of(spec: RobustSpec) -> list[str]:
    """The datasets a search's members (search and holdout) are drawn from."""
    from d3tune.config import DataConfig

    default = (spec.base.get("data") or {}).get("name", DataConfig.name)
    return sorted({str(m.fields.get("data.name", default)) for m in spec.members + spec.holdout})


def defaults_yaml(spec: RobustSpec, setting: Mapping[str, Any],
                  reference: Reference | None = None) -> dict[str, Any]:
    """The chosen setting as a ``d3tune run --config`` file: the defense section only."""
    flat = {k: v for k, v in setting_fields(spec, setting, reference).items()
            if k.startswith("defense.")}
    return unflatten(flat)


__all__ = ["Member", "Reference", "RobustSpec", "robust_plan", "load_robust", "member_config",
           "setting_fields", "defaults_yaml", "replicate_specs", "REPLICATE_SEED_STRIDE"]
