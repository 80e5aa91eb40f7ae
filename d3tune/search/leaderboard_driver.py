"""``d3tune leaderboard``: every defense tuned with the same budget on the same population,
default and tuned settings confirmed on the same holdout seeds.

Why a leaderboard and not one sweep with ``defense.name`` as a knob: a shared sweep gives a
defense as many trials as TPE happens to spend on it. Here each defense gets its own robust
search (``robust.robust_search``) with exactly ``budget`` settings, the same members, the same
search seed and the same ACC budget; the default setting and the search's winner are confirmed
by the same code on the same holdout members.

Order of work (resumable: ``--resume`` continues with the defense it was in):
1. the backdoored models of every member, search and holdout, are built once, up front, in
   parallel (the model cache then serves every defense's searches);
2. per defense, in spec order: a robust search with one reference row (``default``); a defense
   whose search finished is marked done in the leaderboard's state and never re-run;
3. the table is read back from MLflow (``reports.leaderboard.read_back``), then the plot, the
   Markdown/CSV table and the tuned settings' YAML (one per defense).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from d3tune import tracking
from d3tune.errors import UsageError
from d3tune.search import tuner
from d3tune.runstate import check_resume, write_json
from d3tune.specs.inputs import input_paths
from d3tune.specs.leaderboard_spec import LeaderboardSpec

log = logging.getLogger(__name__)

STATE_FILE = "leaderboard.json"


def _load(path: Path) -> dict[str, Any]:
    state = {"parent": None, "defenses": {}, "population_seconds": None}
    if path.exists():
        state.update(json.loads(path.read_text()))
    return state


def _parent(client: Any, exp_id: str, spec: LeaderboardSpec, state: dict[str, Any],
            path: Path) -> str:
    """The leaderboard's MLflow parent run, created once (its id is kept in the state)."""
    from mlflow.entities import Param

    if state["parent"] is not None:
        return state["parent"]
    first = spec.searches[0]

    def seeds(members: Any) -> str:
        return ",".join(str(s) for s in sorted({m.seed for m in members}))

    run = client.create_run(exp_id, run_name=spec.name, tags={
        "d3tune.kind": "leaderboard", "d3tune.spec": spec.source,
        "d3tune.population_seeds": seeds(first.members),
        "d3tune.holdout_seeds": seeds(first.holdout)})
    state["parent"] = run.info.run_id
    write_json(path, state, indent=1)
    params = {"defenses": ",".join(spec.defenses), "budget": first.budget,
              "runtime.threads": max(1, int(first.resources.cpu)), "split_test": first.split_test,
              "runtime.member_batch": first.member_batch,
              "max_acc_drop": first.max_acc_drop, "top_k": first.top_k,
              "min_asr": first.min_asr, "search_seed": first.search_seed,
              "imported_draws": ",".join(f"{i.defense}={i.path}" for i in spec.imported),
              "population": ",".join(m.id for m in first.members),
              "holdout": ",".join(m.id for m in first.holdout)}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    if Path(spec.source).is_file():
        client.log_artifact(run.info.run_id, spec.source, "spec")
    return state["parent"]


def build_models(spec: LeaderboardSpec, state_dir: Path) -> float:
    """Every member's backdoored model, search and holdout, once, in parallel (Ray tasks), for
    all defenses: the searches then load them from the cache. Returns the seconds spent."""
    from d3tune.search.robust_driver import build_population

    start = time.monotonic()
    first = spec.searches[0]
    build_population(replace(first, members=first.members + first.holdout), state_dir)
    return time.monotonic() - start


def _member_seconds(robust_state: Path) -> dict[str, float]:
    """Mean seconds of one member evaluation per holdout row (from the search's own record)."""
    path = robust_state / "holdout.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    return {label: sum(r["seconds"] for r in rs) / len(rs) for label, rs in rows.items() if rs}


def _our_models(spec: LeaderboardSpec) -> dict[str, dict[str, str]]:
    """Member id -> cache key and weights SHA-256 of every model this leaderboard has used so
    far: its up-front population (holdout and first replicate) and each replicate's."""
    from d3tune.search import imported_draws

    files = imported_draws.population_files(spec.state_dir, spec.searches)
    return imported_draws.fingerprints(imported_draws.recorded_models(files),
                                       spec.searches[0].cache_dir)


