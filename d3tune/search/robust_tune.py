"""Ray pieces of a robust search: member work, the population trial, exact pruning, the
searcher that orders members, and MLflow logging from the driver.

Composed from the sweep engine rather than edited into it: the trial is a plain function
(``run_members``) that Tune, Ray tasks and tests all call; pruning is a driver-side Tune
scheduler that only applies ``robust_rules.should_prune``; the searcher is the sweeps' resumable
OptunaSearch plus two things (a member order in each config, constraint values as Optuna user
attributes); MLflow logging reuses the sweeps' callback plumbing (run map, failure handling).
Kept in a module of its own: the scheduler and searcher are pickled into Tune's snapshots.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.stopper import Stopper

from d3tune.config import flatten
from d3tune.search.mlflow_callback import MlflowTuneCallback
from d3tune.search.optuna_search import ResumableOptunaSearch
from d3tune.search.robust_rules import (
    Finished,
    incumbent,
    member_order,
    prune_threshold,
    should_prune,
    worst_and_drop,
)
from d3tune.runstate import FINAL, TRIAL_KEY, now_ms, read_restored, trial_overrides
from d3tune.specs.robust_spec import (
    Member,
    Reference,
    RobustSpec,
    datasets_of,
    member_config,
)

log = logging.getLogger(__name__)

ORDER_KEY = "__order"  # the member order the searcher put into a trial's config
ROWS_FILE = "members.json"  # a trial's checkpoint: the member rows done so far
MEMBER_METRICS = ("der", "acc_drop", "acc_after", "asr_after", "ra_after", "seconds",
                  "cpu_seconds")
# ("seconds": wall time of one member evaluation; a leaderboard sums them into its compute)


# ---------------------------------------------------------------------------------------------
# Work on members (runs on Ray workers, or in-process in tests)


def member_before(spec: RobustSpec, member: Member, threads: int = 1) -> dict[str, Any]:
    """Build (or load from the cache) a member's backdoored model and score it before any
    defense: the population phase, run once per member, up front."""
    import torch

    from d3tune.cache import ModelCache
    from d3tune.data import load_dataset
    from d3tune.metrics import evaluate
    from d3tune.trial import backdoored_model, pick_device

    torch.set_num_threads(max(1, threads))
    start = time.perf_counter()
    cfg = member_config(spec, member, {})
    device = pick_device(cfg.device)
    data = load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.train_size).to(device)
    model, sets, key, origin = backdoored_model(cfg, data, device, ModelCache(spec.cache_dir), None)
    before = evaluate(model, sets())
    return {"member": member.id, "seed": member.seed, "cache_key": key, "origin": origin,
            "seconds": time.perf_counter() - start, **{f"{k}_before": v for k, v in before.items()}}


def run_members(spec: RobustSpec, members: Sequence[Member], setting: Mapping[str, Any],
                reference: Reference | None = None, done: Sequence[dict[str, Any]] = (),
                on_member: Callable[[list[dict[str, Any]]], None] | None = None,
                threads: int = 1) -> list[dict[str, Any]]:
    """Evaluate one setting on members in turn (models from the cache); ``on_member`` sees the
    rows so far after each one. Rows in ``done`` (a retried trial's checkpoint) are kept."""
    import torch

    from d3tune.cache import ModelCache
    from d3tune.data import load_dataset
    from d3tune.trial import run_trial

    torch.set_num_threads(max(1, threads))
    cache = ModelCache(spec.cache_dir)
    rows = [dict(r) for r in done]
    seen = {r["member"] for r in rows}
    datasets: dict[tuple[Any, Any], Any] = {}
    for member in members:
        if member.id in seen:
            continue
        cfg = member_config(spec, member, setting, reference)
        where = (cfg.data.name, cfg.data.data_dir, cfg.data.train_size)
        if where not in datasets:
            datasets[where] = load_dataset(*where)
        start, cpu = time.perf_counter(), time.process_time()
        res = run_trial(cfg, cache=cache, data=datasets[where])
        m = res.metrics
        # cpu_seconds: what the member cost the machine (this process's CPU time), whatever
        # else ran beside it; seconds: its wall clock, which a loaded machine stretches
        rows.append({"member": member.id, "seed": member.seed, **m,
                     "acc_drop": m["acc_before"] - m["acc_after"], "cache_hit": res.cache_hit,
                     "seconds": time.perf_counter() - start,
                     "cpu_seconds": time.process_time() - cpu, "threads": threads})
        if on_member is not None:
            on_member(rows)
    return rows


def spec_threads(spec: RobustSpec) -> int:
    """torch threads per member evaluation: the trial's CPUs (results depend on it)."""
    return max(1, int(spec.resources.cpu))


def setting_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """Tune's config -> flat defense overrides: the sweep engine's reading ('field@defense'
    unfolded, its own 'd3tune.*' bookkeeping dropped), less the member order."""
    return {k: v for k, v in trial_overrides(dict(config)).items() if not k.startswith("__")}


def summary(rows: Sequence[Mapping[str, Any]], total: int) -> dict[str, Any]:
    """What a trial reports after each member: running figures plus every member's own."""
    worst, drop, mean = worst_and_drop(rows)
    last = rows[-1]
    out: dict[str, Any] = {"worst_der": worst, "mean_acc_drop": drop, "mean_der": mean,
                           "members_done": len(rows), "members_total": total,
                           "member": last["member"], FINAL: len(rows) == total}
    for r in rows:
        out.update({f"{k}.{r['member']}": float(r[k]) for k in MEMBER_METRICS if k in r})
    return out


def population_trainable(config: dict[str, Any], *, spec: RobustSpec,
                         members: tuple[Member, ...], threads: int) -> None:
    """One Tune trial = one setting on every member, in the order the searcher chose; a report
    (and a tiny checkpoint of the rows) after each member, so exact pruning can stop it there
    and a retried trial resumes after its last finished member."""
    from ray import tune

    by_id = {m.id: m for m in members}
    order = [i for i in config.get(ORDER_KEY) or [] if i in by_id]
    ordered = [by_id[i] for i in order] + [m for m in members if m.id not in order]
    done: list[dict[str, Any]] = read_restored(
        tune.get_checkpoint(), ROWS_FILE, lambda path: json.loads(path.read_text())) or []

    def report(rows: list[dict[str, Any]]) -> None:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / ROWS_FILE).write_text(json.dumps(rows))
            tune.report(summary(rows, len(members)),
                        checkpoint=tune.Checkpoint.from_directory(d))

    run_members(spec, ordered, setting_of(config), done=done, on_member=report, threads=threads)


