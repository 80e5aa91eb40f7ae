"""A replicated defense's draws carried from one leaderboard run into another, paired only
where they provably are (the file and its protocol check: ``d3tune.specs.draws_file``).

Why: P(D3 > X) is paired over (replicate, holdout seed) draws that share backdoored models. On
a small machine a replicated leaderboard does not fit one sitting, and re-running D3 beside
every baseline doubles each sitting for draws that are reproducible anyway. A finished
leaderboard therefore writes ``draws_<defense>.json`` per replicated defense (its replicates'
summaries, the protocol it ran under, the SHA-256 of every model it used, one holdout member's
figures per replicate), and a later spec may name it under ``imported_draws``. The import is
refused, with the field named, unless:

1. the protocol is the one this spec would run the defense under (population, holdout, space,
   budget, ACC budget, top_k, seeds, threads, replicates, ...);
2. every model both runs use has the same cache key and the same weights (SHA-256), checked
   when this run builds them, so "paired" means the same backdoored models;
3. one recorded holdout member evaluation, re-run by this code, gives the same figures: the
   defense's code has not changed what it computes.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from d3tune.errors import UsageError
from d3tune.runstate import write_json
from d3tune.specs.draws_file import FORMAT, KIND, ImportedDraws, draws_file, protocol
from d3tune.specs.robust_spec import Member, Reference, RobustSpec, replicate_specs

log = logging.getLogger(__name__)

SPOT_FIGURES = ("der", "acc_after", "asr_after")


# ---------------------------------------------------------------------------------------------
# Models


def population_files(state_dir: Path, searches: Sequence[RobustSpec]) -> list[Path]:
    """Where a leaderboard's models are named: its up-front population (holdout and first
    replicate: ``state_dir``) and each replicate's population phase, for ``searches``."""
    from d3tune.search.robust_driver import POPULATION_FILE

    return [state_dir / POPULATION_FILE, *(r.paths.state_dir / POPULATION_FILE
                                           for s in searches for r in replicate_specs(s))]


def recorded_models(state_files: Sequence[Path]) -> dict[str, str]:
    """Member id -> cache key, from population files (``population.json``: the rows the
    population phase wrote, each naming the model it built or loaded)."""
    out: dict[str, str] = {}
    for path in state_files:
        if path.exists():
            for member, row in json.loads(path.read_text()).items():
                if row.get("cache_key"):
                    out[str(member)] = str(row["cache_key"])
    return out


def fingerprints(keys: Mapping[str, str], cache_dir: str | None) -> dict[str, dict[str, Any]]:
    """Member id -> {cache key, SHA-256 of the weights}, for every member: the SHA-256 is
    None where the cache holds no entry (a BackdoorBench record's model is not cached; its
    key is already a digest of the record's content)."""
    from d3tune.cache import ModelCache

    cache = ModelCache(cache_dir)
    return {member: {"cache_key": key, "sha256": cache.checksum(key)}
            for member, key in sorted(keys.items())}


def check_models(imported: ImportedDraws, ours: Mapping[str, Mapping[str, Any]], where: str,
                 required: Sequence[str], complete: bool = False) -> int:
    """How many models the import shares with this run, all identical. UsageError naming
    the members when a model differs (key or weights), when a ``required`` member (the
    holdout's) is missing on either side, or (``complete``: once every replicate has run)
    when the two runs did not use the same members at all: "paired" must mean the same
    backdoored models, never "nothing was compared"."""
    missing = sorted(m for m in required if m not in ours or m not in imported.models)
    if complete:
        missing = sorted(set(missing) | (set(ours) ^ set(imported.models)))
    if missing:
        raise UsageError(f"{where}: the models of {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} are not recorded by both this "
                         f"run and {imported.path}, so its draws cannot be shown to pair with "
                         "this run's; run the defense in this leaderboard instead")
    shared = sorted(set(ours) & set(imported.models))
    differ = [m for m in shared if dict(ours[m]) != dict(imported.models[m])]
    if differ:
        raise UsageError(f"{where}: the backdoored models of {', '.join(differ[:4])}"
                         f"{' ...' if len(differ) > 4 else ''} differ from the ones "
                         f"{imported.path} was run on (cache key or weights): its draws would "
                         "not be paired; run the defense in this leaderboard instead")
    return len(shared)


# ---------------------------------------------------------------------------------------------
# The file


