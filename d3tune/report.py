"""Reports and robust defaults from the MLflow runs of a sweep or ablation.

Everything is read back from MLflow (the child runs' params are the resolved trial configs, their
final metrics the results), so a report can be made on any machine that reaches the store, long
after the sweep. ``robust_defaults`` answers "which setting can I trust?": the setting with the
best worst-case DER over attacks x datasets x architectures x seeds, among those whose mean
accuracy drop stays within a budget.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from d3tune import tracking
from d3tune.errors import UsageError

log = logging.getLogger(__name__)

FINAL_METRICS = ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after", "der")
POPULATION = ("attack.name", "attack.result", "data.name", "model.arch", "seed")  # held across
IGNORED = {"device", "data.data_dir"}


# ---------------------------------------------------------------------------------------------
# Reading runs


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.tracking_uri())


def find_parent(client: Any, ref: str) -> Any:
    """A parent run by id, or the latest sweep/ablation parent run of an experiment by name."""
    try:
        return client.get_run(ref)
    except Exception:
        pass
    exp = client.get_experiment_by_name(ref)
    if exp is None:
        raise UsageError(f"RUN {ref!r}: neither an MLflow run id nor an experiment name in "
                         f"{tracking.tracking_uri()}")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`d3tune.kind` != 'run'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise UsageError(f"RUN {ref!r}: experiment has no sweep or ablation parent run")
    return parents[0]


def _number(value: str) -> Any:
    if value in ("None", ""):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value


def children_frame(client: Any, parent: Any) -> pd.DataFrame:
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                              max_results=50_000)
    rows = []
    for r in runs:
        if not all(k in r.data.metrics for k in ("acc_after", "asr_after", "der")):
            continue  # unfinished or failed trial
        row = {k: _number(v) for k, v in r.data.params.items() if k not in IGNORED}
        row.update({k: r.data.metrics.get(k) for k in FINAL_METRICS})
        row["run_id"] = r.info.run_id
        rows.append(row)
    if not rows:
        raise UsageError(f"run {parent.info.run_id}: no finished child runs to report on")
    df = pd.DataFrame(rows)
    df["acc_drop"] = df["acc_before"] - df["acc_after"]
    return df


def varying(df: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    """Param columns whose value differs between runs (the knobs and the population)."""
    skip = set(FINAL_METRICS) | {"run_id", "acc_drop"} | set(exclude)
    return [c for c in df.columns if c not in skip and df[c].astype(str).nunique() > 1]


# ---------------------------------------------------------------------------------------------
# Tables and plots


def summary_table(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean and std over seeds for every cell."""
    metrics = ["acc_after", "asr_after", "ra_after", "der", "acc_drop"]
    if not by:
        by = ["_all"]
        df = df.assign(_all="all")
    g = df.groupby(by, dropna=False)[metrics]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=0).add_suffix("_std"))
    out["n"] = g.size()
    return out.reset_index()