# ---------------------------------------------------------------------------------------------
# Driver side: pruning, search, MLflow


def complete(result: Mapping[str, Any] | None) -> bool:
    """Whether a trial's result covers every member (a pruned or cut trial does not)."""
    return bool(result) and result.get("members_done") == result.get("members_total") \
        and "worst_der" in result


class ExactPruning(FIFOScheduler):
    """Stops a trial whose running worst case can no longer make it a finalist (see
    ``robust_rules``). Stateless: the finished settings are read from the controller's trials
    every time, so a resumed search prunes against the settings finished before the resume."""

    def __init__(self, top_k: int, max_acc_drop: float, record: str | None = None) -> None:
        super().__init__()
        self.top_k = top_k
        self.max_acc_drop = max_acc_drop
        self.record = record  # a JSON file listing the pruned trials (the report counts them)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if complete(result):
            return TrialScheduler.CONTINUE
        finished = [Finished(t.last_result["worst_der"], t.last_result["mean_acc_drop"])
                    for t in tune_controller.get_trials()
                    if t is not trial and t.status == "TERMINATED" and complete(t.last_result)]
        threshold = prune_threshold(finished, self.top_k, self.max_acc_drop)
        if should_prune(result["worst_der"], threshold):
            log.info("exact pruning: trial %s stopped after %d/%d members (running worst-case DER "
                     "%.4f < %.4f, the worst of the top_k=%d admissible)", trial.trial_id,
                     result["members_done"], result["members_total"], result["worst_der"],
                     threshold, self.top_k)
            if self.record:
                path = Path(self.record)
                pruned = json.loads(path.read_text()) if path.exists() else {}
                pruned[trial.trial_id] = {"members_done": result["members_done"],
                                          "members_total": result["members_total"],
                                          "worst_der": result["worst_der"], "threshold": threshold}
                path.write_text(json.dumps(pruned, indent=1))
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


