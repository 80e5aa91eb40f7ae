"""Ray Tune engine: a RunPlan (sweep or ablation) -> a Tuner -> results, resumable.

Sweeps use OptunaSearch (seeded TPE; several objectives through lists of metrics and modes)
behind a ConcurrencyLimiter, with its study persisted in SQLite next to Tune's experiment state,
and ASHA on one scalar (DER by default) even when the search is multi-objective. Ablations are a
grid of cells. Either way every trial is ``trial.run_trial`` reporting each defense epoch, and
MLflow logging happens on the driver (``tracking_tune.MlflowSweepCallback``).

Where the truth lives after a killed driver (issue 22; docs/reliability.md): which trials ended,
and with what result, is written on the driver the moment Tune says so: in the Optuna study
(sweeps; ``optuna_search``) and in d3tune's run ledger beside it (every plan kind;
``tracking_tune``). Tune's experiment state is a snapshot taken every few seconds: resume uses it
only for what it alone holds (in-flight trials' checkpoints, the scheduler), and consults the
study and the ledger for the rest (``replay_table`` here, ``ResumableOptunaSearch.restore``).
MLflow is an output of the ledger, never read to decide anything.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from d3tune.config import flatten, resolve, trial_config, unflatten
from d3tune.errors import UsageError
from d3tune.spec import RunPlan

log = logging.getLogger(__name__)

OPTUNA_DB = "optuna.db"
CHECKPOINT_FILE = "defense_state.pt"
TRIAL_KEY = "d3tune.trial"  # a sweep trial's Optuna number, carried in its Tune config
FINAL = "final"  # reported with every epoch: True at the trial's last planned epoch
KILL_ENV = "D3TUNE_TEST_KILL_AT"  # tests: SIGKILL the driver at this named point
# Tune fills these in every result; they say nothing about the trial's outcome.
TUNE_KEYS = {"trial_id", "timestamp", "time_this_iter_s", "done", "training_iteration", "date",
             "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
             "iterations_since_restore", "checkpoint_dir_name", "should_checkpoint",
             "experiment_tag", "replayed"}


def recorded_result(result: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a Tune result worth keeping: the trial's own plain scalars."""
    out = {}
    for k, v in (result or {}).items():
        if k in TUNE_KEYS or "/" in k or not isinstance(v, (int, float, str, bool)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return out


def kill_point(name: str) -> None:
    """Test hook: when ``$D3TUNE_TEST_KILL_AT`` names this point, SIGKILL the driver here (with
    its process group, i.e. the local Ray it started, when it leads one). Lets tests kill the
    driver at an exact moment (right after an ASHA stop, between the Optuna tell and the
    ledger, ...) instead of sleeping and hoping."""
    if os.environ.get(KILL_ENV) != name:
        return
    import signal

    log.warning("test hook %s=%s: killing the driver", KILL_ENV, name)
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def trial_key(config: dict[str, Any]) -> str:
    """What a trial *is*, independent of Tune's trial id (which a resumed Tune may change):
    a sweep trial's Optuna number, an ablation cell's content."""
    if TRIAL_KEY in config:
        return f"optuna:{int(config[TRIAL_KEY])}"
    import json

    return "cell:" + json.dumps(config.get("cell") or {k: v for k, v in config.items()
                                                         if not k.startswith("d3tune.")},
                                sort_keys=True, default=str)


def experiment_dir(plan: RunPlan) -> Path:
    return Path(plan.storage).expanduser().resolve() / plan.name


def state_dir(plan: RunPlan) -> Path:
    """d3tune's own state (Optuna study, MLflow run map) beside Tune's experiment folder, not
    inside it: a restored Tune run syncs a copy of its folder taken at restore time back over
    it when it ends, which would roll these files back."""
    return experiment_dir(plan).parent / f"{plan.name}.d3tune"


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Tune's config -> flat dotted trial overrides (grid cells arrive under 'cell'; per-defense
    knobs as 'field@defense')."""
    out = {k.split("@", 1)[0]: v for k, v in config.items()
           if k != "cell" and not k.startswith("d3tune.")}
    out.update(config.get("cell") or {})
    return out


def define_by_run(space: tuple, trial: Any) -> None:
    """Optuna samples the common knobs, then the chosen defense's own knobs."""
    chosen = None
    for d in space:
        if d.only_for is None:
            value = d.suggest(trial)
            if d.path == "defense.name":
                chosen = value
    for d in space:
        if d.only_for is not None and d.only_for == chosen:
            d.suggest(trial)


def trial_from_tune(base: dict[str, Any], config: dict[str, Any]):
    return resolve(trial_config(unflatten({**flatten(base), **trial_overrides(config)})))


def checkpoint_due(last: float | None, now: float, every_s: float) -> bool:
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
    resume = None
    restored = tune.get_checkpoint()
    if restored is not None:  # a retried trial: continue from its last reported epoch
        with restored.as_directory() as d:
            resume = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True)
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
        # The last epoch always checkpoints: that forces Tune to snapshot the experiment, so a
        # driver killed right after a trial ends does not re-run it on --resume.
        due = row.get("epoch") == cfg.defense.epochs or checkpoint_due(
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


def _check_address(address: str) -> None:
    """Fail in a second, with one line, when --address points at nothing."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address: expected auto or HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as exc:
        raise UsageError(f"--address {address}: no Ray cluster answered ({exc.strerror or exc})") \
            from None


def init_ray(address: str | None) -> bool:
    """Connect to (address) or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        _check_address(address)
        if "RAY_AUTH_MODE" not in os.environ:  # clusters keep token auth on (VERIFIED.md)
            os.environ["RAY_AUTH_MODE"] = "token"
            try:  # Ray read RAY_AUTH_MODE at import: make it re-read (as Ray does)
                from ray._raylet import Config

                Config.initialize("")
            except (ImportError, AttributeError):  # pragma: no cover - other Ray versions
                pass
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            why = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"--address {address}: could not join the Ray cluster ({why}); "
                             "check the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token) "
                             "and its Ray version") from None
    else:
        ray.init(logging_level=logging.WARNING, include_dashboard=False)
    return True


