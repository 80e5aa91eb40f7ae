"""Ray Tune engine: a RunPlan (sweep or ablation) -> a Tuner -> results, resumable.

Sweeps use OptunaSearch (seeded TPE; several objectives through lists of metrics and modes)
behind a ConcurrencyLimiter, with its study persisted in SQLite next to Tune's experiment state,
and ASHA on one scalar (DER by default) even when the search is multi-objective. Ablations are a
grid of cells. Either way every trial is ``trial.run_trial`` reporting each defense epoch, and
MLflow logging happens on the driver (``mlflow_callback.MlflowSweepCallback``).

Where the truth lives after a killed driver (docs/reliability.md): which trials ended, and with
what result, is written on the driver the moment Tune says so: in the Optuna study (sweeps;
``optuna_search``) and in d3tune's run ledger beside it (every plan kind; ``mlflow_callback``;
the names both use are in ``runstate``). Tune's experiment state is a snapshot taken every few
seconds: resume uses it only for what it alone holds (in-flight trials' checkpoints, the
scheduler), and consults the study and the ledger for the rest (``replay_table`` here,
``ResumableOptunaSearch.restore``). MLflow is an output of the ledger, never read to decide
anything. The Tuner itself is built by ``tuner.build_tuner``, as for robust searches.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from d3tune.config import resolve, trial_config
from d3tune.errors import UsageError
from d3tune.runstate import (
    CHECKPOINT_FILE,
    FINAL,
    read_restored,
    trial_from_tune,
    trial_key,
)
from d3tune.search.searchers import sweep_searcher
from d3tune.search.tuner import build_tuner, require_resumable
from d3tune.specs.sweep_spec import RunPlan

log = logging.getLogger(__name__)


def checkpoint_due(last: float | None, now: float, every_s: float) -> bool:
    """Whether a trial should checkpoint now: never yet, or ``every_s`` seconds since the last
    (0: every epoch)."""
    return every_s <= 0 or (last is not None and now - last >= every_s)


def replay_if_ended(config: dict[str, Any], replay: dict[str, dict[str, Any]] | None) -> bool:
    """For any trainable run under ``--resume``: if ``replay`` (``replay_table``) says this trial
    already ended, report its recorded final result once and return True (the caller returns
    without training); Tune, the searcher and the MLflow callback then close it as before."""
    recorded = (replay or {}).get(trial_key(config))
    if recorded is None:
        return False
    from ray import tune

    tune.report({**recorded, "replayed": True})
    return True


def tune_trainable(config: dict[str, Any], *, base: dict[str, Any], cache_dir: str | None,
                   threads: int, checkpoint_every_s: float = 0.0,
                   replay: dict[str, dict[str, Any]] | None = None,
                   full_eval_at: tuple[float, ...] = ()) -> None:
    """The function Tune runs per trial (on any node). Reports every evaluated defense epoch;
    attaches a defense checkpoint at most every ``checkpoint_every_s`` seconds (0: every epoch),
    because each one is a model-sized write that Tune then copies into its storage.
    A trial that ``replay`` says already ended (a resumed Tune restarting it from a stale
    snapshot) reports its recorded final result once and returns: it is never run twice."""
    import ray
    import torch
    from ray import tune

    if replay_if_ended(config, replay):
        return

    from d3tune.cache import ModelCache
    from d3tune.trial import run_trial

    torch.set_num_threads(max(1, threads))
    cfg = trial_from_tune(base, config)
    node = ray.get_runtime_context().get_node_id()
    cache = ModelCache(cache_dir)
    # A retried or resumed trial continues from its last checkpointed epoch.
    resume = read_restored(tune.get_checkpoint(), CHECKPOINT_FILE,
                           lambda path: torch.load(path, weights_only=True))
    pending: dict[str, Any] = {}
    last_checkpoint: list[float] = []  # the clock starts with the defense, not the attack build

    def save(state: dict[str, Any]) -> None:
        pending["state"] = state
        if not last_checkpoint:
            last_checkpoint.append(time.monotonic())

    def report(row: dict[str, Any]) -> bool:
        metrics = {**row, "node_id": node, "cache_builds": cache.builds,
                   FINAL: row.get("epoch") == cfg.defense.epochs}
        state = pending.pop("state", None)
        # The last epoch does not checkpoint: a trial that ended is never run again because the
        # ledger records its end (``replay_if_ended``), and a checkpoint there would only make
        # Tune snapshot the whole experiment once per trial (the driver's cost per trial then
        # grows with the trial count: benchmarks/README.md, sweep_scale).
        due = row.get("epoch") != cfg.defense.epochs and checkpoint_due(
            last_checkpoint[0] if last_checkpoint else None, time.monotonic(), checkpoint_every_s)
        if state is None or state["epoch"] != row["epoch"] or not due:
            tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state, Path(d) / CHECKPOINT_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
            last_checkpoint[:] = [time.monotonic()]
        return False  # ASHA stops a trial by ending its actor, not through this flag

    # ASHA decides on full-set values: its rung epochs are never scored on eval.subset.
    run_trial(cfg, report=report, cache=cache, resume=resume, save=save, full_eval_at=full_eval_at)


def max_epochs(plan: RunPlan) -> int:
    """ASHA's max_t: the largest number of defense epochs any trial can run."""
    best = resolve(trial_config(plan.base)).defense.epochs
    for d in plan.space:
        if d.path == "defense.epochs":
            best = max(best, *[int(v) for v in d.extremes()])
    for cell in plan.cells:
        best = max(best, trial_from_tune(plan.base, {"cell": cell}).defense.epochs)
    return int(best)


