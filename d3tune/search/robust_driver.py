"""``d3tune robust``: search for defense settings that hold on the worst case, then confirm
the best few on seeds the search never saw.

Phases, all resumable (``--resume``):
1. population: every member's backdoored model is built (or loaded from the cache) once, up
   front, as parallel Ray tasks, and scored before any defense; a member whose backdoor did
   not plant (ASR before < min_asr) is left out with a warning naming it.
2. search: Optuna TPE (seeded, persisted beside Tune's state) proposes settings; one Tune trial
   evaluates a setting on every member in turn; exact pruning stops a trial as soon as its
   running worst case proves it cannot become a finalist; the ACC budget is an Optuna
   constraint, not a penalty.
3. confirmation: the top_k admissible settings (and the references: the paper's defaults, the
   profile's, named ones; and the trade-off rows) run on the holdout seeds. The search selects,
   the holdout confirms: the chosen defaults are the search's best finalist that keeps the ACC
   budget on the holdout (the next one in search order only where it does not); holdout
   figures are never compared between finalists.
Output: a ``d3tune run --config`` YAML, an MLflow parent run with a child per setting, and a
report (Markdown + plots) logged to the parent.

``robust_search(spec)`` is the function a leaderboard calls (one per defense, same population
and budget); its ``RobustOutcome.holdout`` holds the confirmation rows.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from d3tune.errors import UsageError
from d3tune.search import tuner
from d3tune.search.robust_rules import (
    admissible,
    choose,
    finalists,
    pruning_savings,
    tradeoff_extras,
)
from d3tune.runstate import has_study, study_storage, write_json
from d3tune.specs.inputs import input_paths
from d3tune.specs.robust_spec import (
    Member,
    Reference,
    RobustSpec,
    defaults_yaml,
    member_config,
    setting_fields,
)

log = logging.getLogger(__name__)

POPULATION_FILE = "population.json"
HOLDOUT_FILE = "holdout.json"
# rows of candidates whose holdout is split over tasks and not all in yet (run_holdout_groups)
HOLDOUT_PARTS_FILE = "holdout_parts.json"
PRUNED_FILE = "pruned.json"


@dataclass
class RobustOutcome:
    """What a robust search returns: its population, the settings searched, the holdout rows,
    the chosen setting (the rank-1 finalist), what pruning saved, timings and where its files
    and MLflow parent are."""
    spec: RobustSpec
    population: pd.DataFrame  # one row per member (search, then holdout): before, excluded
    search: pd.DataFrame  # one row per setting tried
    holdout: pd.DataFrame  # one row per finalist / reference on the holdout seeds
    chosen: dict[str, Any] | None  # the search's rank-1 finalist on the holdout (None: none)
    skipped: int  # member evaluations exact pruning saved
    total: int  # member evaluations an unpruned search would have run
    seconds: dict[str, float] = field(default_factory=dict)
    report_dir: Path | None = None
    yaml_path: Path | None = None
    parent_run_id: str | None = None


def _remote(fn: Any, spec: RobustSpec) -> Any:
    import ray

    return ray.remote(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu,
                      max_retries=spec.max_failures)(fn)


def _threads(spec: RobustSpec) -> int:
    from d3tune.search.robust_trainable import spec_threads

    return spec_threads(spec)


# ---------------------------------------------------------------------------------------------
# Phase 1: population


def build_population(spec: RobustSpec, state: Path) -> pd.DataFrame:
    """Every search member's model once, in parallel, scored before any defense; reused on
    resume. The holdout members' models are built by the confirmation's first use of them
    (through the same cache), so the search starts as soon as its own members are ready."""
    import ray

    from d3tune.search.robust_trainable import member_before

    path = state / POPULATION_FILE
    rows: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}
    todo = [m for m in spec.members if m.id not in rows]
    task = _remote(member_before, spec)
    pending = {task.remote(spec, m, _threads(spec)): m for m in todo}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        m = pending.pop(ready[0])
        rows[m.id] = ray.get(ready[0])
        write_json(path, rows, indent=1, default=str)
        log.info("population: %s ready (%s, %.1f s)", m.id, rows[m.id]["origin"],
                 rows[m.id]["seconds"])
    df = pd.DataFrame([{**rows[m.id], "phase": "search"} for m in spec.members])
    df["excluded"] = df["asr_before"] < spec.min_asr
    for _, r in df[df["excluded"]].iterrows():
        _warn_excluded(r["member"], r["asr_before"], spec.min_asr)
    return df


def _warn_excluded(member: str, asr: float, min_asr: float) -> None:
    log.warning("population member %s left out: its attack did not plant (ASR before %.3f < "
                "min_asr %.2f); it is not scored", member, asr, min_asr)


def kept(members: tuple[Member, ...], population: pd.DataFrame) -> tuple[Member, ...]:
    """The members whose backdoor planted (ASR before >= min_asr), in spec order."""
    out = set(population.loc[~population["excluded"], "member"])
    return tuple(m for m in members if m.id in out)


# ---------------------------------------------------------------------------------------------
# Phase 2: search


def search_tuner(spec: RobustSpec, members: tuple[Member, ...], *, resume: bool,
                 callbacks: list, befores: dict[str, dict[str, float]] | None = None):
    """The search phase's Tuner: one trial per setting, evaluated member by member, behind
    exact pruning; resumed where Tune left a snapshot (a search stopped before its first one
    starts afresh, the study keeping what it already told). ``befores``: the population's
    before-figures per member, so no setting measures them again."""
    from ray import tune

    from d3tune.search.robust_pruning import ExactPruning
    from d3tune.search.robust_trainable import population_trainable
    from d3tune.search.searchers import robust_searcher

    paths = spec.paths
    fn = tune.with_parameters(population_trainable, spec=spec, members=members,
                              threads=_threads(spec), befores=befores)
    trainable = tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    if resume and tuner.can_resume(paths):
        return tuner.build_tuner(paths, trainable, callbacks=callbacks, resume=True)
    stop = None
    if spec.compute_budget_s is not None:
        from d3tune.search.compute_budget import ComputeBudget

        stop = ComputeBudget(spec.compute_budget_s, paths.optuna_storage, spec.name)
    return tuner.build_tuner(
        paths, trainable, callbacks=callbacks,
        searcher=robust_searcher(spec, members),
        scheduler=ExactPruning(spec.top_k, spec.max_acc_drop,
                               str(paths.state_dir / PRUNED_FILE)),
        num_samples=spec.budget, time_budget_s=spec.time_budget_s, stop=stop,
        max_failures=spec.max_failures)


def _close_cut(spec: RobustSpec, results: Any) -> None:
    """Settings the time or compute budget cut are PRUNED in the study (not left RUNNING)."""
    from d3tune.search.optuna_search import prune_cut

    def attrs_of(result: dict[str, Any]) -> dict[str, Any]:  # as RobustOptunaSearch stores them
        return {**{k: result[k] for k in ("worst_der", "mean_der", "mean_acc_drop",
                                           "members_done")
                    if isinstance(result.get(k), (int, float))}, "pruned": True}

    last = {(r.metrics or {}).get("trial_id"): r.metrics or {} for r in results}
    closed = prune_cut(spec.paths.optuna_storage,
                       spec.name, last, "worst_der", "members_done",
                       "cut by the search's time or compute budget before its last member",
                       attrs_of)
    if closed:
        log.info("%d setting(s) cut by the search's budget: PRUNED in the study", closed)


def search_frame(results: Any, members: tuple[Member, ...], state: Path) -> pd.DataFrame:
    """One row per setting tried: the setting, its figures, complete / pruned / cut (stopped by
    the time budget), per-member DER."""
    from d3tune.search.robust_trainable import complete, setting_of

    path = state / PRUNED_FILE
    pruned = json.loads(path.read_text()) if path.exists() else {}
    numbers = trial_numbers(state)
    rows = []
    for i, r in enumerate(results):
        m = r.metrics or {}
        if "worst_der" not in m:
            continue
        row = {"trial": numbers.get(m.get("trial_id"), len(numbers) + i),
               "trial_id": m.get("trial_id"), "setting": setting_of(r.config or {}),
               "worst_der": m["worst_der"], "mean_der": m["mean_der"],
               "mean_acc_drop": m["mean_acc_drop"], "members_done": m["members_done"],
               "members_total": m["members_total"], "complete": complete(m),
               "pruned": m.get("trial_id") in pruned, "error": bool(r.error),
               "cut": not r.error and not complete(m) and m.get("trial_id") not in pruned,
               "ders": {x.id: m[f"der.{x.id}"] for x in members if f"der.{x.id}" in m},
               "cpu_seconds": sum(float(m.get(f"cpu_seconds.{x.id}", 0.0)) for x in members)}
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:  # creation order: Tune's trial ids are random, Optuna numbers are not
        df = df.sort_values("trial").reset_index(drop=True)
    return df


def trial_numbers(state: Path) -> dict[str, int]:
    """Tune trial id -> Optuna trial number (the order TPE proposed the settings in)."""
    import optuna

    if not has_study(state):
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = study_storage(state)
    numbers = {}
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for t in study.trials:
            if "tune_trial_id" in t.user_attrs:
                numbers[t.user_attrs["tune_trial_id"]] = t.number
    return numbers


# ---------------------------------------------------------------------------------------------
# Phase 3: confirmation on the holdout seeds


def holdout_task(spec: RobustSpec, members: tuple[Member, ...], setting: dict[str, Any],
                 reference: Reference | None, threads: int) -> list[dict[str, Any]]:
    """A Ray task: one candidate setting on the holdout members; returns one row per member."""
    from d3tune.search.robust_trainable import run_members

    return run_members(spec, members, setting, reference, threads=threads)


def _holdout_runs(spec: RobustSpec, members: tuple[Member, ...], candidate: Mapping[str, Any],
                  refs: Mapping[str, Reference]) -> list[Any]:
    """The resolved trial configs a candidate would run on the holdout: two candidates with
    equal lists (a finalist that is a reference's setting, as the default often is in a small
    search that starts from it) are run once and share the rows."""
    ref = refs.get(candidate["reference"]) if candidate["reference"] else None
    return [member_config(spec, m, candidate["setting"], ref) for m in members]


def holdout_parts(slots: int, candidates: int, members: int) -> int:
    """Tasks per candidate on the holdout: enough that ``slots`` tasks run at once. With
    top_k 1 the holdout often has one candidate (the winner is the default, which the default
    reference shares), and one task would confirm every member on one core while the others
    idle. Members are independent trials (own seeds, own model), so a candidate's members can
    be split into contiguous runs with the same rows."""
    if candidates == 0 or members == 0:
        return 1
    return max(1, min(members, -(-slots // candidates)))


def run_holdout_groups(spec: RobustSpec, groups: list[list[dict[str, Any]]],
                       todo: list[tuple[int, list[dict[str, Any]]]],
                       refs: Mapping[str, Reference], task: Any, state: Path,
                       done: dict[str, Any]) -> None:
    """Run the unfinished groups' holdout members as Ray tasks (``task``), several per group
    when there are fewer groups than slots (``holdout_parts``), and store each group's rows
    in ``done`` (and ``holdout.json``) once all its members are in, in the holdout's member
    order. The rows of a part are kept as soon as it returns (``holdout_parts.json``), so a
    resumed search runs only the members still missing."""
    import ray

    members = spec.holdout
    order = {m.id: i for i, m in enumerate(members)}
    path, parts_path = state / HOLDOUT_FILE, state / HOLDOUT_PARTS_FILE
    partial: dict[str, list[dict[str, Any]]] = (json.loads(parts_path.read_text())
                                                if parts_path.exists() else {})
    pending: dict[Any, int] = {}  # task -> its group's index
    rows_of: dict[int, list[dict[str, Any]]] = {}
    tasks_left: dict[int, int] = {}

    def finish(i: int) -> None:
        rows = sorted(rows_of[i], key=lambda r: order[r["member"]])
        for c in groups[i]:
            done[c["label"]] = rows
        partial.pop(groups[i][0]["label"], None)
        write_json(path, done, indent=1, default=str)
        write_json(parts_path, partial, indent=1, default=str)

    parts = holdout_parts(spec.max_concurrent, len(todo), len(members))
    for i, group in todo:
        lead = group[0]
        ref = refs.get(lead["reference"]) if lead["reference"] else None
        rows_of[i] = [r for r in partial.get(lead["label"], []) if r["member"] in order]
        have = {r["member"] for r in rows_of[i]}
        k = i % len(members)
        rotated = [m for m in members[k:] + members[:k] if m.id not in have]
        chunks = [c for c in (rotated[j * len(rotated) // parts:(j + 1) * len(rotated) // parts]
                              for j in range(parts)) if c]
        tasks_left[i] = len(chunks)
        if not chunks:  # every member came in before a resume
            finish(i)
        for chunk in chunks:
            pending[task.remote(spec, chunk, lead["setting"], ref, _threads(spec))] = i
    write_json(path, done, indent=1, default=str)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        rows_of[i] += ray.get(ready[0])
        tasks_left[i] -= 1
        if tasks_left[i] == 0:
            finish(i)
        else:
            partial[groups[i][0]["label"]] = rows_of[i]
            write_json(parts_path, partial, indent=1, default=str)


def confirm(spec: RobustSpec, candidates: list[dict[str, Any]], state: Path, callback: Any,
            population: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Finalists and references on the holdout members (Ray tasks); finished rows are kept in
    the state folder, so a resumed search re-runs only the missing ones. Each task starts at
    another member, so the first tasks build the holdout models side by side; a candidate's
    members are split over several tasks when there are fewer candidates than slots
    (``holdout_parts``). A holdout member whose backdoor did not plant is left out of every
    row (warning), as in the search."""

    path = state / HOLDOUT_FILE
    done: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    refs = {r.name: r for r in spec.references}
    task = _remote(holdout_task, spec)
    members = spec.holdout
    groups: list[list[dict[str, Any]]] = []  # candidates with equal holdout runs: run once
    runs: list[list[Any]] = []
    for c in candidates:
        run = _holdout_runs(spec, members, c, refs)
        if run in runs:  # e.g. the search's winner is the default setting
            groups[runs.index(run)].append(c)
        else:
            runs.append(run)
            groups.append([c])
    shared = {c["label"]: g[0]["label"] for g in groups for c in g[1:]}
    todo = []
    for i, group in enumerate(groups):
        finished = next((done[c["label"]] for c in group if c["label"] in done), None)
        if finished is not None:
            for c in group:
                done.setdefault(c["label"], finished)
        else:
            todo.append((i, group))
    run_holdout_groups(spec, groups, todo, refs, task, state, done)
    before: dict[str, dict[str, Any]] = {}
    for member_rows in done.values():
        for r in member_rows:
            before.setdefault(r["member"], {"member": r["member"], "seed": r["seed"],
                                            "acc_before": r["acc_before"],
                                            "asr_before": r["asr_before"], "phase": "holdout"})
    hold_pop = pd.DataFrame([before[m.id] for m in members if m.id in before])
    if not hold_pop.empty:
        hold_pop["excluded"] = hold_pop["asr_before"] < spec.min_asr
        for _, r in hold_pop[hold_pop["excluded"]].iterrows():
            _warn_excluded(r["member"], r["asr_before"], spec.min_asr)
        population = pd.concat([population, hold_pop], ignore_index=True)
    out = set(hold_pop.loc[hold_pop["excluded"], "member"]) if not hold_pop.empty else set()
    rows = []
    for c in candidates:
        order = {m.id: i for i, m in enumerate(members)}
        member_rows = sorted((r for r in done[c["label"]] if r["member"] not in out),
                             key=lambda r: order[r["member"]])
        if not member_rows:
            continue
        ders = [r["der"] for r in member_rows]
        drops = [r["acc_drop"] for r in member_rows]
        figures = {"holdout_worst_der": min(ders), "holdout_mean_der": sum(ders) / len(ders),
                   "holdout_mean_acc_drop": sum(drops) / len(drops)}
        ref = refs.get(c["reference"]) if c["reference"] else None
        shown = setting_fields(spec, c["setting"], ref)
        shown = {k: v for k, v in shown.items() if k.startswith("defense.")}
        callback.log_holdout(c["label"], shown, member_rows, figures,
                             shared_with=shared.get(c["label"]), kind=c["kind"],
                             search_rank=c["search_rank"])
        rows.append({**c, **figures, "shown": shown,
                     "holdout_ders": {r["member"]: r["der"] for r in member_rows},
                     "holdout_admissible": admissible(figures["holdout_mean_acc_drop"],
                                                      spec.max_acc_drop)})
    return pd.DataFrame(rows), population


