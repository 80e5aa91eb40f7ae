"""The Tune searchers d3tune builds: resumable Optuna TPE for a sweep, and for a robust search
the same plus a member order per setting; each behind Ray's ConcurrencyLimiter. The searcher
classes live in ``optuna_search`` (pickled into Tune's snapshots); this module assembles them.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import optuna
from ray.tune.search import ConcurrencyLimiter

from d3tune.search.optuna_search import ResumableOptunaSearch, RobustOptunaSearch
from d3tune.search.tuner import define_by_run
from d3tune.specs.robust_spec import Member, RobustSpec
from d3tune.specs.sweep_spec import RunPlan


def sweep_searcher(plan: RunPlan) -> Any:
    """The plan's Tune searcher: resumable Optuna TPE (single or multi-objective, with
    constraints) for a sweep, None for an ablation grid."""
    if plan.kind == "ablation":
        return None
    storage = plan.paths.optuna_storage
    metric = list(plan.metric) if plan.multi_objective else plan.metric[0]
    mode = list(plan.mode) if plan.multi_objective else plan.mode[0]
    sampler = optuna.samplers.TPESampler(seed=plan.search_seed)  # TPE handles both cases
    conditional = any(d.only_for for d in plan.space)
    searcher = ResumableOptunaSearch(space=partial(define_by_run, plan.space) if conditional else None,
                            metric=metric, mode=mode, sampler=sampler, storage=storage,
                            study_name=plan.name, constraints=plan.constraints)
    return ConcurrencyLimiter(searcher, max_concurrent=plan.max_concurrent)


def robust_searcher(spec: RobustSpec, members: tuple[Member, ...]) -> Any:
    """A robust search's searcher: TPE over the spec's space, the spec's start points first,
    each suggested setting carrying the order to evaluate its members in (the incumbent's
    weakest first, so exact pruning stops a losing setting early)."""
    storage = spec.paths.optuna_storage
    # The ACC budget is set as a constraint on complete trials by the searcher (Trial.
    # set_constraint), which TPE reads from the study: no constraints_func.
    sampler = optuna.samplers.TPESampler(
        seed=spec.search_seed, n_startup_trials=max(4, min(10, spec.budget // 4)))
    searcher = RobustOptunaSearch(space=partial(define_by_run, spec.space),
                                  metric="worst_der", mode="max", sampler=sampler,
                                  storage=storage, study_name=spec.name,
                                  points_to_evaluate=[dict(p) for p in spec.start_points] or None,
                                  member_ids=[m.id for m in members],
                                  max_acc_drop=spec.max_acc_drop)
    return ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)
