"""Reports and robust defaults from the MLflow runs of a sweep or ablation.

Everything is read back from MLflow (the child runs' params are the resolved trial configs, their
final metrics the results), so a report can be made on any machine that reaches the store, long
after the sweep. ``robust_defaults`` answers "which setting can I trust?": the setting with the
best worst-case DER over attacks x datasets x architectures x seeds, among those whose mean
accuracy drop stays within a budget.

``build_report`` is the generic part: it takes any frame of one row per trial (setting columns,
population columns, seed columns, metric columns), so sweeps, ablations, the robust search and
the leaderboard share it. Layout rules are in report_layout, figures in report_figures, the
statistics in stats, and the Markdown/HTML rendering in report_html.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from d3tune import stats, tracking
from d3tune.errors import UsageError

# The report API in one place (callers: sweeps, ablations, robust search, leaderboard)
from d3tune.reports.figures import heatmaps, scatter  # noqa: F401
from d3tune.reports.layout import (  # noqa: F401
    METRICS,
    POPULATION_LABELS,
    SEEDS,
    Layout,
    discretise,
    integral_knobs,
    plan_layout,
    record_name,
    tidy,
)

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
    """A parent run by id; the latest sweep/ablation parent run of an experiment by name; or,
    because a user remembers the spec rather than its experiment, the latest parent run named
    after a spec (its ``name:``)."""
    try:
        return client.get_run(ref)
    except Exception:
        pass
    exp = client.get_experiment_by_name(ref)
    if exp is None:
        named = _latest_parent_named(client, ref)
        if named is not None:
            return named
        raise UsageError(f"RUN {ref!r}: neither an MLflow run id, an experiment name nor a "
                         f"sweep/ablation spec name in {tracking.tracking_uri()}")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`d3tune.kind` != 'run'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise UsageError(f"RUN {ref!r}: experiment has no sweep or ablation parent run")
    return parents[0]


def _latest_parent_named(client: Any, name: str) -> Any:
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not exps or "'" in name:  # a spec name holding a quote cannot go into MLflow's filter
        return None
    runs = client.search_runs(exps, filter_string=f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    return next((r for r in runs if "mlflow.parentRunId" not in r.data.tags
                 and r.data.tags.get("d3tune.kind") in ("sweep", "ablation")), None)


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
    """One row per child run of a sweep's or ablation's parent: params, tags and final metrics."""
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
    for col in df.columns:  # an int param stays an int even where some run lacks it (32, not 32.0)
        vals = [r.get(col) for r in rows if r.get(col) is not None]
        if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals) \
                and col not in FINAL_METRICS:
            df[col] = df[col].astype("Int64")
    df["acc_drop"] = df["acc_before"] - df["acc_after"]
    return df


def varying(df: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    """Param columns whose value differs between runs (the knobs and the population)."""
    skip = set(FINAL_METRICS) | {"run_id", "acc_drop"} | set(exclude)
    return [c for c in df.columns if c not in skip and df[c].astype(str).nunique() > 1]


# ---------------------------------------------------------------------------------------------
# Tables


def summary_table(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean and std over seeds for every cell (summary.csv)."""
    metrics = [m for m in ("acc_after", "asr_after", "ra_after", "der", "acc_drop") if m in df]
    if not by:
        by = ["_all"]
        df = df.assign(_all="all")
    g = df.groupby(by, dropna=False, observed=True)[metrics]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=0).add_suffix("_std"))
    out["n"] = g.size()
    return out.reset_index()


def _ci_text(m: float, lo: float, hi: float, n: int, bounded: bool) -> str:
    """ "mean [low, high]"; a metric that lives in [0, 1] gets its interval clipped to it."""
    if n < 2:
        return f"{m:.3f}"
    if bounded:
        lo, hi = max(lo, 0.0), min(hi, 1.0)
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def _bounded(df: pd.DataFrame, col: str) -> bool:
    v = df[col].dropna()
    return bool(len(v)) and v.min() >= 0 and v.max() <= 1


