"""MLflow for sweeps: one parent run per sweep, one child run per trial, logged from the driver.

Why a callback of our own: Ray's MLflow integration logs flat runs from the workers; users ask
for nested runs, and logging on the driver means workers never touch the store (a SQLite file on
the head node works on a cluster). The parent run id and the trial -> child-run map are kept in
the experiment folder, so a resumed sweep reuses them: no duplicate runs, no repeated steps.
A failing store costs a warning, never the sweep: Tune's own storage keeps every result.

The run map is also the run's ledger, the record resume trusts (see ``engine``): which trial is
which (``keys``: ``runstate.trial_key`` -> Tune trial id, so a trial Tune re-creates under a new
id after ``--resume`` reuses its child run), and which trials ended with what result
(``results``, ``done``; a failed trial is listed in ``failed``, not ``done``: Tune retries
errored trials on ``--resume``, and a retry that finishes is recorded then). A trial's end is
written there *before* MLflow is told (``closing`` marks the MLflow calls still owed, made at
the next start), so a kill between the two never loses or repeats a trial.

Per-epoch metrics are buffered per trial and written every ``FLUSH_EVERY_S`` seconds (and at a
trial's checkpoint and end): a function trainable waits for the driver after each report, so
one store transaction per epoch per trial both slows every trial and caps how many results per
second the driver can take (~8 ms each on SQLite; see benchmarks/README.md, sweep overhead).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray.tune import Callback

from d3tune import tracking
from d3tune.config import flatten, to_dict
from d3tune.runstate import (
    FINAL,
    RunPaths,
    kill_point,
    now_ms,
    recorded_result,
    trial_from_tune,
    trial_key,
)
from d3tune.search.ledger import Ledger, Op
from d3tune.search.ledger import read as read_ledger
from d3tune.specs.sweep_spec import RunPlan

log = logging.getLogger(__name__)

RETRY_AFTER_S = 30
# At a sweep's end, how long to keep trying an MLflow that is down (a server restarting).
FINAL_PATIENCE_S = float(os.environ.get("D3TUNE_MLFLOW_PATIENCE_S", "120"))
FLUSH_EVERY_S = 5.0  # per-epoch metrics reach MLflow at most this late while a trial runs
BATCH_ROWS = 100  # epochs per log_batch (MLflow takes at most 1000 metrics per call)
EPOCH_METRICS = ("acc", "asr", "ra", "der", "loss", "loss_clean", "loss_dist")
FINAL_KEYS = {"acc": "acc_after", "asr": "asr_after", "ra": "ra_after", "der": "der",
              "acc_before": "acc_before", "asr_before": "asr_before", "ra_before": "ra_before"}


def trial_params(plan: RunPlan, config: dict[str, Any]) -> dict[str, Any]:
    """The resolved trial config as flat MLflow params (what exactly ran)."""
    return flatten(to_dict(trial_from_tune(plan.base, config)))


def load_ledger(state_dir: Path) -> dict[str, Any]:
    """The run ledger in ``state_dir`` (trial key -> Tune trial, child run, recorded end), empty
    when none was written (``ledger.read``: snapshot and journal)."""
    return read_ledger(state_dir)


def ended_results(state_dir: Path) -> dict[str, dict[str, Any]]:
    """``runstate.trial_key`` -> recorded final result, for every trial the ledger says ended
    (what a resumed trainable replays instead of training again)."""
    state = load_ledger(state_dir)
    return {key: state["results"][tid] for key, tid in state["keys"].items()
            if tid in state["results"] and tid in state["done"]}



class MlflowTuneCallback(Callback):
    """MLflow and the run ledger for one Tune run (a parent run, a child per trial). Subclasses
    say what the parent run records (``parent_params``, ``parent_tags``) and what a child's
    params are (``child_params``); sweeps and ablations log per-epoch metrics as below, a robust
    search per member (``robust_mlflow.RobustMlflowCallback``).

    Hooks for subclasses: ``parent_params``, ``parent_tags``, ``child_params``, ``child_tags``,
    ``final_record``; their own logging goes through ``ensure_setup``, ``ready``,
    ``child_run_for`` and ``call``. Public for the code that finishes a run (reports,
    summaries): ``log_to_parent``, ``log_parent_params_once``, ``finish_parent``, ``parent_id``,
    ``child_count``."""

    def __init__(self, paths: RunPaths, experiment: str, source: str) -> None:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.paths = paths
        self.experiment = experiment
        self.source = source
        self.exp_dir = paths.experiment_dir
        self.state_dir = paths.state_dir
        self.ledger = Ledger(self.state_dir)
        self.state: dict[str, Any] = {}  # the ledger's contents (read here; changed by commit)
        self.uri = tracking.tracking_uri()
        self.client = None
        self.exp_id: str | None = None
        self.failures = 0
        self.skipped = 0
        self.down_until = 0.0
        self.pending: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # trial -> (ms, row)
        self.flushed_at: dict[str, float] = {}
        self.seen: set[str] = set()  # trials started by this driver (vs. before a kill)
        self.known: dict[str, Any] = {}  # trials whose child run MLflow has not made yet
        self.owed = False  # an MLflow call failed: something is still to be told (catch_up)

    # -- what the runs record (subclasses) ---------------------------------------------------

    def parent_params(self) -> dict[str, Any]:
        """Params for the parent run (overridden by each kind of run)."""
        return {}

    def parent_tags(self) -> dict[str, str]:
        """Tags for the parent run: the spec it ran and the machine's thread count."""
        return {"d3tune.spec": self.source, "d3tune.tune_dir": str(self.exp_dir)}

    def child_params(self, config: dict[str, Any]) -> dict[str, Any]:
        """Params for a trial's child run, from its Tune config."""
        return {}

    def child_tags(self, trial: Any) -> dict[str, str]:
        """Tags for a trial's child run besides its parent and trial id."""
        return {}

    def final_record(self, last: dict[str, Any], status: str
                     ) -> tuple[dict[str, float], dict[str, str]]:
        """What a trial's end writes on its child run (metrics at step 0, tags), from the
        result the ledger recorded: here the sweep's final ACC / ASR / RA / DER."""
        metrics = {name: float(last[k]) for k, name in FINAL_KEYS.items()
                   if isinstance(last.get(k), (int, float)) and not isinstance(last.get(k), bool)}
        stopped = status == "FINISHED" and last.get(FINAL) is False
        return metrics, {"d3tune.last_epoch": str(last.get("epoch", "")),
                         "d3tune.node_id": str(last.get("node_id", "")),
                         "d3tune.node_ip": str(last.get("node_ip", "")),
                         # users filter on it: tags.`d3tune.stopped_early` = 'false'
                         "d3tune.stopped_early": "true" if stopped else "false"}

    # -- plumbing ----------------------------------------------------------------------------

    def commit(self, *ops: Op) -> None:
        """Change the ledger (in memory and on disk, as one change set; ``ledger.Op``)."""
        self.ledger.commit(*ops)

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one MLflow call; on failure warn, and skip calls for a while (a store that is
        down would otherwise cost its full retry/timeout on every epoch of every trial)."""
        return self.attempt(what, fn)[1]

    def attempt(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """``call``, saying whether the call was made and answered: a write that did not reach
        MLflow stays owed and is made again once MLflow answers (``catch_up``)."""
        if time.monotonic() < self.down_until:
            self.skipped += 1
            self.owed = True
            return False, None
        try:
            return True, fn()
        except Exception as exc:  # keep the sweep going; Tune's storage keeps the results
            self.failures += 1
            self.owed = True
            self.down_until = time.monotonic() + RETRY_AFTER_S
            log.warning("MLflow %s failed (%s); results stay in %s; retrying MLflow in %d s",
                        what, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                        self.exp_dir, RETRY_AFTER_S)
            return False, None

    def catch_up(self, patience_s: float = 0.0) -> bool:
        """After an outage, tell MLflow what it missed: child runs not made, epochs not
        written, trial ends not recorded. True when nothing is owed any more. With
        ``patience_s``, keep trying that long (the sweep's end: what is still owed after it
        stays in the ledger and Tune's results, and a warning says so)."""
        deadline = time.monotonic() + patience_s
        while True:
            if time.monotonic() >= self.down_until and self.ready():
                self.owed = False
                for tid, trial in list(self.known.items()):
                    if self._child(trial) is not None:
                        del self.known[tid]
                for tid in list(self.pending):
                    self.flush(tid)
                for tid, status in list(self.state["closing"].items()):
                    self._close_child(tid, status)
                if not self.owed:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(5.0, max(0.5, self.down_until - time.monotonic())))
            self.down_until = 0.0

    def connect(self) -> None:
        """Open the MLflow client and the experiment (done lazily, in the process that logs)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        self.exp_id = tracking.experiment_id(client, self.experiment, self.uri)
        self.client = client  # only once the store answered: ``ready`` retries otherwise

    @property
    def parent_id(self) -> str | None:
        """The parent run's id, created on first use and kept in the ledger (None while MLflow
        is unreachable)."""
        return self.state.get("parent")

    # -- the parent run, for the code that finishes a run ------------------------------------

    def log_to_parent(self, what: str, metrics: dict[str, float] | None = None,
                      tags: dict[str, str] | None = None) -> None:
        """Metrics and tags on the parent run (nothing while MLflow is unreachable)."""
        from mlflow.entities import Metric, RunTag

        if self.client is None or self.parent_id is None:
            return
        ms = now_ms()
        self.call(what, lambda: self.client.log_batch(
            self.parent_id, metrics=[Metric(k, float(v), ms, 0)
                                     for k, v in (metrics or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()]))

    def log_parent_params_once(self, params: dict[str, Any]) -> None:
        """Params on the parent run, once per run: MLflow refuses a param logged again with
        another value, and a resumed run logs its own again (the ledger remembers)."""
        if self.client is None or self.parent_id is None:
            return
        if set(params) <= set(self.state.get("parent_params", [])):
            return
        self.log_params(self.parent_id, params)
        self.commit(("put", "parent_params", None,
                     sorted(set(self.state.get("parent_params", [])) | set(params))))

    def finish_parent(self, status: str, metrics: dict[str, float] | None = None,
                      artifacts: list[tuple[Path, str | None]] = ()) -> None:
        """The one way a run ends on MLflow, for sweeps, ablations and robust searches: summary
        metrics, the report's files (each under its artifact folder, None: the root), then
        the parent's status."""
        if self.client is None or self.parent_id is None:
            return
        if metrics:
            self.log_to_parent("parent metrics", metrics)
        for path, folder in artifacts:
            self.call("parent artifact", lambda p=path, f=folder: self.client.log_artifact(
                self.parent_id, str(p), f))
        kill_point("report:artifacts")
        self.call("parent status", lambda: self.client.set_terminated(self.parent_id, status))

    def child_count(self) -> int:
        """How many child runs this run made (one per trial, however often Tune re-made it)."""
        return len(set(self.state.get("children", {}).values()))

    # -- Tune hooks --------------------------------------------------------------------------

    def load_state(self) -> None:
        """Read the run map from disk: after a resume this object may be an old unpickled copy."""
        self.state = self.ledger.load()
        self.pending, self.flushed_at = {}, {}
        self.seen: set[str] = set()  # trials started by this driver (vs. before a kill)

    def setup(self, **info: Any) -> None:
        self.load_state()
        if not self.ready():
            return
        for tid, status in list(self.state["closing"].items()):  # owed since a driver kill
            self._close_child(tid, status)

    def ready(self) -> bool:
        """Connected, with the parent run made. Tried again at every use while it is not, so
        a store that was down at setup (or answered late) gets the runs once it is back."""
        if self.client is None:
            self.call("connect", self.connect)
            if self.client is None:
                return False
        if self.parent_id is None:
            run = self.call("parent run", lambda: self.client.create_run(
                self.exp_id, run_name=self.paths.name, tags=self.parent_tags()))
            if run is None:
                return False
            self.commit(("put", "parent", None, run.info.run_id))
            self.log_params(self.parent_id, self.parent_params())
            if Path(self.source).is_file():
                self.call("spec artifact", lambda: self.client.log_artifact(
                    self.parent_id, self.source, "spec"))
        return True

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log ``params`` on run ``run_id`` in batches MLflow accepts; a failure is a warning,
        never a lost trial."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in tracking.params_for_mlflow(params).items()]
        for i in range(0, len(items), 90):  # MLflow takes at most 100 params per batch
            self.call("params", lambda chunk=items[i:i + 90]: self.client.log_batch(
                run_id, params=chunk))

    def _child(self, trial: Any) -> str | None:
        tid = trial.trial_id
        if tid in self.state["children"]:
            return self.state["children"][tid]
        key = trial_key(trial.config or {})
        first = self.state["keys"].get(key)
        if first is not None and first != tid and first in self.state["children"]:
            # The same trial under a new Tune id (re-created after --resume): same child run.
            ops: list[Op] = [("set", "children", tid, self.state["children"][first]),
                             ("set", "steps", tid, self.state["steps"].get(first, 0))]
            if not self._ended(first):  # the new id carries the unfinished trial on
                ops.append(("set", "keys", key, tid))
            self.commit(*ops)
            return self.state["children"][tid]
        return self.make_child(
            tid, str(trial), {"d3tune.trial_id": tid, **self.child_tags(trial)},
            lambda: self.child_params(trial.config), also=[("set", "keys", key, tid)])

    def make_child(self, key: str, name: str, tags: dict[str, str],
                   params: Callable[[], dict[str, Any]], also: Sequence[Op] = ()
                   ) -> str | None:
        """A new child run under the parent, recorded in the ledger as ``children[key]`` (with
        the changes ``also``) before its ``params()`` are logged; None while MLflow cannot make
        it."""
        if not self.ready():
            return None
        run = self.call("child run", lambda: self.client.create_run(
            self.exp_id, run_name=name, tags={"mlflow.parentRunId": self.parent_id, **tags}))
        if run is None:
            return None
        self.commit(("set", "children", key, run.info.run_id), *also)
        self.log_params(run.info.run_id, self.call("child params", params) or {})
        return run.info.run_id

    def child_run_for(self, trial: Any) -> str | None:
        """The trial's child run, made on first use (the same run for a trial Tune re-created
        under a new id after --resume); None while MLflow cannot make it, and the trial is then
        kept for ``catch_up`` (only then: a sweep of thousands of trials holds no reference to
        the ended ones)."""
        run_id = self._child(trial)
        if run_id is None:
            self.known[trial.trial_id] = trial
        return run_id

    def _ended(self, tid: str) -> bool:
        """Whether the ledger holds this trial's end (under this or an earlier Tune id)."""
        run_id = self.state["children"].get(tid)
        return tid in self.state["done"] or (run_id is not None and any(
            self.state["children"].get(t) == run_id for t in self.state["done"]))

    def ensure_setup(self) -> None:
        """Tune does not call ``setup`` on a callback restored by ``Tuner.restore``."""
        if not self.ledger.loaded:
            self.setup()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ensure_setup()
        tid = trial.trial_id
        if self.owed:
            self.catch_up()
        before = tid in self.state["children"] or (
            self.state["keys"].get(trial_key(trial.config or {})) in self.state["children"])
        run_id = self.child_run_for(trial)
        if before and tid not in self.seen and not self._ended(tid) and run_id:
            self.call("resume tag", lambda: self.client.set_tag(
                run_id, "d3tune.resumed", "in flight when the driver was killed; run again "
                "after --resume (epochs already logged are not logged twice)"))
        self.seen.add(tid)
        kill_point("started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self.ensure_setup()
        tid = trial.trial_id
        if self.owed:
            self.catch_up()
        step = int(result.get("epoch", 0))
        buffered = self.pending.get(tid)
        last = buffered[-1][1]["epoch"] if buffered else self.state["steps"].get(tid, 0)
        self.child_run_for(trial)  # None while MLflow is down: the epoch waits in the buffer
        if step <= last:
            return  # a retried trial re-reports epochs already logged or buffered
        row = {"epoch": step, **{k: result[k] for k in EPOCH_METRICS if k in result}}
        self.pending.setdefault(tid, []).append((now_ms(), row))
        now = time.monotonic()
        # A trial's last result (its planned end, or a scheduler stop: Tune marks it done) is
        # written at once: the searcher records the trial's end right after this call.
        if (now - self.flushed_at.setdefault(tid, now) >= FLUSH_EVERY_S
                or result.get("done") or result.get(FINAL)):
            self.flush(tid)
        kill_point(f"result:{step}")

    def flush(self, tid: str) -> None:
        """Write a trial's buffered epochs; the run map records the ones MLflow took. Epochs
        MLflow did not take (no child run yet, or an outage) stay buffered for ``catch_up``."""
        rows = self.pending.pop(tid, [])
        self.flushed_at[tid] = time.monotonic()
        run_id = self.state["children"].get(tid)
        if run_id is None:
            if rows:
                self.pending[tid] = rows
                self.owed = True
            return
        logged = 0
        for i in range(0, len(rows), BATCH_ROWS):
            metrics = [m for ms, row in rows[i:i + BATCH_ROWS]
                       for m in tracking.metric_batch([row], timestamp_ms=ms)]
            if not self.attempt("metrics", lambda m=metrics: self.client.log_batch(
                    run_id, metrics=m))[0]:
                break
            logged = min(len(rows), i + BATCH_ROWS)
        if logged < len(rows):
            self.pending[tid] = rows[logged:]
        if logged:
            self.commit(("set", "steps", tid, rows[logged - 1][1]["epoch"]))

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any,
                      **info: Any) -> None:
        # A retried trial restarts after its checkpoint: every epoch up to it must be logged.
        self.flush(trial.trial_id)

    def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # Tune has just registered this checkpoint and deleted the trial's older one; its
        # experiment snapshot comes on its next step (``tuner.repair_checkpoints``).
        kill_point(f"saved:{(trial.last_result or {}).get('epoch')}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for tid in list(self.pending):
            self.flush(tid)
        if self.owed and not self.catch_up(patience_s=FINAL_PATIENCE_S):
            log.warning("MLflow did not take everything before the end (%d trials' epochs, %d "
                        "trial ends still owed); the results are in %s, and `--resume` tells "
                        "MLflow the trial ends it missed", len(self.pending),
                        len(self.state["closing"]), self.exp_dir)
        self.ledger.compact()  # the journal folded into one snapshot for the next reader

    def finish_trial(self, trial: Any, status: str) -> None:
        """The ledger first (the trial ended, with this result), then MLflow. The ledger is
        written whether or not MLflow answers: it is what keeps --resume from running a
        finished trial again, and an MLflow outage must not cost that."""
        self.ensure_setup()
        tid = trial.trial_id
        self.child_run_for(trial)  # None while MLflow is down: the ledger is written all the same
        if self._ended(tid) or (status != "FINISHED" and tid in self.state["failed"]):
            return
        self.flush(tid)
        key = trial_key(trial.config or {})
        ops: list[Op] = []
        if self.state["keys"].get(key) not in self.state["done"]:  # what --resume replays
            ops.append(("set", "keys", key, tid))
        # ended_ms: the time the final metrics carry, fixed here, so telling MLflow again after
        # a kill writes the same rows, which MLflow keeps once
        self.commit(*ops, ("set", "results", tid, recorded_result(trial.last_result)),
                    ("add", "done" if status == "FINISHED" else "failed", None, tid),
                    ("set", "closing", tid, status), ("set", "ended_ms", tid, now_ms()))
        outcome = "failed" if status != "FINISHED" else (
            "finished" if self.state["results"][tid].get(FINAL, True) else "stopped")
        kill_point(f"ledger:{outcome}")
        self._close_child(tid, status)
        kill_point(f"done:{outcome}")

    def _close_child(self, tid: str, status: str) -> None:
        """Tell MLflow a trial's end from the ledger (again, harmlessly, after a kill)."""
        from mlflow.entities import Metric, RunTag

        run_id = self.state["children"].get(tid)
        last = self.state["results"].get(tid, {})
        if run_id is None or self.client is None:
            self.owed = True  # told once the child run exists (catch_up, or the next --resume)
            return
        ended = self.state.get("ended_ms", {}).get(tid) or now_ms()
        values, labels = self.final_record(last, status)
        metrics = [Metric(k, v, ended, 0) for k, v in values.items()]
        tags = [RunTag(k, v) for k, v in labels.items()]
        told = self.attempt("final metrics", lambda: self.client.log_batch(
            run_id, metrics=metrics, tags=tags))[0]
        told = told and self.attempt("status", lambda: self.client.set_terminated(
            run_id, status))[0]
        if told:  # else still owed: catch_up, or the next --resume, tells it
            self.commit(("drop", "closing", tid, None))

    def close_unfinished(self) -> int:
        """After a sweep ends, a child run whose trial never finished (killed with the driver
        and not continued by Tune) is marked KILLED rather than left RUNNING forever."""
        closed = 0
        ended = {self.state["children"][t] for t in self.state["done"] + self.state["failed"]
                 if t in self.state["children"]}
        for run_id in set(self.state.get("children", {}).values()) - ended:
            if self.client is not None:
                self.call("close run", lambda r=run_id: self.client.set_terminated(r, "KILLED"))
                closed += 1
        return closed

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finish_trial(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.finish_trial(trial, "FAILED")


class MlflowSweepCallback(MlflowTuneCallback):
    """A sweep's or an ablation's runs: the parent records the plan, a child each trial's
    resolved config."""

    def __init__(self, plan: RunPlan) -> None:
        super().__init__(plan.paths, plan.experiment, plan.source)
        self.plan = plan

    def parent_params(self) -> dict[str, Any]:
        """The plan's base fields, search space and scheduler as params."""
        params = {f"base.{k}": v for k, v in flatten(self.plan.base).items()}
        params.update({"kind": self.plan.kind, "metric": ",".join(self.plan.metric),
                       "mode": ",".join(self.plan.mode), "num_samples": self.plan.num_samples,
                       "cells": len(self.plan.cells)})
        return params

    def parent_tags(self) -> dict[str, str]:
        """The parent's tags: sweep or ablation, and the spec."""
        tags = {"d3tune.kind": self.plan.kind, **super().parent_tags()}
        if self.plan.kind == "sweep":
            tags.update({"d3tune.study": self.plan.name,
                         "d3tune.optuna_storage": self.paths.optuna_url})
        return tags

    def child_params(self, config: dict[str, Any]) -> dict[str, Any]:
        """The trial's sampled or grid fields as params."""
        return trial_params(self.plan, config)