def markdown(table: pd.DataFrame, by: list[str]) -> str:
    cols = by + ["ACC", "ASR", "RA", "DER", "ACC drop", "n"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        cells = [str(r[c]) for c in by]
        for m in ("acc_after", "asr_after", "ra_after", "der", "acc_drop"):
            cells.append(f"{r[m + '_mean']:.3f} ± {r[m + '_std']:.3f}")
        cells.append(str(int(r["n"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(df: pd.DataFrame, knobs: list[str], out: Path) -> list[Path]:
    """Each metric vs each numeric knob (one line per attack, seed spread as a band) and an
    ACC-vs-ASR scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    group = "attack.name" if "attack.name" in df else None
    numeric = [k for k in knobs if pd.api.types.is_numeric_dtype(df[k]) and k != "seed"]
    for knob in numeric:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, metric, label in zip(axes, ("acc_after", "asr_after", "der"), ("ACC", "ASR", "DER")):
            for name, part in (df.groupby(group) if group else [("all", df)]):
                stats = part.groupby(knob)[metric].agg(["mean", "std", "min", "max"]).fillna(0)
                x = stats.index.to_numpy(dtype=float)
                ax.plot(x, stats["mean"], marker="o", label=str(name))
                ax.fill_between(x, stats["min"], stats["max"], alpha=0.2)
            ax.set_xlabel(knob)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if (df[knob] > 0).all() and df[knob].max() / max(df[knob].min(), 1e-12) >= 20:
                ax.set_xscale("log")
        axes[0].legend(title=group or "", fontsize=8)
        fig.suptitle(f"{knob}: mean over seeds and other knobs; band = min..max")
        fig.tight_layout()
        path = out / f"{knob.replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, part in (df.groupby(group) if group else [("all", df)]):
        ax.scatter(part["asr_after"], part["acc_after"], label=str(name), alpha=0.7)
    ax.set_xlabel("ASR after defense (lower is better)")
    ax.set_ylabel("ACC after defense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "acc_vs_asr.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths + [path]


def make_report(ref: str, out_dir: str | Path | None = None) -> Path:
    client = _client()
    parent = find_parent(client, ref)
    df = children_frame(client, parent)
    knobs = varying(df)
    by = [k for k in knobs if k != "seed"]
    out = Path(out_dir or Path("d3tune_results") / "reports" / (parent.info.run_name or parent.info.run_id))
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(df, by)
    table.to_csv(out / "summary.csv", index=False)
    df.to_csv(out / "trials.csv", index=False)
    images = plots(df, knobs, out)
    seeds = df["seed"].nunique() if "seed" in df else 1
    text = [f"# Report: {parent.info.run_name} ({parent.info.run_id})", "",
            f"{len(df)} finished trials; {seeds} seed(s); knobs: {', '.join(by) or 'none'}.",
            "Mean ± std over seeds (population std).", "", markdown(table, by), ""]
    text += [f"![{p.stem}]({p.name})" for p in images]
    (out / "report.md").write_text("\n".join(text) + "\n")
    for path in sorted(out.iterdir()):
        try:
            client.log_artifact(parent.info.run_id, str(path), "report")
        except Exception as exc:  # the files are on disk either way
            log.warning("could not log %s to MLflow: %s", path.name, exc)
            break
    return out


# ---------------------------------------------------------------------------------------------
# Robust defaults


@dataclass(frozen=True)
class Choice:
    setting: dict[str, Any]
    worst_der: float
    mean_der: float
    mean_acc_drop: float
    n: int


@dataclass(frozen=True)
class Defaults:
    best: Choice
    runner_up: Choice | None
    margin: float | None  # best worst-case DER minus the runner-up's
    considered: int
    admissible: int


def robust_defaults(df: pd.DataFrame, settings: list[str], max_acc_drop: float = 0.02) -> Defaults:
    """Best worst-case DER over the population, subject to mean ACC drop <= max_acc_drop."""
    if not settings:
        raise UsageError("defaults: the runs vary no setting besides the population "
                         f"({', '.join(POPULATION)}); nothing to choose between")
    rows = []
    for key, part in df.groupby(settings, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        rows.append(Choice({k: _plain(v) for k, v in zip(settings, key)},
                           float(part["der"].min()), float(part["der"].mean()),
                           float(part["acc_drop"].mean()), len(part)))
    ok = [c for c in rows if c.mean_acc_drop <= max_acc_drop + 1e-12]
    if not ok:
        least = min(rows, key=lambda c: c.mean_acc_drop)
        raise UsageError(f"defaults: no setting keeps the mean ACC drop within {max_acc_drop:.3f} "
                         f"(smallest: {least.mean_acc_drop:.3f} for {least.setting}); "
                         "raise --max-acc-drop or evaluate gentler settings")
    ok.sort(key=lambda c: (c.worst_der, c.mean_der), reverse=True)
    runner = ok[1] if len(ok) > 1 else None
    return Defaults(ok[0], runner, ok[0].worst_der - runner.worst_der if runner else None,
                    len(rows), len(ok))


def _plain(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return None if math.isnan(v) else float(v)
    return v


def optuna_importance(client: Any, parent: Any) -> dict[str, float] | None:
    storage = parent.data.tags.get("d3tune.optuna_storage")
    study_name = parent.data.tags.get("d3tune.study")
    if not storage or not study_name:
        return None
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        target = (lambda t: sign * t.values[0]) if len(study.directions) > 1 else None
        return dict(optuna.importance.get_param_importances(study, target=target))
    except Exception as exc:  # too few trials, or a moved study
        log.warning("no Optuna importance for %s: %s", study_name, exc)
        return None


def find_defaults(refs: list[str], max_acc_drop: float, out: str | Path) -> tuple[Defaults, dict]:
    from d3tune.config import unflatten
    from d3tune.yamlio import dump_yaml

    client = _client()
    parents = [find_parent(client, r) for r in refs]
    df = pd.concat([children_frame(client, p) for p in parents], ignore_index=True)
    settings = varying(df, exclude=POPULATION)
    result = robust_defaults(df, settings, max_acc_drop)
    importance = {}
    for p in parents:
        imp = optuna_importance(client, p)
        if imp:
            importance[p.info.run_name or p.info.run_id] = imp
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dump_yaml(unflatten(result.best.setting), out)
    return result, importance