def make_searcher(plan: RunPlan):
    from ray.tune.search import ConcurrencyLimiter

    if plan.kind == "ablation":
        return None
    import optuna

    from d3tune.optuna_search import ResumableOptunaSearch as OptunaSearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{state_dir(plan) / OPTUNA_DB}")
    metric = list(plan.metric) if plan.multi_objective else plan.metric[0]
    mode = list(plan.mode) if plan.multi_objective else plan.mode[0]
    sampler = optuna.samplers.TPESampler(seed=plan.search_seed)  # TPE handles both cases
    conditional = any(d.only_for for d in plan.space)
    searcher = OptunaSearch(space=partial(define_by_run, plan.space) if conditional else None,
                            metric=metric, mode=mode, sampler=sampler, storage=storage,
                            study_name=plan.name, constraints=plan.constraints)
    return ConcurrencyLimiter(searcher, max_concurrent=plan.max_concurrent)


def rung_epochs(plan: RunPlan) -> tuple[float, ...]:
    """The epochs at which make_scheduler's ASHA decides (none without a scheduler)."""
    from d3tune.trial import asha_rungs

    s = plan.scheduler
    return () if s.name == "none" else asha_rungs(s.grace_period, s.reduction_factor,
                                                  max_epochs(plan))


def make_scheduler(plan: RunPlan):
    if plan.scheduler.name == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=plan.scheduler.metric,
                         mode=plan.scheduler.mode, max_t=max_epochs(plan),
                         grace_period=plan.scheduler.grace_period,
                         reduction_factor=plan.scheduler.reduction_factor)


def param_space(plan: RunPlan) -> dict[str, Any]:
    from ray import tune

    if plan.kind == "ablation":
        return {"cell": tune.grid_search(list(plan.cells))}
    if any(d.only_for for d in plan.space):
        return {}  # the searcher samples define-by-run
    return {d.path: d.tune_domain() for d in plan.space}


def replay_table(plan: RunPlan) -> dict[str, dict[str, Any]]:
    """Every trial that ended, by ``trial_key``, with its recorded final result: from the run
    ledger (every plan kind) and the Optuna study (sweeps; told before the ledger is written)."""
    from d3tune.tracking_tune import ended_results

    table = ended_results(state_dir(plan))
    if plan.kind == "sweep" and (state_dir(plan) / OPTUNA_DB).exists():
        from d3tune.optuna_search import ended_results as study_results

        table.update(study_results(f"sqlite:///{state_dir(plan) / OPTUNA_DB}", plan.name))
    return table


def trainable_for(plan: RunPlan, replay: dict[str, dict[str, Any]] | None = None):
    from ray import tune

    threads = max(1, int(plan.resources.cpu))
    fn = tune.with_parameters(tune_trainable, base=plan.base, cache_dir=plan.cache_dir,
                              threads=threads, checkpoint_every_s=plan.checkpoint_every_s,
                              replay=replay or {}, full_eval_at=rung_epochs(plan))
    return tune.with_resources(fn, {"cpu": plan.resources.cpu, "gpu": plan.resources.gpu})


def build_tuner(plan: RunPlan, *, resume: bool, callbacks: list[Any]):
    # Per-epoch checkpoints snapshot the experiment often on purpose (resume loses nothing).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray import tune

    exp_dir = experiment_dir(plan)
    if plan.kind == "sweep":  # no "[I ...] A new study created" / "Using an existing study"
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    if resume:
        if not tune.Tuner.can_restore(str(exp_dir)):
            raise UsageError(f"--resume: no interrupted run at {exp_dir} (spec name {plan.name!r})")
        replay = replay_table(plan)
        log.info("resume: %d trials already ended (study and run ledger); Tune will not run "
                 "them again", len(replay))
        trainable = trainable_for(plan, replay)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=param_space(plan))
        # The restored run config carries a pickled copy of our callback that Tune 2.60 does not
        # call; hand it the live one (checked by the SIGKILL/--resume test).
        internal = getattr(tuner, "_local_tuner", None)
        if internal is not None and getattr(internal, "_run_config", None) is not None:
            internal._run_config.callbacks = callbacks
        return tuner
    if exp_dir.exists() and any(exp_dir.iterdir()):
        raise UsageError(f"{exp_dir} already holds a run named {plan.name!r}: pass --resume to "
                         "continue it, or change the spec's name/storage")
    exp_dir.mkdir(parents=True, exist_ok=True)
    state_dir(plan).mkdir(parents=True, exist_ok=True)
    trainable = trainable_for(plan)
    searcher = make_searcher(plan)
    tune_config = tune.TuneConfig(
        search_alg=searcher, scheduler=make_scheduler(plan),
        num_samples=plan.num_samples if plan.kind == "sweep" else 1,
        max_concurrent_trials=plan.max_concurrent if searcher is None else None,
        reuse_actors=True,  # skip a worker start (torch import) per trial
        trial_name_creator=lambda t: f"{plan.name}_{t.trial_id}",
        trial_dirname_creator=lambda t: t.trial_id)
    run_config = tune.RunConfig(
        name=plan.name, storage_path=str(exp_dir.parent), callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=plan.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1)
    return tune.Tuner(trainable, param_space=param_space(plan), tune_config=tune_config,
                      run_config=run_config)
