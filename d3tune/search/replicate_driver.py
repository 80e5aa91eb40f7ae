"""Replicated robust searches: the same search run K times, each with its own sampler seed and
its own population seeds, all confirmed on the same holdout seeds.

Why: one search seed, one population seed set and one holdout seed make one draw of the
procedure "search, then confirm". Rerunning it moved a tuned row by as much as the gaps between
defenses, so a single draw cannot tell a robust default from a lucky one. Following Bouthillier
et al. ("Accounting for Variance in Machine Learning Benchmarks", MLSys 2021), every source of
variation a user would meet is re-drawn per replicate: the search's sampler, the backdoored
models (their attack seeds), the defender's clean subset, initialisation and data order. What a
replicate chooses never reaches another. A *draw* is one (replicate, holdout seed): the chosen
setting's worst case over the holdout members of that seed. The procedure's figure is the mean
over draws, with a percentile bootstrap interval (``d3tune.stats``).

State: ``STORAGE/NAME.d3tune/replicates.json`` holds each finished replicate's summary, so
``--resume`` re-runs only the replicates (and inside them, the settings) that did not finish.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from d3tune.reports.replicate_report import (
    Procedure,
    adoption_pick,
    draw_table,
    draws,
    procedure,
)
from d3tune.runstate import check_resume, write_json
from d3tune.specs.robust_spec import RobustSpec

log = logging.getLogger(__name__)

STATE_FILE = "replicates.json"
DRAWS_FILE = "replicates.csv"


def summarize(outcome: Any, replicate: int) -> dict[str, Any]:
    """What the procedure keeps of one replicate (a finished ``RobustOutcome``): its chosen
    setting and search figure, every confirmed row's draws, and the CPU seconds its trial
    processes spent, search and holdout apart."""
    spec: RobustSpec = outcome.spec
    from d3tune.search.robust_driver import HOLDOUT_FILE

    path = spec.paths.state_dir / HOLDOUT_FILE
    done: dict[str, list[dict[str, Any]]] = json.loads(path.read_text()) if path.exists() else {}
    excluded = set(outcome.population.loc[outcome.population["excluded"], "member"]) \
        if not outcome.population.empty else set()
    rows = {label: [r for r in rs if r["member"] not in excluded] for label, rs in done.items()}
    chosen = outcome.chosen
    search = outcome.search
    cpu = lambda rs: sum(float(r.get("cpu_seconds", r.get("seconds", 0.0))) for r in rs)  # noqa: E731
    return {
        "replicate": replicate, "name": spec.name, "run": outcome.parent_run_id,
        "search_seed": spec.search_seed,
        "population_seeds": sorted({m.seed for m in spec.members}),
        "holdout_seeds": sorted({m.seed for m in spec.holdout}),
        "chosen": chosen["label"] if chosen is not None else None,
        "setting": dict(chosen["shown"]) if chosen is not None else None,
        # the chosen row's Optuna params: what it takes to run it again (imported_draws)
        "params": dict(chosen["setting"]) if chosen is not None else None,
        "git_commit": git_commit(),  # the code this replicate ran (a resume may change it)
        "search_worst_der": float(chosen["search_worst_der"]) if chosen is not None else None,
        "holdout_admissible": bool(chosen["holdout_admissible"]) if chosen is not None else None,
        "draws": {label: draws(rs) for label, rs in rows.items() if rs},
        "holdout_worst_der": {label: min(float(r["der"]) for r in rs)
                              for label, rs in rows.items() if rs},
        "search_cpu_s": float(search["cpu_seconds"].sum()) if "cpu_seconds" in search else
        math.nan,
        "holdout_cpu_s": {label: cpu(rs) for label, rs in rows.items()},
    }


def load_state(path: Path) -> dict[str, Any]:
    """The replicated search's state file (replicate count, finished summaries, parent run id);
    a fresh state when none exists."""
    return json.loads(path.read_text()) if path.exists() else {"replicates": None, "done": {},
                                                                "parent": None}


def save_state(path: Path, state: Mapping[str, Any]) -> None:
    """Write the state atomically."""
    write_json(path, dict(state), indent=1, default=str)


@dataclass
class ReplicatedOutcome:
    """What a replicated search returns: each replicate's summary, the procedure's figures
    (chosen rows and each reference), the replicate ``d3tune adopt`` takes, and where its
    files and MLflow parent are."""
    spec: RobustSpec
    summaries: list[dict[str, Any]]  # one per replicate (``summarize``)
    procedure: Procedure  # the chosen rows' draws
    references: dict[str, Procedure]  # each reference row's draws (e.g. ref-default)
    adopt: Mapping[str, Any] | None  # the replicate whose setting ``d3tune adopt`` takes
    parent_run_id: str | None
    csv_path: Path
    report_path: Path


def provenance(spec: RobustSpec, summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What a reader needs to rerun the procedure: threads, protocol knobs, every replicate's
    search and population seeds, the holdout seeds, and the software that ran it."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        d3tune_version = version("d3tune")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree, not installed
        d3tune_version = None
    return {"threads": max(1, int(spec.resources.cpu)), "member_batch": spec.member_batch,
            "split_test": spec.split_test,
            "budget": spec.budget, "top_k": spec.top_k, "max_acc_drop": spec.max_acc_drop,
            "replicates": [{"replicate": s["replicate"], "search_seed": s["search_seed"],
                            "population_seeds": s["population_seeds"]} for s in summaries],
            "holdout_seeds": sorted({m.seed for m in spec.holdout}),
            "d3tune_version": d3tune_version, "git_commit": git_commit(),
            "torch_version": torch.__version__}


def git_commit() -> str | None:
    """The commit d3tune runs from, when it runs from a git checkout (else None)."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _parent(client: Any, spec: RobustSpec, state: dict[str, Any], path: Path,
            extra_tags: Mapping[str, str]) -> str:
    """The replicated search's MLflow parent run (each replicate's robust run nests under it),
    created once; its id is kept in the state."""
    from mlflow.entities import Param

    from d3tune import tracking
    from d3tune.specs.robust_spec import datasets_of

    if state.get("parent"):
        return state["parent"]
    exp_id = tracking.experiment_id(client, spec.experiment, tracking.tracking_uri())
    run = client.create_run(exp_id, run_name=spec.name, tags={
        "d3tune.kind": "robust-replicated", "d3tune.defense": spec.defense,
        "d3tune.study": spec.name, "d3tune.spec": spec.source,
        "d3tune.datasets": ",".join(datasets_of(spec)),
        "d3tune.holdout_seeds": ",".join(str(s) for s in sorted({m.seed for m in spec.holdout})),
        **extra_tags})
    state["parent"] = run.info.run_id
    save_state(path, state)
    params = {"replicates": spec.replicates, "budget": spec.budget, "top_k": spec.top_k,
              "max_acc_drop": spec.max_acc_drop, "split_test": spec.split_test,
              "runtime.threads": max(1, int(spec.resources.cpu)),
              "runtime.member_batch": spec.member_batch, "adopt_tolerance": spec.adopt_tolerance, "defense": spec.defense}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return state["parent"]


