"""MLflow for a robust search, from the driver: the sweeps' callback (run map, ledger, outage
catch-up) with a child run per setting logged per member, and the holdout rows as children.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from d3tune.config import flatten
from d3tune.runstate import now_ms
from d3tune.search.mlflow_callback import MlflowTuneCallback
from d3tune.search.robust_trainable import (
    MEMBER_METRICS,
    ORDER_KEY,
    complete,
    setting_of,
    spec_threads,
)
from d3tune.specs.robust_spec import RobustSpec, datasets_of


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

    def child_params(self, config: dict[str, Any]) -> dict[str, Any]:
        """A setting's child run: the setting, the members and the order they ran in."""
        members = [m.id for m in self.spec.members]
        return {**setting_of(config or {}), "phase": "search", "members": ",".join(members),
                "seeds": ",".join(str(s) for s in sorted({m.seed for m in self.spec.members})),
                "runtime.threads": spec_threads(self.spec),
                "runtime.member_batch": self.spec.member_batch,
                "member_order": ",".join((config or {}).get(ORDER_KEY) or members)}

    def child_tags(self, trial: Any) -> dict[str, str]:
        """A setting's child run is a search row (holdout rows are children too)."""
        return {"d3tune.phase": "search"}

    def final_record(self, last: dict[str, Any], status: str
                     ) -> tuple[dict[str, float], dict[str, str]]:
        """A setting's end: its running figures, and whether pruning stopped it and whether it
        kept the ACC budget."""
        metrics = {k: float(last[k]) for k in
                   ("worst_der", "mean_der", "mean_acc_drop", "members_done", "members_total")
                   if isinstance(last.get(k), (int, float))}
        pruned = status == "FINISHED" and "worst_der" in last and not complete(last)
        admissible = complete(last) and last["mean_acc_drop"] <= self.spec.max_acc_drop + 1e-12
        return metrics, {"d3tune.pruned": str(pruned).lower(),
                         "d3tune.admissible": str(admissible).lower(),
                         "d3tune.node_ip": str(last.get("node_ip", ""))}

    def child_run(self, key: str, name: str, tags: dict[str, str],
                  params: dict[str, Any]) -> str | None:
        """A child run for a holdout row (``key``: its label), created once."""
        self.ensure_setup()
        if key in self.state["children"]:
            return self.state["children"][key]
        return self.make_child(key, name, tags, lambda: params)

    def log_members(self, trial: Any, result: Mapping[str, Any]) -> None:
        """A setting's running figures at step = members done, and the figures of each member
        not logged yet (at step 0): after an outage, the members missed come with the next
        result or the trial's end, once each."""
        from mlflow.entities import Metric

        tid = trial.trial_id
        step = int(result.get("members_done", 0))
        run_id = self.child_run_for(trial)
        if run_id is None or step <= self.state["steps"].get(tid, 0):
            return  # no run yet (owed), or a retried trial re-reporting members logged
        logged = set(self.state.get("members_logged", {}).get(tid, []))
        new = sorted(k[len("der."):] for k in result
                     if k.startswith("der.") and k[len("der."):] not in logged)
        ms = now_ms()
        metrics = [Metric(k, float(result[k]), ms, step)
                   for k in ("worst_der", "mean_acc_drop", "mean_der") if k in result]
        metrics += [Metric(f"{k}.{m}", float(result[f"{k}.{m}"]), ms, 0)
                    for m in new for k in MEMBER_METRICS if f"{k}.{m}" in result]
        if self.attempt("member metrics", lambda: self.client.log_batch(
                run_id, metrics=metrics))[0]:
            self.commit(("set", "steps", tid, step),
                        ("set", "members_logged", tid, sorted(logged | set(new))))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        """Per member, not per epoch (the sweeps' epoch buffer is not used)."""
        self.ensure_setup()
        if self.owed:
            self.catch_up()
        self.log_members(trial, result)

    def finish_trial(self, trial: Any, status: str) -> None:
        """Members an outage kept from MLflow first, then the ledger and the run's end."""
        self.ensure_setup()
        self.log_members(trial, trial.last_result or {})
        super().finish_trial(trial, status)

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
                  "runtime.member_batch": self.spec.member_batch,
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
        self.commit(("add", "done", None, key))