class RobustOptunaSearch(ResumableOptunaSearch):
    """Adds a member order to each suggested config (the incumbent's weakest members first) and
    stores each finished trial's figures as Optuna user attributes.

    What the study is told: a setting evaluated on every member is COMPLETE, with its worst case
    as the value and its mean ACC drop against the budget as a constraint. A setting stopped
    before its last member (exact pruning, or the search's time budget) is PRUNED: its running
    worst case is only an upper bound and its ACC drop covers some members, so neither may
    stand for a finished setting (TPE's good group, ``study.best_trials``, the constraint). Its
    running worst cases are the intermediate values, one per member done."""

    step_key = "members_done"

    def __init__(self, *args: Any, member_ids: Sequence[str], max_acc_drop: float,
                 **kwargs: Any) -> None:
        super().__init__(*args, constraints=(("max_acc_drop", max_acc_drop),), **kwargs)
        self._member_ids = list(member_ids)
        self._max_acc_drop = max_acc_drop
        self._settings_done: dict[str, dict[str, Any]] = {}

    def constraint_values(self, result: dict) -> dict[str, float]:
        """The ACC-budget constraint of a complete setting (<= 0: within); none for a pruned
        one."""
        return {"max_acc_drop": float(result["mean_acc_drop"]) - self._max_acc_drop}

    def stop_note(self, result: dict) -> str:
        """Why a setting stopped before its last member (pruned or cut), for Optuna."""
        return (f"stopped after {result.get('members_done')} of {result.get('members_total')} "
                "members (exact pruning or the search's time budget)")

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            best = incumbent(self._settings_done.values(), self._max_acc_drop)
            config = {**config, ORDER_KEY: member_order(
                self._member_ids, best["ders"] if best else None)}
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if result and "worst_der" in result and ot_trial is not None \
                and trial_id not in self._completed_trials:
            ders = {m: result[f"der.{m}"] for m in self._member_ids if f"der.{m}" in result}
            attrs = {"worst_der": result["worst_der"], "mean_der": result["mean_der"],
                     "mean_acc_drop": result["mean_acc_drop"],
                     "members_done": result["members_done"], "pruned": not complete(result),
                     "tune_trial_id": trial_id}
            try:
                for k, v in {**attrs, **{f"der.{m}": v for m, v in ders.items()}}.items():
                    ot_trial.set_user_attr(k, v)
            except Exception as exc:  # noqa: BLE001 - e.g. a trial finished before a resume
                log.debug("trial %s: user attributes not stored (%s)", trial_id, exc)
            self._settings_done[trial_id] = {**attrs, "complete": complete(result), "ders": ders}
        super().on_trial_complete(trial_id, result, error)