def ci_table(df: pd.DataFrame, by: list[str], metrics: tuple[tuple[str, str, bool], ...] = METRICS,
             level: float = 0.95) -> pd.DataFrame:
    """Every cell (nothing averaged): "mean [low, high]" t interval over its rows, and n."""
    out = None
    for label, col, _ in metrics:
        cs = stats.cell_stats(df, by, col, level)
        b = _bounded(df, col)
        cs[f"{label} mean [{level:.0%} CI]"] = [
            _ci_text(m, lo, hi, n, b)
            for m, lo, hi, n in zip(cs["mean"], cs["lo"], cs["hi"], cs["n"])]
        cs = cs.rename(columns={"mean": f"_{col}"}).drop(columns=["lo", "hi", "min", "max"])
        out = cs if out is None else out.merge(cs.drop(columns=["n"]), on=by, how="outer")
    order = f"_{metrics[0][1]}"
    out = out.sort_values(order, ascending=not metrics[0][2], kind="stable")
    shown = [c for c in out.columns if c not in by and not c.startswith("_") and c != "n"]
    cols = by + shown + ["n"]
    return out[cols].reset_index(drop=True)


def top_settings(df: pd.DataFrame, settings: list[str], metric: str = "der", top: int = 5,
                 maximize: bool = True, level: float = 0.95, label: str = "DER") -> pd.DataFrame:
    """Settings ranked by the mean of ``metric`` over their whole population, with the t
    interval over its members, the worst member and n."""
    cs = stats.cell_stats(df, settings, metric, level)
    worst = df.groupby(settings, dropna=False, observed=True)[metric] \
        .agg("min" if maximize else "max")
    cs = cs.merge(worst.rename("worst").reset_index(), on=settings)
    cs = cs.sort_values("mean", ascending=not maximize, kind="stable").head(top)
    b = _bounded(df, metric)
    cs[f"{label} mean [{level:.0%} CI]"] = [
        _ci_text(m, lo, hi, n, b) for m, lo, hi, n in zip(cs["mean"], cs["lo"], cs["hi"], cs["n"])]
    cs[f"worst {label}"] = cs["worst"].map(lambda v: f"{v:.3f}")
    return cs[settings + [f"{label} mean [{level:.0%} CI]", f"worst {label}", "n"]] \
        .reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# The report


def build_report(df: pd.DataFrame, out: str | Path, *, title: str, settings: list[str],
                 population: list[str] = list(POPULATION_LABELS), seeds: list[str] = list(SEEDS),
                 metrics: tuple[tuple[str, str, bool], ...] = METRICS, notes: list[str] = (),
                 level: float = 0.95) -> Path:
    """report.md, report.html (self-contained), heatmaps.png, acc_vs_asr.png, summary.csv and
    trials.csv in ``out`` from a frame of one row per trial: ``settings`` (the knobs compared),
    ``population`` (members a setting is judged over, e.g. attack; one panel each), ``seeds``
    (replicates) and the metric columns. Sweeps, ablations, the robust search and the
    leaderboard all call this; only how they gather the rows differs."""
    from d3tune.reports.html import to_html, to_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    primary = metrics[0]
    population = [p for p in population if p in df]
    seeds = [s for s in seeds if s in df]
    shown = discretise(df, settings)
    layout = plan_layout(shown, settings, population, primary[1], seeds)
    cells = list(settings) + [p for p in layout.panels if p not in settings]
    n_seeds = "1"
    if seeds:
        per = df.groupby(cells, dropna=False, observed=True)[seeds].apply(
            lambda g: len(g.drop_duplicates())) if cells \
            else pd.Series([len(df[seeds].drop_duplicates())])
        n_seeds = f"{per.min()}" if per.min() == per.max() else f"{per.min()}-{per.max()}"
    blocks: list[tuple[str, Any]] = [
        ("h1", title),
        ("p", f"{len(df)} finished trials; {n_seeds} seed(s) per cell; knobs (spec names): "
              f"{', '.join(settings) or 'none'}; panels: {', '.join(layout.panels) or 'none'}. "
              f"Intervals are {level:.0%} Student-t intervals over the trials of a cell "
              f"(n = trials per cell; wide at n = 2-3, as they should be; clipped to [0, 1])."),
    ]
    blocks += [("p", n) for n in notes]
    if layout.importance:
        blocks.append(("p", f"Importance (share of {primary[0]} variance explained by each "
                            "knob's main effect): " + ", ".join(
                                f"{k} {v:.2f}" for k, v in layout.importance.items())))
    for e in layout.averaged:
        blocks.append(("p", f"Averaged over {e.knob} in the heat maps: with the other knobs "
                            f"held, its levels differ in mean {primary[0]} by at most "
                            f"{e.level_gap:.3f}, within the seed spread ({e.seed_spread:.3f}); "
                            "the tables below keep it."))
    if settings:
        blocks += [("h2", ", ".join(m[0] for m in metrics) + " over "
                          + " x ".join(c for c in (layout.y, layout.x) if c)
                          + (" (one row of panels per " + ", ".join(layout.panels) + ")"
                             if layout.panels else ""))]
        blocks.append(("img", heatmaps(shown, layout, out / "heatmaps.png", metrics, title)))
        blocks.append(("h2", "Top settings (over the whole population)"))
        blocks.append(("table", top_settings(df, settings, primary[1], 5, primary[2], level,
                                             primary[0])))
        members = [p for p in population if df[p].astype(str).nunique() > 1] + seeds
        cmp = stats.compare_top(df, settings, primary[1], members, primary[2], level)
        if cmp is not None:
            blocks.append(("p", ("Paired over " + " x ".join(cmp.paired_on) + ": "
                                 if cmp.paired_on else "") + cmp.sentence(primary[0], level) + "."))
    blocks.append(("h2", "Every cell"))
    table = ci_table(df, cells, metrics, level)
    if len(table) > 80:
        blocks.append(("p", f"First 80 of {len(table)} cells by {primary[0]}; all in summary.csv."))
    blocks.append(("table", table.head(80)))
    colour_by = layout.panels[:1] or ([layout.x] if layout.x else [])
    if {"asr_after", "acc_after"} <= set(df.columns):
        blocks += [("h2", "ACC against ASR, every trial"),
                   ("img", scatter(shown, colour_by, out / "acc_vs_asr.png"))]
    summary_table(df, cells).to_csv(out / "summary.csv", index=False)
    df.to_csv(out / "trials.csv", index=False)
    (out / "report.md").write_text(to_markdown(blocks, out))
    (out / "report.html").write_text(to_html(blocks, title))
    return out


