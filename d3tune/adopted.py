"""Adopted defaults: a defense's every knob, per dataset, as confirmed by a robust search.

Why: "finding robust defaults" should end in the defaults ``d3tune run`` uses, not in a YAML
file beside them. ``d3tune adopt RUN`` reads a finished robust search from MLflow (its chosen
setting, confirmed on the holdout) and writes every knob of that defense, resolved for the
dataset, into ``<dataset>.yaml`` with where it came from (spec, run, search and holdout
figures, date). ``trial_config`` then fills each defense knob a config leaves unset from there,
before the dataset profile and the defense's built-in values; ``defaults: builtin`` in a
config (the robust search's ``paper`` reference uses it) skips the adopted layer.

Where the files live: ``$D3TUNE_DEFAULTS_DIR`` first (a user's or a cluster's own), then
``d3tune/defaults/`` in the package (what d3tune ships). One file per dataset, one entry per
defense::

    d3:
      knobs: {epochs: 41, batch_size: 16, lr: 0.041, ..., eps: 0.13, init: near}
      provenance: {robust_run: ..., spec: ..., holdout_worst_der: 0.896, adopted_on: ...}
"""
from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d3tune.errors import UsageError

PACKAGE_DIR = Path(__file__).parent / "defaults"
ENV = "D3TUNE_DEFAULTS_DIR"
SHIPPED_ENV = "D3TUNE_SHIPPED_DEFAULTS"


@dataclass(frozen=True)
class Adopted:
    dataset: str
    defense: str
    knobs: dict[str, Any]  # the defense section's fields, name excluded
    provenance: dict[str, Any]
    path: Path

    def describe(self) -> str:
        """One line for the console: which settings a run used and why they are the defaults."""
        p = self.provenance
        figures = ", ".join(f"{label} {p[k]:.3f}" for k, label in (
            ("search_worst_der", "search worst DER"), ("holdout_worst_der", "holdout worst DER"))
            if isinstance(p.get(k), (int, float)))
        drop = p.get("holdout_mean_acc_drop")
        if isinstance(drop, (int, float)):
            figures += f", holdout ACC drop {drop * 100:.1f} points"
        return (f"{self.defense} defaults adopted for {self.dataset} from robust run "
                f"{p.get('robust_run', '?')} ({p.get('spec', '?')}; {figures}; "
                f"{p.get('adopted_on', '?')}) in {self.path}")


def folders() -> list[Path]:
    """Where adopted defaults are read: ``$D3TUNE_DEFAULTS_DIR``, then the package's own unless
    ``$D3TUNE_SHIPPED_DEFAULTS`` is 0 (the test suite sets it, so tests of the mechanism do not
    depend on what d3tune ships; ``defaults: builtin`` does the same for one config)."""
    extra = os.environ.get(ENV)
    shipped = os.environ.get(SHIPPED_ENV, "1") != "0"
    return ([Path(extra).expanduser()] if extra else []) + ([PACKAGE_DIR] if shipped else [])


def read(path: Path) -> dict[str, Any]:
    """A defaults file as {defense: {knobs, provenance}}, its shape checked (one line naming
    the file and field when it is off)."""
    from d3tune.yamlio import load_yaml

    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError(f"{path}: expected a mapping of defense name to {{knobs, provenance}}")
    for defense, entry in data.items():
        if not (isinstance(entry, Mapping) and isinstance(entry.get("knobs"), Mapping)
                and set(entry) <= {"knobs", "provenance"}):
            raise UsageError(f"{path}: {defense}: expected {{knobs: {{...}}, provenance: {{...}}}}")
    return dict(data)


def lookup(dataset: str, defense: str) -> Adopted | None:
    """The adopted defaults of ``defense`` on ``dataset``, from the first folder that has them."""
    for folder in folders():
        path = folder / f"{dataset}.yaml"
        if path.is_file():
            entry = read(path).get(defense)
            if entry is not None:
                return Adopted(dataset, defense, dict(entry["knobs"]),
                               dict(entry.get("provenance") or {}), path)
    return None