def candidates_of(spec: RobustSpec, search: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows the holdout confirms: the finalists (search order), the trade-off extras and
    every reference."""
    rows = search.to_dict("records") if not search.empty else []
    picked = finalists(rows, spec.top_k, spec.max_acc_drop)
    extras = tradeoff_extras(rows, picked, spec.tradeoff_budgets)
    out = [{"label": f"trial-{r['trial']}", "kind": kind, "reference": None,
            "setting": r["setting"], "search_rank": rank, "search_worst_der": r["worst_der"],
            "search_mean_acc_drop": r["mean_acc_drop"], "search_ders": r["ders"]}
           for rank, (kind, r) in enumerate([*(("finalist", r) for r in picked),
                                             *(("tradeoff", r) for _, r in extras)])]
    out += [{"label": f"ref-{ref.name}", "kind": "reference", "reference": ref.name,
             "setting": dict(ref.setting), "search_rank": None, "search_worst_der": None,
             "search_mean_acc_drop": None, "search_ders": {}} for ref in spec.references]
    return out


# ---------------------------------------------------------------------------------------------
# The whole search


def robust_search(spec: RobustSpec, *, resume: bool = False, address: str | None = None,
                  out: str | Path | None = None, console: Console | None = None,
                  parent_tags: dict[str, str] | None = None) -> RobustOutcome:
    """Population -> search -> confirmation -> YAML, report, MLflow. Raises UsageError for
    problems with the user's input (an existing run without --resume, an empty population).
    ``parent_tags`` go on the parent run when it is created (a leaderboard nests the search
    under its own run with ``mlflow.parentRunId``)."""
    import ray

    from d3tune.search.robust_mlflow import RobustMlflowCallback

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    clock = time.monotonic()
    seconds: dict[str, float] = {}
    exp_dir, state = spec.paths.experiment_dir, spec.paths.state_dir
    if resume and not state.exists():
        raise UsageError(f"--resume: no interrupted robust search at {state} "
                         f"(spec name {spec.name!r})")
    if not resume and (state.exists() or (exp_dir.exists() and any(exp_dir.iterdir()))):
        raise UsageError(f"{exp_dir} already holds a robust search named {spec.name!r}: pass "
                         "--resume to continue it, or change the spec's name/storage")
    state.mkdir(parents=True, exist_ok=True)
    started = tuner.init_ray(address, input_paths(spec))
    try:
        callback = RobustMlflowCallback(spec, parent_tags)
        callback.setup()
        population = build_population(spec, state)
        members = kept(spec.members, population)
        _log_population(callback, spec, population)
        seconds["population"] = time.monotonic() - clock
        if not members:
            raise UsageError(f"{spec.source}: population: no member left to search on: every "
                             f"backdoor scored ASR before < min_asr {spec.min_asr}")
        t = time.monotonic()
        from d3tune.search.robust_trainable import population_befores

        runner = search_tuner(spec, members, resume=resume, callbacks=[callback],
                              befores=population_befores(population.to_dict("records")))
        results = runner.fit()
        _close_cut(spec, results)
        seconds["search"] = time.monotonic() - t
        callback.load_state()  # Tune may have logged through a copy of the callback
        search = search_frame(results, members, state)
        t = time.monotonic()
        holdout_df, population = confirm(spec, candidates_of(spec, search), state, callback,
                                          population)
        seconds["confirmation"] = time.monotonic() - t
    finally:
        if started:
            ray.shutdown()
    callback.close_unfinished()
    finals = holdout_df[holdout_df["kind"] == "finalist"].to_dict("records") \
        if not holdout_df.empty else []
    chosen = choose(finals)
    skipped, total = pruning_savings(search.to_dict("records") if not search.empty else [])
    seconds["total"] = time.monotonic() - clock
    outcome = RobustOutcome(spec, population, search, holdout_df, chosen, skipped, total,
                            seconds, parent_run_id=callback.parent_id)
    yaml_path = Path(out) if out else Path("d3tune_results") / "robust" / f"{spec.name}.yaml"
    if chosen is not None:
        from d3tune.yamlio import dump_yaml

        yaml_path.parent.mkdir(parents=True, exist_ok=True)
        dump_yaml(defaults_yaml(spec, chosen["setting"]), yaml_path)
        outcome.yaml_path = yaml_path
    from d3tune.reports.robust_report import print_summary, write_report

    outcome.report_dir = write_report(outcome, state / "report")
    _finish_parent(callback, outcome)
    print_summary(outcome, console, callback)
    return outcome


def space_dims(spec: RobustSpec) -> int:
    """How many knobs the search tunes for its defense (a per-defense knob counts only for
    its own defense; the defense's name is not a knob)."""
    return sum(1 for d in spec.space if d.path != "defense.name"
               and d.only_for in (None, spec.defense))


def _log_population(callback: Any, spec: RobustSpec, population: pd.DataFrame) -> None:
    """Before-metrics of every member on the parent run; the excluded members as a tag."""
    excluded = ",".join(population.loc[population["excluded"], "member"])
    callback.log_to_parent("population", {
        f"{k}.{r['member']}": float(r[k]) for _, r in population.iterrows()
        for k in ("acc_before", "asr_before")}, {"d3tune.excluded": excluded or "none"})
    callback.log_parent_params_once({
        "budget": spec.budget, "top_k": spec.top_k, "max_acc_drop": spec.max_acc_drop,
        "space_dims": space_dims(spec), "runtime.threads": _threads(spec),
        "runtime.member_batch": spec.member_batch,
        "split_test": spec.split_test, "search_seed": spec.search_seed,
        "min_asr": spec.min_asr, "defense": spec.defense,
        "population": ",".join(m.id for m in spec.members),
        "holdout": ",".join(m.id for m in spec.holdout)})


def _finish_parent(callback: Any, outcome: RobustOutcome) -> None:
    """Pruning, timing and chosen-row metrics, the report and the defaults YAML on the robust
    search's parent run, then FINISHED."""
    metrics = {"pruning_skipped": outcome.skipped, "pruning_total": outcome.total,
               "seconds_total": outcome.seconds.get("total", 0.0)}
    if outcome.chosen is not None:
        metrics.update({k: outcome.chosen[k] for k in ("holdout_worst_der", "holdout_mean_der",
                                                        "holdout_mean_acc_drop",
                                                        "search_worst_der")})
    artifacts = [(p, "report") for p in sorted(outcome.report_dir.iterdir())]
    if outcome.yaml_path is not None:
        artifacts.append((outcome.yaml_path, "defaults"))
    callback.finish_parent("FINISHED", metrics, artifacts)