def take_imports(spec: LeaderboardSpec, state: dict[str, Any], path: Path) -> None:
    """Each imported defense's draws join the leaderboard once the models built so far (the
    holdout's, which every draw is scored on, and the first replicate's) and one re-run
    holdout member match; a mismatch stops the run (UsageError) before any search spends
    compute. An import taken by an earlier invocation is dropped and taken again when the spec
    no longer imports that defense (it may now be searched here) or names another file, or
    the file changed."""
    from d3tune.search import imported_draws

    current = {i.defense: i for i in spec.imported}
    for d, entry in list(state["defenses"].items()):
        if entry.get("imported") and (d not in current
                                      or entry.get("file_sha256") != current[d].sha256
                                      or entry.get("imported") != current[d].path):
            log.info("leaderboard: %s's earlier import no longer matches the spec; dropped", d)
            del state["defenses"][d]
    write_json(path, state, indent=1, default=str)
    holdout = [m.id for m in spec.searches[0].holdout]
    for imp in spec.imported:
        if state["defenses"].get(imp.defense, {}).get("done"):
            continue
        shared = imported_draws.check_models(imp, _our_models(spec), imp.where, holdout)
        spot = imported_draws.spot_check(imp, imp.where)
        log.info("leaderboard: %s's draws imported from %s (%d models identical; %s on %s "
                 "re-run: DER %.4f as recorded)", imp.defense, imp.path, shared, spot["row"],
                 spot["member"], spot["der"])
        # the commits the replicates ran at, where recorded (the file's provenance names the
        # commit that wrote the report, which a resume may have moved)
        commits = sorted({str(s["git_commit"]) for s in imp.summaries if s.get("git_commit")})
        state["defenses"][imp.defense] = {
            "done": True, "imported": imp.path, "file_sha256": imp.sha256,
            "replicates": imp.summaries, "models_checked": shared, "spot_check": spot,
            "git_commits": commits}
        write_json(path, state, indent=1, default=str)


def check_imports_again(spec: LeaderboardSpec, state: dict[str, Any], path: Path) -> None:
    """Before the report, once every replicate has run: the whole leaderboard used exactly
    the members each import used, with identical models (later replicates' too); UsageError
    otherwise (the searches' state is kept)."""
    from d3tune.search import imported_draws

    if not spec.imported:
        return
    ours = _our_models(spec)
    holdout = [m.id for m in spec.searches[0].holdout]
    for imp in spec.imported:
        entry = state["defenses"].get(imp.defense)
        if entry and entry.get("imported"):
            entry["models_checked"] = imported_draws.check_models(imp, ours, imp.where,
                                                                  holdout, complete=True)
    write_json(path, state, indent=1, default=str)


@contextmanager
def _failed_on_refusal(client: Any, parent: str) -> Iterator[None]:
    """A refused import ends the leaderboard's parent run FAILED, not RUNNING; the state is
    kept, so ``--resume`` (with the spec mended) starts from there."""
    try:
        yield
    except UsageError:
        client.set_terminated(parent, "FAILED")
        raise


def run_defense(spec: LeaderboardSpec, defense: str, parent: str, console: Console) -> Any:
    """One defense's robust search, nested under the leaderboard's parent run; resumed when an
    earlier invocation had started it."""
    from d3tune.search.robust_driver import robust_search

    from d3tune.search.replicate_driver import STATE_FILE as REPLICATES_STATE
    from d3tune.search.replicate_driver import run_replicated

    search = spec.search_of(defense)
    out = spec.state_dir / "tuned" / f"{defense}.yaml"
    tags = {"mlflow.parentRunId": parent, "d3tune.leaderboard": spec.name}
    if search.replicates > 1:
        resume = (search.paths.state_dir / REPLICATES_STATE).exists()
        console.rule(f"{spec.name}: {defense} ({'resumed' if resume else 'new'}, "
                     f"{search.replicates} replicated robust searches, budget {search.budget})")
        return run_replicated(search, resume=resume, out=out, console=console,
                              parent_tags=tags)
    resume = search.paths.state_dir.exists()
    console.rule(f"{spec.name}: {defense} ({'resumed' if resume else 'new'} robust search, "
                 f"budget {search.budget})")
    return robust_search(search, resume=resume, out=out, console=console, parent_tags=tags)