def full_knobs(dataset: str, defense_section: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of the defense, resolved for ``dataset`` (profile and built-in values where
    the section is silent): what an adopted entry stores, so it does not shift when a profile
    or a built-in default changes later."""
    from d3tune.config import resolve, to_dict, trial_config

    cfg = resolve(trial_config({"data": {"name": dataset}, "defaults": "builtin",
                                "defense": dict(defense_section)}, "adopt"))
    knobs = to_dict(cfg)["defense"]
    knobs.pop("name", None)
    return knobs


def write(path: Path, dataset: str, defense: str, knobs: Mapping[str, Any],
          provenance: Mapping[str, Any]) -> Adopted:
    """Add or replace one defense's entry (other defenses in the file are kept); atomic."""
    from d3tune.yamlio import dump_yaml

    data = read(path) if path.is_file() else {}
    data[defense] = {"knobs": dict(knobs), "provenance": dict(provenance)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    dump_yaml(data, tmp)
    tmp.replace(path)
    return Adopted(dataset, defense, dict(knobs), dict(provenance), path)


def adopt(run_id: str, dataset: str | None = None, path: Path | None = None,
          tracking_uri: str | None = None) -> Adopted:
    """Read a finished robust search (MLflow parent run) and adopt its chosen setting."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from d3tune import tracking
    from d3tune.yamlio import load_yaml

    uri = tracking_uri or tracking.tracking_uri()
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UsageError(f"RUN: no MLflow run {run_id!r} in {uri}") from None
    tags, metrics = run.data.tags, run.data.metrics
    if tags.get("d3tune.kind") != "robust":
        raise UsageError(f"RUN: {run_id} is not a robust search's parent run (d3tune.kind = "
                         f"{tags.get('d3tune.kind')!r}); adopt the run `d3tune robust` printed")
    if "holdout_worst_der" not in metrics:
        raise UsageError(f"RUN: robust search {run_id} chose nothing (no finalist kept the ACC "
                         "budget on the holdout, or it did not finish): nothing to adopt")
    datasets = [d for d in tags.get("d3tune.datasets", "").split(",") if d]
    if dataset is None:
        if len(datasets) != 1:
            raise UsageError(f"--dataset: robust search {run_id} covers "
                             f"{', '.join(datasets) or 'unrecorded datasets'}: name the one "
                             "whose defaults to set")
        dataset = datasets[0]
    elif datasets and dataset not in datasets:
        raise UsageError(f"--dataset: {dataset!r} is not in robust search {run_id}'s population "
                         f"({', '.join(datasets)})")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(client.download_artifacts(run_id, "defaults", tmp))
        except (MlflowException, OSError) as exc:
            raise UsageError(f"RUN: robust search {run_id} has no chosen-defaults artifact "
                             f"({type(exc).__name__})") from None
        files = sorted(folder.glob("*.yaml"))
        if len(files) != 1:
            raise UsageError(f"RUN: expected one YAML under {run_id}'s defaults/ artifact, "
                             f"found {len(files)}")
        chosen = load_yaml(files[0])
    section = (chosen or {}).get("defense") if isinstance(chosen, Mapping) else None
    if not isinstance(section, Mapping) or "name" not in section:
        raise UsageError(f"RUN: {run_id}'s chosen defaults have no defense section")
    defense = str(section["name"])
    knobs = full_knobs(dataset, section)
    provenance = {
        "robust_run": run_id, "experiment": client.get_experiment(
            run.info.experiment_id).name, "tracking_uri": uri,
        "spec": tags.get("d3tune.spec"), "population_seeds": tags.get("d3tune.population_seeds"),
        "holdout_seeds": tags.get("d3tune.holdout_seeds"),
        **{k: float(metrics[k]) for k in ("search_worst_der", "holdout_worst_der",
                                           "holdout_mean_der", "holdout_mean_acc_drop")
           if k in metrics},
        "max_acc_drop": _float(run.data.params.get("max_acc_drop")),
        "adopted_on": _dt.date.today().isoformat()}
    target = path or ((folders() or [PACKAGE_DIR])[0] / f"{dataset}.yaml")
    return write(target, dataset, defense, knobs, provenance)


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def describe_for(dataset: str, defense: str, mode: str) -> str:
    """What a run's defense settings rest on, in one line."""
    if mode == "builtin":
        return f"{defense} defaults: built-in + {dataset} profile (adopted skipped)"
    adopted = lookup(dataset, defense)
    if adopted is None:
        return f"{defense} defaults: built-in + {dataset} profile (none adopted)"
    return adopted.describe()
