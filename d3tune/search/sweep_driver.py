"""``d3tune sweep`` and ``d3tune ablate``: run a plan on Ray, then summarise it.

The summary (every trial's final row, the best trials or the Pareto front, Optuna's importance
and parallel-coordinate plots) is printed and logged to the sweep's parent MLflow run. Best
trials and fronts hold only trials that ran to their end within the spec's constraints: a trial
the scheduler stopped has no final result. Library warnings are logged at debug level, never
printed raw: users see d3tune's words or nothing.
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from d3tune import tracking
from d3tune.search import engine, tuner
from d3tune.search.mlflow_callback import MlflowSweepCallback
from d3tune.runstate import FINAL, kill_point, trial_overrides
from d3tune.specs.inputs import input_paths
from d3tune.specs.sweep_spec import RunPlan

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("acc", "asr", "ra", "der", "epoch", "acc_before", "asr_before")
HIDDEN_COLUMNS = ("node_id", "node_ip", "error", "acc_before", "asr_before", "cache_builds", "stopped_early")


def pareto_front(df: pd.DataFrame, metrics: tuple[str, ...], modes: tuple[str, ...]) -> pd.DataFrame:
    """Rows no other row dominates (at least as good in every objective, better in one)."""
    signs = [1 if m == "max" else -1 for m in modes]
    values = df[list(metrics)].to_numpy(dtype=float) * signs
    keep = []
    for i, row in enumerate(values):
        dominated = ((values >= row).all(axis=1) & (values > row).any(axis=1)).any()
        keep.append(not dominated)
    return df[keep]


def results_frame(results: Any) -> pd.DataFrame:
    """One row per trial: its overrides and its last reported metrics."""
    rows = []
    for r in results:
        if r.metrics is None or "acc" not in r.metrics:
            continue
        overrides = trial_overrides(r.config or {})
        rows.append({"trial_id": r.metrics.get("trial_id"), **overrides,
                     **{k: r.metrics.get(k) for k in SUMMARY_COLUMNS},
                     "node_id": r.metrics.get("node_id"), "node_ip": r.metrics.get("node_ip"),
                     "cache_builds": r.metrics.get("cache_builds", 0), "error": bool(r.error),
                     "stopped_early": r.metrics.get(FINAL) is False})
    return pd.DataFrame(rows)


def feasible(plan: RunPlan, df: pd.DataFrame) -> pd.Series:
    """Rows within every constraint of the spec (all rows when it has none)."""
    from d3tune.specs.sweep_spec import constraint_values

    if not plan.constraints or df.empty:
        return pd.Series(True, index=df.index)
    return df.apply(lambda r: all(v <= 0 for v in constraint_values(
        plan.constraints, r.to_dict()).values()), axis=1).astype(bool)


def best_rows(plan: RunPlan, df: pd.DataFrame, top: int = 5) -> pd.DataFrame:
    """Best trials (one objective) or the Pareto front (several), among the trials that ran to
    their end, did not fail, and keep the spec's constraints."""
    if df.empty:
        return df
    keep = feasible(plan, df)
    if "stopped_early" in df:
        keep &= ~df["stopped_early"].astype(bool)
    if "error" in df:
        keep &= ~df["error"].astype(bool)
    df = df[keep]
    if df.empty:
        return df
    if plan.multi_objective:
        return pareto_front(df, plan.metric, plan.mode).sort_values(plan.metric[0],
                                                                    ascending=plan.mode[0] == "min")
    return df.sort_values(plan.metric[0], ascending=plan.mode[0] == "min").head(top)


def _table(title: str, df: pd.DataFrame) -> Table:
    t = Table(title=title)
    for col in df.columns:
        t.add_column(str(col), justify="right")
    for _, row in df.iterrows():
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    return t


def optuna_plots(plan: RunPlan, out: Path) -> list[Path]:
    """Hyperparameter importance (one plot per objective) and parallel coordinates from the
    persisted study, over the trials that ran to their end."""
    if plan.kind != "sweep":
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = _optuna_plots(plan, out)
    for w in caught:  # e.g. PedAnova's "low `target` values": we negate maximised targets
        log.debug("optuna plots: %s: %s", w.category.__name__, w.message)
    return paths