def rung_epochs(plan: RunPlan) -> tuple[float, ...]:
    """The epochs at which make_scheduler's ASHA decides (none without a scheduler)."""
    from d3tune.trial import asha_rungs

    s = plan.scheduler
    return () if s.name == "none" else asha_rungs(s.grace_period, s.reduction_factor,
                                                  max_epochs(plan))


def make_scheduler(plan: RunPlan):
    """The plan's Tune scheduler: ASHA on its metric (rungs the trial evaluates on the full test
    sets), or FIFO when the spec turns it off."""
    if plan.scheduler.name == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=plan.scheduler.metric,
                         mode=plan.scheduler.mode, max_t=max_epochs(plan),
                         grace_period=plan.scheduler.grace_period,
                         reduction_factor=plan.scheduler.reduction_factor)


def param_space(plan: RunPlan) -> dict[str, Any]:
    """Tune's ``param_space``: the grid's cells for an ablation, the space's domains for a sweep
    without Optuna, else empty (Optuna samples)."""
    from ray import tune

    if plan.kind == "ablation":
        return {"cell": tune.grid_search(list(plan.cells))}
    if any(d.only_for for d in plan.space):
        return {}  # the searcher samples define-by-run
    return {d.path: d.tune_domain() for d in plan.space}


def replay_table(plan: RunPlan) -> dict[str, dict[str, Any]]:
    """Every trial that ended, by ``trial_key``, with its recorded final result: from the run
    ledger (every plan kind) and the Optuna study (sweeps; told before the ledger is written)."""
    from d3tune.search.mlflow_callback import ended_results

    table = ended_results(plan.paths.state_dir)
    if plan.kind == "sweep" and plan.paths.has_study:
        from d3tune.search.optuna_search import ended_results as study_results

        table.update(study_results(plan.paths.optuna_storage, plan.name))
    return table


def trainable_for(plan: RunPlan, replay: dict[str, dict[str, Any]] | None = None):
    """The function trainable a plan's trials run (one ``run_trial`` per config, reporting each
    evaluated epoch); ``replay``: recorded final results of trials already ended, reported
    again instead of re-run."""
    from ray import tune

    threads = max(1, int(plan.resources.cpu))
    fn = tune.with_parameters(tune_trainable, base=plan.base, cache_dir=plan.cache_dir,
                              threads=threads, checkpoint_every_s=plan.checkpoint_every_s,
                              replay=replay or {}, full_eval_at=rung_epochs(plan))
    return tune.with_resources(fn, {"cpu": plan.resources.cpu, "gpu": plan.resources.gpu})


def plan_tuner(plan: RunPlan, *, resume: bool, callbacks: list[Any]):
    """The Tuner of a sweep or an ablation (``tuner.build_tuner`` with the plan's searcher,
    scheduler and trainable); a resumed one replays the trials that already ended."""
    if plan.kind == "sweep":  # no "[I ...] A new study created" / "Using an existing study"
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    paths = plan.paths
    if resume:
        require_resumable(paths)  # before reading the ledger of a run that is not there
        replay = replay_table(plan)
        log.info("resume: %d trials already ended (study and run ledger); Tune will not run "
                 "them again", len(replay))
        return build_tuner(paths, trainable_for(plan, replay), callbacks=callbacks, resume=True,
                           param_space=param_space(plan), drop_ended_checkpoints=True)
    exp_dir = paths.experiment_dir
    if exp_dir.exists() and any(exp_dir.iterdir()):
        raise UsageError(f"{exp_dir} already holds a run named {plan.name!r}: pass --resume to "
                         "continue it, or change the spec's name/storage")
    paths.state_dir.mkdir(parents=True, exist_ok=True)  # the study lives there
    return build_tuner(paths, trainable_for(plan), searcher=sweep_searcher(plan),
                       scheduler=make_scheduler(plan), callbacks=callbacks,
                       param_space=param_space(plan),
                       num_samples=plan.num_samples if plan.kind == "sweep" else 1,
                       max_concurrent=plan.max_concurrent, max_failures=plan.max_failures,
                       drop_ended_checkpoints=True)