def run_replicated(spec: RobustSpec, *, resume: bool = False, address: str | None = None,
                   out: str | Path | None = None, console: Any = None,
                   parent_tags: Mapping[str, str] | None = None) -> ReplicatedOutcome:
    """K robust searches (``replicate_specs``), each nested under one MLflow parent, then the
    procedure's figures over the K x M draws. Finished replicates are never re-run; an
    interrupted one resumes inside. Raises UsageError for a replicated search that exists
    without ``--resume`` (or is missing with it), or a different replicate count."""
    import sys

    import ray
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from d3tune import tracking
    from d3tune.errors import UsageError
    from d3tune.search import tuner
    from d3tune.search.robust_driver import robust_search
    from d3tune.specs.inputs import input_paths
    from d3tune.specs.robust_spec import replicate_specs

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    state_dir = spec.paths.state_dir
    path = state_dir / STATE_FILE
    check_resume(path.exists(), resume, state_dir, "replicated search", spec.name)
    state_dir.mkdir(parents=True, exist_ok=True)
    state = load_state(path)
    if state["replicates"] not in (None, spec.replicates):
        raise UsageError(f"--replicates: the search at {state_dir} was started with "
                         f"{state['replicates']} replicates, not {spec.replicates}")
    state["replicates"] = spec.replicates
    save_state(path, state)
    client = MlflowClient(tracking.tracking_uri())
    parent = _parent(client, spec, state, path, dict(parent_tags or {}))
    started = tuner.init_ray(address, input_paths(spec))
    summaries: list[dict[str, Any]] = []
    try:
        for rspec in replicate_specs(spec):
            key = str(rspec.replicate)
            if key in state["done"]:
                log.info("%s: replicate %s finished earlier; not re-run", spec.name, key)
                summaries.append(state["done"][key])
                continue
            console.rule(f"{spec.name}: replicate {rspec.replicate + 1} of {spec.replicates} "
                         f"(search seed {rspec.search_seed}, population seeds "
                         f"{sorted({m.seed for m in rspec.members})})")
            outcome = robust_search(
                rspec, resume=rspec.paths.state_dir.exists(), console=console,
                out=state_dir / "replicates" / f"{rspec.name}.yaml",
                parent_tags={"mlflow.parentRunId": parent, "d3tune.replicate": key,
                             "d3tune.replicated": spec.name})
            state["done"][key] = summarize(outcome, rspec.replicate)
            save_state(path, state)
            summaries.append(state["done"][key])
    finally:
        if started:
            ray.shutdown()
    return _finish(spec, summaries, client, parent, state_dir, out, console)


