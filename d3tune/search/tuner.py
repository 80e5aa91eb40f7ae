"""The one place d3tune builds a Ray Tune ``Tuner``: sweeps, ablations and robust searches all
go through ``build_tuner``, fresh or resumed, and ``init_ray`` joins or starts Ray for them.

Why one builder: resuming needs the same care for every kind of run (restore the experiment,
re-run unfinished and errored trials, hand the restored run our live callbacks); two copies had
started to drift.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from d3tune.errors import UsageError
from d3tune.runstate import RunPaths

log = logging.getLogger(__name__)


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


def can_resume(paths: RunPaths) -> bool:
    """Whether Tune left a restorable experiment at ``paths`` (a run stopped before its first
    snapshot has none)."""
    from ray import tune

    return tune.Tuner.can_restore(str(paths.experiment_dir))


def require_resumable(paths: RunPaths) -> None:
    """``--resume`` on a folder with nothing to restore: one line, exit 2."""
    if not can_resume(paths):
        raise UsageError(f"--resume: no interrupted run at {paths.experiment_dir} "
                         f"(spec name {paths.name!r})")


def repair_checkpoints(exp_dir: Path) -> list[str]:
    """Before a restore, make sure the checkpoint each unfinished trial restores from exists;
    returns the trials repaired.

    Why: Tune deletes a trial's older checkpoint the moment it registers a newer one
    (``CheckpointConfig(num_to_keep)``) but writes the experiment snapshot only on its next loop
    step. A driver stopped in between (a SLURM requeue's SIGTERM can land there) leaves a
    snapshot naming a deleted checkpoint, and the restored trial then fails twice ("does not
    exist on storage anymore"), failing the resumed run. The newest checkpoint the trial did
    write takes the missing one's place; with none, an empty folder does, and the trainable
    starts that trial over (``runstate.read_restored``)."""
    from ray.tune import ExperimentAnalysis

    repaired = []
    for trial in ExperimentAnalysis(str(exp_dir)).trials:
        checkpoint = trial.checkpoint
        if checkpoint is None or trial.status == "TERMINATED":
            continue
        missing = Path(checkpoint.path)
        if missing.exists():
            continue
        newer = sorted((p for p in missing.parent.glob("checkpoint_*")
                        if p.is_dir() and any(p.iterdir())), reverse=True)
        if newer:
            shutil.copytree(newer[0], missing)
        else:
            missing.mkdir(parents=True)
        log.warning("trial %s: Tune's last snapshot names %s, deleted when the trial wrote a "
                    "newer checkpoint (or ended) right before the driver stopped; it continues "
                    "from %s",
                    trial.trial_id, missing.name, newer[0].name if newer else "its start")
        repaired.append(trial.trial_id)
    return repaired


def build_tuner(paths: RunPaths, trainable: Any, *, searcher: Any = None, scheduler: Any = None,
                callbacks: Sequence[Any] = (), resume: bool = False,
                param_space: dict[str, Any] | None = None, num_samples: int = 1,
                max_concurrent: int | None = None, max_failures: int = 1,
                time_budget_s: float | None = None, stop: Any = None,
                trial_name: Callable[[Any], str] | None = None,
                drop_ended_checkpoints: bool = False):
    """A Tuner for the run at ``paths``: restored from its experiment folder when ``resume``
    (``--resume`` on a folder with nothing to restore is one line, exit 2), otherwise new.
    ``max_concurrent`` limits trials only where no searcher does (ablation grids);
    ``time_budget_s`` and ``stop`` (a Tune stopper) end the whole run early.
    ``drop_ended_checkpoints``: delete a finished trial's checkpoint once the ledger holds its
    end (``checkpoint_cleanup``), for trainables that replay ended trials from the ledger (the
    engine's); a robust search's trial resumes from its member rows, so it keeps them."""
    # Per-epoch checkpoints (checkpoint_every_s: 0) snapshot the experiment often on purpose.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from ray import tune

    from d3tune.search.checkpoint_cleanup import DropEndedCheckpoints

    cleanup = [DropEndedCheckpoints()] if drop_ended_checkpoints else []
    exp_dir = paths.experiment_dir
    if resume:
        require_resumable(paths)
        repair_checkpoints(exp_dir)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=param_space or {})
        # The restored run config carries a pickled copy of our callbacks that Tune 2.60 does
        # not call; hand it the live ones (checked by the SIGKILL/--resume test).
        internal = getattr(tuner, "_local_tuner", None)
        if internal is not None and getattr(internal, "_run_config", None) is not None:
            internal._run_config.callbacks = [*callbacks, *cleanup]
        return tuner
    exp_dir.mkdir(parents=True, exist_ok=True)
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    tune_config = tune.TuneConfig(
        search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
        time_budget_s=time_budget_s,
        max_concurrent_trials=max_concurrent if searcher is None else None,
        reuse_actors=True,  # skip a worker start (torch import) per trial
        trial_name_creator=trial_name or (lambda t: f"{paths.name}_{t.trial_id}"),
        trial_dirname_creator=lambda t: t.trial_id)
    run_config = tune.RunConfig(
        name=paths.name, storage_path=str(exp_dir.parent),
        callbacks=[*callbacks, *cleanup], stop=stop,
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1)
    return tune.Tuner(trainable, param_space=param_space or {}, tune_config=tune_config,
                      run_config=run_config)


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


def _missing(paths: Sequence[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def require_on_every_node(inputs: Mapping[str, str], timeout_s: float = 60.0) -> None:
    """Every alive node of the cluster sees each input path (path -> the trial field naming
    it), or one line naming the first node that lacks one.

    Why before any trial: a trial reads its dataset folder or record on whatever node Tune
    places it, so a folder present on the driver's machine only would fail trials one by one,
    minutes in, and burn their retries. One zero-CPU task per node, pinned to it, checks."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not inputs:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(_missing)
    paths = sorted(inputs)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    pending = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(paths): n for n in nodes}
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    for ref in done:
        missing = ray.get(ref)
        if missing:
            node = pending[ref]
            raise UsageError(f"{inputs[missing[0]]}: {missing[0]} is missing on node "
                             f"{node.get('NodeManagerAddress')} ({node['NodeID'][:12]}): every "
                             "node reads the dataset folders and records at the same path "
                             "(shared storage, or a copy at that path)")
    if late:
        node = pending[late[0]]
        raise UsageError(f"--address: node {node.get('NodeManagerAddress')} did not answer a "
                         f"check of the input folders within {timeout_s:.0f} s")


# What decides a trial's config and so must be the driver's on every node of a cluster: which
# adopted defaults fill the knobs a spec leaves unset. A worker on another node is started by
# that node's raylet, not by the driver, and would read its own environment. (The model cache
# and precision stay per node: they are properties of the machine, not of the experiment.)
FORWARDED_ENV = ("D3TUNE_DEFAULTS_DIR", "D3TUNE_SHIPPED_DEFAULTS")


def forwarded_env() -> dict[str, str]:
    """The driver's values of ``FORWARDED_ENV`` that are set."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def init_ray(address: str | None, inputs: Mapping[str, str] | None = None) -> bool:
    """Connect to (address) or start a local Ray; True when this call started it. On a cluster
    (``address``), every node must see ``inputs`` (path -> the trial field naming it)."""
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
            env = forwarded_env()
            ray.init(address=address, logging_level=logging.WARNING,
                     runtime_env={"env_vars": env} if env else None)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            why = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"--address {address}: could not join the Ray cluster ({why}); "
                             "check the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token) "
                             "and its Ray version") from None
        try:
            require_on_every_node(inputs or {})
        except UsageError:
            ray.shutdown()
            raise
    else:
        ray.init(logging_level=logging.WARNING, include_dashboard=False)
    return True