class ComputeBudget(Stopper):
    """Ends a search once its settings have spent ``limit_s`` member-seconds: the sum, over
    every setting, of its members' own evaluation times (``seconds.<member>`` in its reports),
    so the budget means the same compute however many settings run side by side. Settings
    still running are cut (PRUNED in Optuna). A resumed search counts what the settings ended
    before the resume spent, read from the study (``optuna_search.RESULT_ATTR``)."""

    def __init__(self, limit_s: float, storage: str | None = None,
                 study_name: str | None = None) -> None:
        self.limit_s = limit_s
        self.storage, self.study_name = storage, study_name
        self._spent: dict[str, float] = {}
        self._before: dict[str, float] | None = None

    @staticmethod
    def cost(result: Mapping[str, Any]) -> float:
        """A trial result's member-seconds so far (the sum of its members' own times)."""
        return float(sum(v for k, v in result.items()
                         if k.startswith("seconds.") and isinstance(v, (int, float))))

    def _ended_before(self) -> dict[str, float]:
        if self._before is None:
            from d3tune.search.optuna_search import ended_results

            self._before = {} if self.storage is None else {
                key: self.cost(r) for key, r in ended_results(self.storage,
                                                               self.study_name or "").items()}
        return self._before

    def __call__(self, trial_id: str, result: dict) -> bool:
        number = (result.get("config") or {}).get(TRIAL_KEY)
        self._spent[f"optuna:{number}" if number is not None else trial_id] = self.cost(result)
        return False

    def spent(self) -> float:
        """Member-seconds spent by every setting so far, this invocation and earlier ones."""
        return sum({**self._ended_before(), **self._spent}.values())

    def stop_all(self) -> bool:
        spent = self.spent()
        if spent >= self.limit_s:
            log.info("compute budget: %.0f of %.0f member-seconds spent; the search stops",
                     spent, self.limit_s)
        return spent >= self.limit_s



