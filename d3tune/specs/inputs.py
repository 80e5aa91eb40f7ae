"""Input checks shared by the CLI and the Python API: every dataset folder and imported model a
run can use exists and fits, checked before Ray starts or anything trains.

Why here and not in each command: a sweep, a robust search, a leaderboard and a single run all
fail the same way on a missing folder (one line naming the field, exit 2), and the API must
fail exactly as the CLI does.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from d3tune.attacks import ATTACKS, ImportedBackdoor
from d3tune.config import TrialConfig, flatten, resolve, trial_config, unflatten
from d3tune.data import DATASETS
from d3tune.errors import UsageError
from d3tune.specs.robust_spec import RobustSpec, member_config
from d3tune.specs.fields import PATH_FIELDS
from d3tune.specs.sweep_spec import RunPlan, absolute
from d3tune.trial import check_import, imported_model


def check_paths(cfg: TrialConfig) -> ImportedBackdoor | None:
    """Fail on a missing data folder, or an imported model that cannot be read or does not fit
    the trial, before anything is trained (``cfg`` resolved). Returns the imported model, if
    the attack brings one."""
    entry = ATTACKS[cfg.attack.name]
    imported = entry.load_backdoor(cfg.attack.params) if entry.load_backdoor else None
    if imported is not None:
        check_import(cfg, imported)
        imported_model(cfg, imported, torch.device("cpu"))  # the weights fit the architecture
    if DATASETS[cfg.data.name].needs_data_dir:
        hint = f" (the imported model was trained on {imported.data_hint})" if imported else ""
        if not cfg.data.data_dir:
            raise UsageError(f"data.data_dir: dataset {cfg.data.name!r} needs --data-dir{hint}")
        if not Path(cfg.data.data_dir).expanduser().is_dir():
            raise UsageError(f"data.data_dir: {cfg.data.data_dir!r} is not a directory")
    return imported


INPUT_FIELDS = ("data.name", "data.data_dir", "attack.name", "attack.result", "model.arch")


def check_inputs(plan: RunPlan) -> None:
    """Every dataset folder and imported model a trial of the plan can use (base, grid cells,
    `choice` values) exists and fits: a problem fails here, in one line, before Ray starts."""
    overrides = list(plan.cells)
    if plan.kind == "sweep":
        dists = [d for d in plan.space if d.path in INPUT_FIELDS or d.path in ("data", "attack")]
        overrides = [{d.path: v for d, v in zip(dists, combo)}
                     for combo in itertools.product(*(d.extremes() for d in dists))]
    seen: set[str] = set()
    for cell in overrides or [{}]:
        flat = {**flatten(plan.base), **cell}
        inputs = {k: v for k, v in flat.items() if k in INPUT_FIELDS or k.startswith("data.")}
        sig = repr(sorted(inputs.items()))
        if sig in seen:
            continue
        seen.add(sig)
        try:
            check_paths(resolve(trial_config(unflatten(flat))))
        except UsageError as exc:
            raise UsageError(f"{plan.source}: {exc}") from None


def check_members(spec: RobustSpec) -> None:
    """Every member's data folder and imported model exists and fits, before Ray starts."""
    seen: set[str] = set()
    for m in spec.members + spec.holdout:
        inputs = repr(sorted((k, v) for k, v in m.overrides if k != "seed"))
        if inputs in seen:
            continue
        seen.add(inputs)
        try:
            check_paths(member_config(spec, m, {}))
        except UsageError as exc:
            raise UsageError(f"{spec.source}: population ({m.id}): {exc}") from None


def input_paths(target: RunPlan | RobustSpec) -> dict[str, str]:
    """Every local path a trial of a plan (base and cells) or a robust search (members and
    holdout) reads: path -> the trial field naming it (a record's poisoned test images sit
    beside it, so its path stands for them)."""
    if isinstance(target, RobustSpec):
        flats = [dict(m.overrides) for m in target.members + target.holdout]
    else:
        base = flatten(target.base)
        flats = [{**base, **cell} for cell in (list(target.cells) or [{}])]
        flats += [{**base, d.path: v} for d in target.space if d.path in PATH_FIELDS
                  for v in d.extremes()]
    out: dict[str, str] = {}
    for flat in flats:
        for field in PATH_FIELDS:
            value = flat.get(field)
            if isinstance(value, str) and value:
                out[value] = field
    return out


def path_changes(storage: str | None = None, cache_dir: str | None = None,
                 experiment: str | None = None) -> dict[str, str]:
    """``--storage`` / ``--cache-dir`` / ``--experiment`` (or the API's keywords) as changes to
    a plan or spec. Storage must be a folder: the Optuna study and the run ledger live beside
    Tune's state."""
    changes = {}
    if storage:
        if "://" in storage:
            raise UsageError(f"--storage {storage!r}: URIs are not supported yet; use a "
                             "folder, shared by all nodes on a cluster (e.g. NFS)")
        changes["storage"] = storage
    if cache_dir:
        changes["cache_dir"] = absolute(cache_dir)
    if experiment:
        changes["experiment"] = experiment
    return changes