def make_report(ref: str, out_dir: str | Path | None = None) -> Path:
    """Read a sweep's or ablation's child runs from MLflow, write the report and log it to the
    parent run under report/ (report.html opens from the MLflow UI's artifact view)."""
    client = _client()
    parent = find_parent(client, ref)
    df = tidy(children_frame(client, parent))
    knobs = varying(df, exclude=POPULATION_LABELS + SEEDS)
    df = integral_knobs(df, knobs)
    out = Path(out_dir or Path("d3tune_results") / "reports" / (parent.info.run_name or parent.info.run_id))
    build_report(df, out, title=f"Report: {parent.info.run_name or parent.info.run_id}",
                 settings=knobs, notes=[f"MLflow parent run {parent.info.run_id}."])
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
    """One setting's figures over the trials it ran: worst-case and mean DER, mean ACC drop,
    trial count."""
    setting: dict[str, Any]
    worst_der: float
    mean_der: float
    mean_acc_drop: float
    n: int


@dataclass(frozen=True)
class Defaults:
    """The robust default ``find_defaults`` found, the runner-up and the margin between them,
    and how many settings kept the budget."""
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
    for key, part in df.groupby(settings, dropna=False, observed=True):
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
    if v is pd.NA:
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return None if math.isnan(v) else float(v)
    return v


def optuna_importance(client: Any, parent: Any) -> dict[str, float] | None:
    """Optuna's fANOVA importance of the sweep's knobs for its first objective (None for an
    ablation or too few trials)."""
    storage = parent.data.tags.get("d3tune.optuna_storage")
    study_name = parent.data.tags.get("d3tune.study")
    if not storage or not study_name:
        return None
    import optuna

    try:
        from d3tune.runstate import storage_at

        study = optuna.load_study(study_name=study_name, storage=storage_at(storage))
        sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        target = (lambda t: sign * t.values[0]) if len(study.directions) > 1 else None
        return dict(optuna.importance.get_param_importances(study, target=target))
    except Exception as exc:  # too few trials, or a moved study
        log.warning("no Optuna importance for %s: %s", study_name, exc)
        return None


def find_defaults(refs: list[str], max_acc_drop: float, out: str | Path) -> tuple[Defaults, dict]:
    """The setting with the best worst-case DER over the runs' trials within ``max_acc_drop``,
    written to ``out`` as trial fields; returns it and each run's knob importance. Raises
    UsageError when no setting keeps the budget."""
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