class RobustMlflowCallback(MlflowTuneCallback):
    """The parent run is the robust search; a child per setting searched (phase=search), per
    member a metric named by it (``der.<member>``, ``acc_drop.<member>``, ...), the running
    worst case with step = members done; holdout rows are children too (phase=holdout)."""

    def __init__(self, spec: RobustSpec, extra_tags: Mapping[str, str] | None = None) -> None:
        super().__init__(spec.paths, spec.experiment, spec.source)
        self.spec = spec
        self.extra_tags = dict(extra_tags or {})  # e.g. a leaderboard's mlflow.parentRunId

    def parent_params(self) -> dict[str, Any]:
        """The base fields and the search's size as params of the parent run."""
        params = {f"base.{k}": v for k, v in flatten(self.spec.base).items()}
        params.update({"kind": "robust", "metric": "worst_der", "mode": "max",
                       "num_samples": self.spec.budget, "cells": 0})
        return params

    def parent_tags(self) -> dict[str, str]:
        """The parent's tags: robust, the defense, study, datasets, Optuna storage, population
        and holdout seeds (and a leaderboard's nesting)."""
        return {"d3tune.kind": "robust", **super().parent_tags(),
                "d3tune.defense": self.spec.defense, "d3tune.study": self.spec.name,
                "d3tune.datasets": ",".join(datasets_of(self.spec)),
                "d3tune.optuna_storage": self.paths.optuna_url,
                "d3tune.population_seeds": ",".join(str(s) for s in sorted(
                    {m.seed for m in self.spec.members})),
                "d3tune.holdout_seeds": ",".join(str(s) for s in sorted(
                    {m.seed for m in self.spec.holdout})), **self.extra_tags}

    def child_run(self, key: str, name: str, tags: dict[str, str],
                  params: dict[str, Any]) -> str | None:
        """A child run for ``key`` (a Tune trial id or a holdout label), created once."""
        self._ensure_setup()
        if key in self.state["children"]:
            return self.state["children"][key]
        if not self._ready():
            return None
        run = self.call("child run", lambda: self.client.create_run(
            self.exp_id, run_name=name, tags={"mlflow.parentRunId": self.parent_id, **tags}))
        if run is None:
            return None
        self.state["children"][key] = run.info.run_id
        self.save()
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def _child(self, trial: Any) -> str | None:
        setting = setting_of(trial.config or {})
        members = [m.id for m in self.spec.members]
        params = {**setting, "phase": "search", "members": ",".join(members),
                  "seeds": ",".join(str(s) for s in sorted({m.seed for m in self.spec.members})),
                  "runtime.threads": spec_threads(self.spec),
                  "member_order": ",".join((trial.config or {}).get(ORDER_KEY) or members)}
        return self.child_run(trial.trial_id, str(trial),
                              {"d3tune.trial_id": trial.trial_id, "d3tune.phase": "search"}, params)

    def log_member(self, run_id: str, step: int, result: Mapping[str, Any]) -> None:
        """Log a setting's newest member figures on its child run, step = members done."""
        from mlflow.entities import Metric

        ms = now_ms()
        member = result["member"]
        metrics = [Metric(k, float(result[k]), ms, step)
                   for k in ("worst_der", "mean_acc_drop", "mean_der")]
        metrics += [Metric(f"{k}.{member}", float(result[f"{k}.{member}"]), ms, 0)
                    for k in MEMBER_METRICS if f"{k}.{member}" in result]
        self.call("member metrics", lambda: self.client.log_batch(run_id, metrics=metrics))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self._ensure_setup()
        tid = trial.trial_id
        step = int(result.get("members_done", 0))
        run_id = self._child(trial)
        if run_id is None or step <= self.state["steps"].get(tid, 0):
            return  # a retried trial re-reports members already logged
        self.log_member(run_id, step, result)
        self.state["steps"][tid] = step
        self.save()

    def _finish(self, trial: Any, status: str) -> None:
        from mlflow.entities import Metric, RunTag

        self._ensure_setup()
        run_id = self._child(trial)
        if run_id is None or trial.trial_id in self.state["done"]:
            return
        last = trial.last_result or {}
        ms = now_ms()
        metrics = [Metric(k, float(last[k]), ms, 0) for k in
                   ("worst_der", "mean_der", "mean_acc_drop", "members_done", "members_total")
                   if isinstance(last.get(k), (int, float))]
        pruned = status == "FINISHED" and "worst_der" in last and not complete(last)
        tags = [RunTag("d3tune.pruned", str(pruned).lower()),
                RunTag("d3tune.admissible", str(complete(last) and last["mean_acc_drop"]
                                                 <= self.spec.max_acc_drop + 1e-12).lower())]
        self.call("final metrics", lambda: self.client.log_batch(run_id, metrics=metrics,
                                                                  tags=tags))
        self.call("status", lambda: self.client.set_terminated(run_id, status))
        self.state["done"].append(trial.trial_id)
        self.save()

    def log_holdout(self, label: str, setting: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                    figures: Mapping[str, float], shared_with: str | None = None,
                    kind: str | None = None, search_rank: int | None = None) -> None:
        """One holdout row (a finalist or a reference) as a finished child run. A row whose
        run was shared with another (same configs, run once) is tagged ``d3tune.shared_with``,
        so that sums of compute count that run once."""
        from mlflow.entities import Metric

        key = f"holdout:{label}"
        if key in self.state["done"]:
            return
        params = {**setting, "phase": "holdout", "label": label,
                  "runtime.threads": spec_threads(self.spec),
                  "members": ",".join(str(r["member"]) for r in rows),
                  "seeds": ",".join(str(s) for s in sorted({int(r["seed"]) for r in rows}))}
        tags = {"d3tune.phase": "holdout", "d3tune.label": label}
        if shared_with is not None:
            tags["d3tune.shared_with"] = shared_with
        if kind is not None:  # finalist | tradeoff | reference
            tags["d3tune.row_kind"] = kind
        if search_rank is not None:  # 0: the search's best (what the confirmation tries first)
            tags["d3tune.search_rank"] = str(search_rank)
        run_id = self.child_run(key, f"holdout {label}", tags, params)
        if run_id is None:
            return
        ms = now_ms()
        metrics = [Metric(k, float(v), ms, 0) for k, v in figures.items()]
        for r in rows:
            metrics += [Metric(f"{k}.{r['member']}", float(r[k]), ms, 0) for k in MEMBER_METRICS
                        if k in r]
        for i in range(0, len(metrics), 900):
            self.call("holdout metrics", lambda m=metrics[i:i + 900]: self.client.log_batch(
                run_id, metrics=m))
        self.call("status", lambda: self.client.set_terminated(run_id, "FINISHED"))
        self.state["done"].append(key)
        self.save()


__all__ = ["ExactPruning", "RobustOptunaSearch", "RobustMlflowCallback",
           "member_before", "run_members", "population_trainable", "summary",
           "setting_of", "complete"]
