"""``d3tune adopt RUN``: a finished robust search's chosen setting becomes a dataset's adopted
defaults (``d3tune.adopted_defaults`` reads them back for every run).

Why a module of its own: adopting reads MLflow and resolves a trial config (every knob of the
defense, for the dataset), while reading adopted defaults is what config resolution itself
does; kept apart, the config layer does not import what sits above it.
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from d3tune.adopted_defaults import PACKAGE_DIR, Adopted, folders, write
from d3tune.errors import UsageError


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


def adopt(run_id: str, dataset: str | None = None, path: Path | None = None,
          tracking_uri: str | None = None, force: bool = False) -> Adopted:
    """Read a finished robust search (MLflow parent run) and adopt its chosen setting. Of a
    replicated search, the replicate whose winner has the best search-phase worst case (a rule
    fixed before the holdout), refused (UsageError, unless ``force``) when the replicates'
    holdout worst cases spread by more than the spec's ``adopt_tolerance``: a default that a
    rerun would not confirm is not robust."""
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
    replicated = tags.get("d3tune.kind") == "robust-replicated"
    if tags.get("d3tune.kind") != "robust" and not replicated:
        raise UsageError(f"RUN: {run_id} is not a robust search's parent run (d3tune.kind = "
                         f"{tags.get('d3tune.kind')!r}); adopt the run `d3tune robust` printed")
    extra: dict[str, Any] = {}
    if replicated:
        extra = _replicated_checks(client, run, force)
    elif "holdout_worst_der" not in metrics:
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
        **extra, "adopted_on": _dt.date.today().isoformat()}
    target = path or ((folders() or [PACKAGE_DIR])[0] / f"{dataset}.yaml")
    return write(target, dataset, defense, knobs, provenance)


def _replicated_checks(client: Any, run: Any, force: bool) -> dict[str, Any]:
    """A replicated search's adoption: its spread against the tolerance (refused beyond it
    unless ``force``), and what the provenance records: the procedure's interval next to the
    adopted setting's own holdout figures, the protocol, the seeds and the software."""
    import json
    import logging
    import tempfile

    m, params = run.data.metrics, run.data.params
    run_id = run.info.run_id
    if run.data.tags.get("d3tune.adopt_replicate", "none") == "none":
        raise UsageError(f"RUN: replicated search {run_id} chose nothing (no replicate kept "
                         "the ACC budget in its search, or it did not finish): nothing to adopt")
    spread, tolerance = m.get("holdout_spread"), _float(params.get("adopt_tolerance"))
    if spread is not None and tolerance is not None and spread > tolerance + 1e-12:
        why = (f"its replicates' holdout worst cases spread by {spread:.3f}, more than "
               f"adopt_tolerance {tolerance:.3f}: a rerun of the search would likely choose "
               "a setting that scores differently")
        if not force:
            raise UsageError(f"RUN: not adopting replicated search {run_id}: {why}; rerun with "
                             "more budget, replicates or population seeds, or pass --force")
        logging.getLogger(__name__).warning("adopting despite: %s (--force)", why)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            prov = json.loads(Path(client.download_artifacts(
                run_id, "replicates/provenance.json", tmp)).read_text())
        except Exception:  # noqa: BLE001 - an older run or a missing artifact: record less
            prov = {}
    return {"replicated": True, "adopted_replicate": int(run.data.tags["d3tune.adopt_replicate"]),
            "procedure": {"expected_worst_der": m.get("expected_worst_der"),
                          "interval": [m.get("expected_worst_der_low"),
                                       m.get("expected_worst_der_high")],
                          "interval_kind": run.data.tags.get("d3tune.interval"),
                          "draws": m.get("draws"), "holdout_spread": spread,
                          "adopt_tolerance": tolerance, "forced": bool(force and spread is not None
                                                                         and tolerance is not None
                                                                         and spread > tolerance)},
            "search_worst_der": m.get("adopt.search_worst_der"),
            "holdout_worst_der": m.get("adopt.holdout_worst_der"), **prov}


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