def reference_labels(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The reference rows every replicate confirmed (``ref-NAME``), in name order."""
    labels = [set(k for k in s["draws"] if k.startswith("ref-")) for s in summaries]
    return sorted(set.intersection(*labels)) if labels else []


def _finish(spec: RobustSpec, summaries: list[dict[str, Any]], client: Any, parent: str,
            state_dir: Path, out: str | Path | None, console: Any) -> ReplicatedOutcome:
    from mlflow.entities import Metric, RunTag

    from d3tune.reports.replicate_report import print_procedure, write_replicated_report
    from d3tune.specs.robust_spec import defaults_yaml
    from d3tune.yamlio import dump_yaml

    proc = procedure(summaries)
    refs = {label: procedure(summaries, label) for label in reference_labels(summaries)}
    pick = adoption_pick(summaries)
    tables = [draw_table(summaries)] + [draw_table(summaries, label) for label in refs]
    csv_path = state_dir / DRAWS_FILE
    pd.concat(tables, ignore_index=True).to_csv(csv_path, index=False)
    yaml_path = None
    if pick is not None:
        yaml_path = Path(out) if out else Path("d3tune_results") / "robust" / f"{spec.name}.yaml"
        yaml_path.parent.mkdir(parents=True, exist_ok=True)
        dump_yaml(defaults_yaml(spec, pick["setting"]), yaml_path)
    outcome = ReplicatedOutcome(spec, summaries, proc, refs, pick, parent, csv_path,
                                state_dir / "replicates.md")
    prov = provenance(spec, summaries)
    write_replicated_report(outcome, prov)
    prov_path = state_dir / "provenance.json"
    write_json(prov_path, prov, indent=1, default=str)
    metrics = {"expected_worst_der": proc.expected_worst_der, "expected_worst_der_low": proc.low,
               "expected_worst_der_high": proc.high, "draws": proc.draws,
               "holdout_spread": proc.holdout_spread, "mean_acc_drop": proc.mean_acc_drop,
               "search_cpu_s": proc.search_cpu_s, "holdout_cpu_s": proc.holdout_cpu_s}
    for label, ref in refs.items():
        metrics.update({f"{label}.expected_worst_der": ref.expected_worst_der,
                        f"{label}.expected_worst_der_low": ref.low,
                        f"{label}.expected_worst_der_high": ref.high})
    tags = [RunTag("d3tune.interval", proc.interval),
            RunTag("d3tune.adopt_replicate", str(pick["replicate"]) if pick else "none")]
    if pick is not None:
        metrics.update({"adopt.search_worst_der": pick["search_worst_der"],
                        "adopt.holdout_worst_der": pick["holdout_worst_der"][pick["chosen"]]})
    client.log_batch(parent, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()
                                      if v is not None and not _nan(v)], tags=tags)
    for artifact in (csv_path, outcome.report_path, prov_path):
        client.log_artifact(parent, str(artifact), "replicates")
    if yaml_path is not None:
        client.log_artifact(parent, str(yaml_path), "defaults")
    client.set_terminated(parent, "FINISHED")
    print_procedure(outcome, console)
    return outcome


def _nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


__all__ = ["summarize", "run_replicated", "ReplicatedOutcome", "provenance", "STATE_FILE",
           "DRAWS_FILE"]