def _optuna_plots(plan: RunPlan, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=plan.name, storage=plan.paths.optuna_storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2:
        return []
    jobs = []
    for i, (name, mode) in enumerate(zip(plan.metric, plan.mode)):
        # The importance evaluator ranks params for *low* target values: negate a maximised one.
        sign = -1.0 if mode == "max" else 1.0
        target = (lambda t, i=i, sign=sign: sign * t.values[i]) if plan.multi_objective else None
        fname = f"importance_{name}.png" if plan.multi_objective else "importance.png"
        jobs.append((fname, ovm.plot_param_importances, target, name))
    first = (lambda t: t.values[0]) if plan.multi_objective else None
    jobs.append(("parallel_coordinates.png", ovm.plot_parallel_coordinate, first, plan.metric[0]))
    paths = []
    for fname, plot, target, name in jobs:
        try:
            plot(study, target=target, target_name=name)
            plt.gcf().set_size_inches(9, 5)
            plt.tight_layout()
            plt.savefig(out / fname, dpi=110)
            paths.append(out / fname)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. one distinct value
            log.warning("could not draw %s: %s", fname, str(exc).splitlines()[0] if str(exc)
                        else type(exc).__name__)
        finally:
            plt.close("all")
    return paths


def write_outputs(plan: RunPlan, df: pd.DataFrame, best: pd.DataFrame, out: Path
                  ) -> dict[str, float]:
    """The sweep's files in ``out`` (trials, best rows or Pareto front, the best config); the
    best row's metrics, for the parent run."""
    df.to_csv(out / "trials.csv", index=False)
    best.to_csv(out / ("pareto_front.csv" if plan.multi_objective else "best_trials.csv"),
                index=False)
    if best.empty:
        return {}
    top = best.iloc[0].to_dict()
    (out / "best_config.json").write_text(json.dumps(
        {k: v for k, v in top.items() if k not in SUMMARY_COLUMNS + HIDDEN_COLUMNS},
        indent=1, default=str))
    return {f"best_{m}": float(top[m]) for m in plan.metric}


def run_plan(plan: RunPlan, *, resume: bool = False, address: str | None = None,
             console: Console | None = None) -> pd.DataFrame:
    """Run a sweep or ablation plan on Ray Tune (fresh or ``resume``), log it to MLflow, print
    its best rows; returns one row per trial. Raises UsageError for an existing run without
    ``resume`` (or none with it)."""
    import ray

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    exp_dir = plan.paths.experiment_dir

    started = tuner.init_ray(address, input_paths(plan))
    try:
        run = engine.plan_tuner(plan, resume=resume, callbacks=[MlflowSweepCallback(plan)])
        results = run.fit()
    finally:
        if started:
            ray.shutdown()
    kill_point("report")
    callback = MlflowSweepCallback(plan)  # for the summary
    callback.setup()
    if plan.kind == "sweep":
        from d3tune.search.optuna_search import fail_running

        failed = fail_running(plan.paths.optuna_storage, plan.name)
        if failed:
            log.warning("%d Optuna trials were still running after the sweep; marked failed",
                        failed)
    callback.close_unfinished()
    df = results_frame(results)
    best = best_rows(plan, df)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if not df.empty:
            optuna_plots(plan, out)
        metrics = write_outputs(plan, df, best, out)
        status = "FINISHED" if not df.empty and not df["error"].any() else "FAILED"
        callback.finish_parent(status, metrics, [(p, None) for p in sorted(out.iterdir())])
    title = ("Pareto front (" + " vs ".join(f"{m} {d}" for m, d in zip(plan.metric, plan.mode))
             + ")") if plan.multi_objective else f"best trials by {plan.metric[0]} ({plan.mode[0]})"
    shown = [c for c in best.columns if c not in HIDDEN_COLUMNS]
    console.print(_table(f"{plan.name}: {len(df)} trials; {title}", best[shown]))
    if callback.client is not None and callback.parent_id:
        console.print(f"MLflow parent run {callback.parent_id} ({callback.child_count()} "
                      f"child runs) in experiment {plan.experiment!r}")
        console.print(tracking.ui_hint(callback.uri, callback.exp_id), soft_wrap=True)
    console.print(f"Tune results: {exp_dir}")
    return df