@dataclass
class LeaderboardOutcome:
    """What a leaderboard returns: the table (one row per defense, read back from MLflow), the
    per-member spread, its MLflow parent and report folder, and for replicated leaderboards
    P(A > B) per pair and each defense's procedure."""
    spec: LeaderboardSpec
    table: pd.DataFrame  # one row per defense, read back from MLflow (read_back)
    members: pd.DataFrame  # one row per (defense, row, holdout member): the per-member spread
    parent_run_id: str | None
    seconds: float  # wall time of this invocation
    out_dir: Path
    # replicated leaderboards: P(A > B) per pair, and (defense, row) -> the procedure's figures
    comparisons: list[Any] = field(default_factory=list)
    procedures: dict[tuple[str, str], Any] = field(default_factory=dict)



def run_leaderboard(spec: LeaderboardSpec, *, resume: bool = False, address: str | None = None,
                    console: Console | None = None) -> LeaderboardOutcome:
    """Models once -> one robust search per defense (skipping finished ones) -> table from
    MLflow, plot, YAMLs. Raises UsageError for an existing leaderboard without --resume."""
    import ray
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from d3tune.reports.leaderboard_report import parent_metrics, print_report, write_report

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    spec.check_imports()  # against the protocol as the command line left it
    clock = time.monotonic()
    state_dir = spec.state_dir
    path = state_dir / STATE_FILE
    check_resume(path.exists() if resume else state_dir.exists(), resume, state_dir,
                 "leaderboard", spec.name)
    state_dir.mkdir(parents=True, exist_ok=True)
    state = _load(path)
    write_json(path, state, indent=1)
    uri = tracking.tracking_uri()
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, spec.experiment, uri)
    parent = _parent(client, exp_id, spec, state, path)
    started = tuner.init_ray(address, input_paths(spec.searches[0]))
    try:
        if state["population_seconds"] is None:
            state["population_seconds"] = build_models(spec, state_dir)
            write_json(path, state, indent=1)
            client.log_metric(parent, "population_seconds", state["population_seconds"])
        with _failed_on_refusal(client, parent):
            take_imports(spec, state, path)
        for defense in spec.defenses:
            if state["defenses"].get(defense, {}).get("done"):  # (imports dropped above)
                log.info("leaderboard: %s finished earlier; not re-run", defense)
                continue
            t = time.monotonic()
            outcome = run_defense(spec, defense, parent, console)
            if spec.replicates > 1:
                state["defenses"][defense] = {"done": True, "replicated_run":
                                              outcome.parent_run_id,
                                              "replicates": outcome.summaries}
                write_json(path, state, indent=1, default=str)
                continue
            seconds = _member_seconds(outcome.spec.paths.state_dir)
            chosen = outcome.chosen["label"] if outcome.chosen is not None else "none"
            rid = outcome.parent_run_id
            if rid is not None:
                metrics = [Metric(f"seconds_per_member.{label}", s, 0, 0)
                           for label, s in seconds.items()]
                metrics.append(Metric("wall_seconds_last_invocation", time.monotonic() - t, 0, 0))
                client.log_batch(rid, metrics=metrics, tags=[RunTag("d3tune.chosen", chosen)])
            state["defenses"][defense] = {"done": True, "robust_run": rid, "chosen": chosen,
                                          "yaml": str(outcome.yaml_path or "")}
            write_json(path, state, indent=1)
    finally:
        if started:
            ray.shutdown()
    with _failed_on_refusal(client, parent):
        check_imports_again(spec, state, path)
    report = write_report(spec, client, parent, state)
    for path in sorted(report.out.iterdir()):
        client.log_artifact(parent, str(path), "report")
    tuned = spec.state_dir / "tuned"
    for path in sorted(tuned.glob("*.yaml")) if tuned.exists() else []:
        client.log_artifact(parent, str(path), "tuned")
    client.log_batch(parent, metrics=[Metric(k, v, 0, 0)
                                      for k, v in parent_metrics(report).items()])
    client.set_terminated(parent, "FINISHED")
    seconds = time.monotonic() - clock
    print_report(spec, report, tuned, seconds, parent, exp_id, console)
    replicated = report.replicated
    return LeaderboardOutcome(spec, report.table, report.members, parent, seconds, report.out,
                              replicated.comparisons if replicated is not None else [],
                              replicated.procedures if replicated is not None else {})


__all__ = ["LeaderboardOutcome", "run_leaderboard", "build_models", "STATE_FILE"]