def _spot_rows(spec: RobustSpec, summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per replicate, the first holdout member's row of the row its tuning delivered, with
    what it takes to run it again (the Optuna params, or the reference it is)."""
    from d3tune.reports.replicate_report import delivered_row
    from d3tune.search.robust_driver import HOLDOUT_FILE

    out = []
    for rspec, s in zip(replicate_specs(spec), summaries):
        label = delivered_row(s)
        path = rspec.paths.state_dir / HOLDOUT_FILE
        rows = json.loads(path.read_text()).get(label, []) if label and path.exists() else []
        if not rows:
            continue
        params = s.get("params") if label == s.get("chosen") else None
        if label.startswith("ref-"):
            run = {"reference": label[len("ref-"):], "params": {}}
        elif params is not None:
            run = {"reference": None, "params": params}
        elif all(d.path.startswith("defense.") and not d.only_for for d in spec.space):
            # a summary from before params were kept: the chosen row's defense fields stand
            # for its params exactly when the space holds defense fields only
            run = {"reference": None, "params": dict(s.get("setting") or {})}
        else:
            continue
        # a row that ran alone re-runs bit for bit; one trained in a batch of members only to
        # float tolerance (robust_trainable.run_members)
        r = min(rows, key=lambda r: (int(r.get("member_batch", 1)) != 1, str(r["member"])))
        out.append({"replicate": int(s["replicate"]), "row": label, "member": r["member"],
                    "member_batch": int(r.get("member_batch", 1)),
                    **run, **{k: float(r[k]) for k in SPOT_FIGURES}})
    return out


def export(spec: RobustSpec, summaries: Sequence[Mapping[str, Any]], population_files:
           Sequence[Path], out: Path) -> Path:
    """Write a replicated defense's draws for import by a later leaderboard (see module
    docstring), its models named by ``population_files`` (``population_files(...)``);
    returns the file."""
    from d3tune.search.replicate_driver import provenance

    keys = recorded_models(population_files)
    path = draws_file(out, spec.defense)
    write_json(path, {"format": FORMAT, "kind": KIND, "defense": spec.defense,
                      "protocol": protocol(spec), "summaries": list(summaries),
                      "models": fingerprints(keys, spec.cache_dir),
                      "spot": _spot_rows(spec, summaries),
                      "provenance": provenance(spec, summaries)}, indent=1, default=str)
    return path


def spot_task(spec: RobustSpec, member: Member, params: dict[str, Any],
              reference: Reference | None, threads: int) -> dict[str, Any]:
    """A Ray task: one recorded holdout member evaluation, run again."""
    from d3tune.search.robust_trainable import run_members

    return run_members(spec, [member], params, reference, threads=threads)[0]


# A row that ran alone re-runs to the last bit (tested); one trained in a batch of members is
# re-run alone, which agrees to float tolerance: the bound tests/test_batched.py holds it to
EXACT, BATCHED = 1e-6, 0.01


def _on_ray(spec: RobustSpec, member: Member, params: dict[str, Any],
            reference: Reference | None) -> dict[str, Any]:
    import ray

    from d3tune.search.robust_driver import _remote, _threads

    return ray.get(_remote(spot_task, spec).remote(spec, member, params, reference,
                                                   _threads(spec)))


def spot_check(imported: ImportedDraws, where: str,
               run: Callable[..., dict[str, Any]] = _on_ray) -> dict[str, Any]:
    """Re-run replicate 0's recorded holdout member (``run``: on Ray, as the confirmation ran
    it) and compare its figures; UsageError when they differ, which means the defense's code
    (or the machine's arithmetic) no longer computes what the file holds. Returns what was
    checked."""
    spec = imported.spec
    if not imported.spot:
        raise UsageError(f"{where}: {imported.path} records no holdout member to re-run, so "
                         "its draws cannot be checked against this code")
    spot = imported.spot[0]
    members = {m.id: m for m in spec.holdout}
    if spot["member"] not in members:
        raise UsageError(f"{where}: {imported.path} names holdout member {spot['member']!r}, "
                         "which this spec does not have")
    refs = {r.name: r for r in spec.references}
    ref = refs.get(spot["reference"]) if spot.get("reference") else None
    if spot.get("reference") and ref is None:
        raise UsageError(f"{where}: {imported.path} re-runs reference {spot['reference']!r}, "
                         "which this spec does not have")
    params = dict(ref.setting) if ref is not None else dict(spot["params"])
    rspec = replicate_specs(spec)[int(spot["replicate"])]
    row = run(rspec, members[spot["member"]], params, ref)
    tol = EXACT if int(spot.get("member_batch", 1)) == 1 else BATCHED
    off = {k: (float(row[k]), float(spot[k])) for k in SPOT_FIGURES
           if not math.isclose(float(row[k]), float(spot[k]), rel_tol=0.0, abs_tol=tol)}
    if off:
        shown = "; ".join(f"{k} {a:.6f} here, {b:.6f} in the file" for k, (a, b) in off.items())
        raise UsageError(f"{where}: re-running replicate {spot['replicate']}'s row "
                         f"{spot['row']} on {spot['member']} gives other figures ({shown}): "
                         "this code computes something else than the run that wrote "
                         f"{imported.path}; run the defense in this leaderboard instead")
    return {"replicate": spot["replicate"], "row": spot["row"], "member": spot["member"],
            "tolerance": tol, **{k: float(row[k]) for k in SPOT_FIGURES}}


__all__ = ["export", "check_models", "spot_check", "fingerprints", "recorded_models",
           "population_files", "spot_task"]
