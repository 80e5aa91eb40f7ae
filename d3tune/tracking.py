"""MLflow: where runs go and how one trial is logged.

The tracking store defaults to a SQLite file in the working directory (MLflow's own default in
3.x, made explicit so we can print the exact ``mlflow ui`` line). ``MLFLOW_TRACKING_URI`` wins
when set (a tracking server on a cluster). Logging happens on the driver only, so workers never
need access to the store.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_EXPERIMENT = "d3tune"
MAX_PARAM_CHARS = 6000


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri else f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def _artifact_root(uri: str) -> str | None:
    """Keep artifacts next to a SQLite file, not wherever the process happens to run."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def experiment_id(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri))
    except Exception:  # created concurrently by another driver
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def ui_hint(uri: str, exp_id: str) -> str:
    """What to type to browse the runs, and the page that shows the runs table (VERIFIED.md)."""
    if uri.startswith(("http://", "https://")):
        return f"browse: {uri.rstrip('/')}/#/experiments/{exp_id}/runs"
    return (f"browse: mlflow ui --backend-store-uri {uri}  then open "
            f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs")


def params_for_mlflow(flat: Mapping[str, Any]) -> dict[str, str]:
    return {k: ("None" if v is None else str(v))[:MAX_PARAM_CHARS] for k, v in flat.items()}


def metric_batch(rows: Iterable[Mapping[str, Any]], step_key: str = "epoch",
                 timestamp_ms: int = 0) -> list[Any]:
    """Per-epoch rows -> mlflow Metric objects with step (numbers only)."""
    from mlflow.entities import Metric

    out = []
    for row in rows:
        step = int(row.get(step_key, 0))
        for k, v in row.items():
            if k != step_key and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(Metric(k, float(v), timestamp_ms, step))
    return out
