"""The robust search's trial: one setting evaluated on every member, in the searcher's order.

A plain function (``run_members``) that Tune, Ray tasks and tests all call; the Tune trainable
(``population_trainable``) reports after each member with a tiny checkpoint of the rows, so
exact pruning (``robust_pruning``) can stop a setting there and a retried trial resumes after
its last finished member. Runs on Ray workers, or in-process in tests.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from d3tune.runstate import FINAL, read_restored, trial_overrides
from d3tune.search.robust_rules import worst_and_drop
from d3tune.specs.robust_spec import Member, Reference, RobustSpec, member_config

ORDER_KEY = "__order"  # the member order the searcher put into a trial's config
ROWS_FILE = "members.json"  # a trial's checkpoint: the member rows done so far
MEMBER_METRICS = ("der", "acc_drop", "acc_after", "asr_after", "ra_after", "seconds",
                  "cpu_seconds")
# ("seconds": wall time of one member evaluation; a leaderboard sums them into its compute)


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
                threads: int = 1,
                befores: Mapping[str, Mapping[str, float]] | None = None
                ) -> list[dict[str, Any]]:
    """Evaluate one setting on members in turn (models from the cache); ``on_member`` sees the
    rows so far after each one. Rows in ``done`` (a retried trial's checkpoint) are kept.
    With ``spec.member_batch`` > 1, runs of consecutive members that can train side by side go
    as one batched computation (d3tune/batched.py), then report one by one: pruning decides on
    the same rows in the same order, a group at a time. ``befores``: member id -> the
    population phase's before-figures (``population_befores``), not measured again."""
    import torch

    from d3tune.cache import ModelCache
    from d3tune.data import load_dataset
    from d3tune.trial import batchable, run_trial, run_trials_batched

    torch.set_num_threads(max(1, threads))
    cache = ModelCache(spec.cache_dir)
    rows = [dict(r) for r in done]
    seen = {r["member"] for r in rows}
    datasets: dict[tuple[Any, Any], Any] = {}
    groups: list[list[tuple[Member, Any]]] = []
    for member in (m for m in members if m.id not in seen):
        cfg = member_config(spec, member, setting, reference)
        if (groups and len(groups[-1]) < spec.member_batch
                and batchable(groups[-1][0][1], cfg)):
            groups[-1].append((member, cfg))
        else:
            groups.append([(member, cfg)])
    for group in groups:
        cfg = group[0][1]
        where = (cfg.data.name, cfg.data.data_dir, cfg.data.train_size)
        if where not in datasets:
            datasets[where] = load_dataset(*where)
        start, cpu = time.perf_counter(), time.process_time()
        if len(group) > 1:
            results = run_trials_batched([c for _, c in group], cache=cache, data=datasets[where])
        else:
            results = [run_trial(cfg, cache=cache, data=datasets[where],
                                 known_before=(befores or {}).get(group[0][0].id))]
        # cpu_seconds: what the member cost the machine (this process's CPU time), whatever
        # else ran beside it; seconds: its wall clock, which a loaded machine stretches. A
        # batched group's cost is shared equally by its members.
        wall, used = time.perf_counter() - start, time.process_time() - cpu
        for (member, _), res in zip(group, results):
            m = res.metrics
            rows.append({"member": member.id, "seed": member.seed, **m,
                         "acc_drop": m["acc_before"] - m["acc_after"], "cache_hit": res.cache_hit,
                         "seconds": wall / len(group), "cpu_seconds": used / len(group),
                         "threads": threads, "member_batch": len(group)})
            if on_member is not None:
                on_member(rows)
    return rows


def population_befores(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Member id -> its backdoored model's ACC / ASR / RA before any defense, from the
    population phase's rows (``member_before``): what every setting's evaluation of that member
    would measure again, on the same sets with the same model and thread count."""
    return {str(r["member"]): {k: float(r[f"{k}_before"]) for k in ("acc", "asr", "ra")}
            for r in rows if all(f"{k}_before" in r for k in ("acc", "asr", "ra"))}


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
                         members: tuple[Member, ...], threads: int,
                         befores: Mapping[str, Mapping[str, float]] | None = None) -> None:
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

    run_members(spec, ordered, setting_of(config), done=done, on_member=report, threads=threads,
                befores=befores)


def complete(result: Mapping[str, Any] | None) -> bool:
    """Whether a trial's result covers every member (a pruned or cut trial does not)."""
    return bool(result) and result.get("members_done") == result.get("members_total") \
        and "worst_der" in result
