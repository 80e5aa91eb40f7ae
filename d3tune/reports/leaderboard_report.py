"""What a leaderboard shows, computed from MLflow read-back only: the table (default vs tuned
per defense, on the holdout seeds), the plot (per-member spread), the console output.

Why read back instead of using the in-memory outcomes: the table must be the same whether the
leaderboard ran in one go or across several ``--resume`` invocations (an earlier invocation's
outcomes are gone), and anybody with the MLflow store can rebuild it (``read_back``).
Figures are recomputed from the per-member metrics of the holdout runs (``der.<member>``,
``acc_drop.<member>``, ``seconds.<member>``), not from stored aggregates.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from d3tune import tracking
from d3tune.numbers import fixed
from d3tune.reports.html import markdown_page
from d3tune.specs.leaderboard_spec import DEFAULT_REFERENCE, LeaderboardSpec

log = logging.getLogger(__name__)

DEFAULT_LABEL = f"ref-{DEFAULT_REFERENCE}"
COLUMNS = ("defense", "default_worst_der", "default_acc_drop", "default_ok", "tuned_worst_der",
           "tuned_acc_drop", "tuned_ok", "gain", "default_s_per_member", "tuned_s_per_member",
           "trials", "knobs", "compute_s", "search_cpu_s", "holdout_cpu_s", "tuned_label",
           "chosen")



@dataclass
class LeaderboardReport:
    """A leaderboard's report as written: the table (one row per defense, read back from
    MLflow), the per-member spread, the folder of its files, and for replicated leaderboards
    the replicated section (P(A > B) per pair, each defense's procedure)."""
    table: pd.DataFrame
    members: pd.DataFrame
    out: Path
    replicated: Any = None


def _per_member(metrics: dict[str, float], key: str) -> dict[str, float]:
    return {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{key}.")}


def _figures(run: Any) -> dict[str, Any]:
    m = run.data.metrics
    ders, drops = _per_member(m, "der"), _per_member(m, "acc_drop")
    secs = _per_member(m, "seconds")
    return {"worst_der": min(ders.values()) if ders else math.nan,
            "acc_drop": sum(drops.values()) / len(drops) if drops else math.nan,
            "s_per_member": sum(secs.values()) / len(secs) if secs else math.nan, "ders": ders}


def _children(client: Any, exp_id: str, run_id: str) -> list[Any]:
    return list(client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                   max_results=5000))


def _robust_children(client: Any, exp_id: str, parent: str) -> list[Any]:
    """Each defense's robust search under a leaderboard; of a replicated one, replicate 0 (the
    classic default-vs-tuned table shows one search per defense; the replicated section shows
    all of them)."""
    out = []
    for run in _children(client, exp_id, parent):
        kind = run.data.tags.get("d3tune.kind")
        if kind == "robust":
            out.append(run)
        elif kind == "robust-replicated":
            out += [r for r in _children(client, exp_id, run.info.run_id)
                    if r.data.tags.get("d3tune.replicate") == "0"
                    and r.data.tags.get("d3tune.kind") == "robust"]
    return out


def _search_best(holdout: dict[str, Any]) -> str:
    """The label of the finalist the search ranked first ("none" without finalists). Runs
    written before the rank was tagged: the lowest trial number among finalists."""
    finals = {lb: r for lb, r in holdout.items()
              if r.data.tags.get("d3tune.row_kind", "finalist") == "finalist"
              and str(lb).startswith("trial-")}
    rank = lambda lb: (int(finals[lb].data.tags.get("d3tune.search_rank", 10**9)),  # noqa: E731
                       int(str(lb).removeprefix("trial-")))
    return min(finals, key=rank, default="none")


def read_back(client: Any, parent: str,
              defenses: Sequence[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, members): one row per defense, sorted by tuned holdout worst case (best first;
    rows whose tuned setting keeps the ACC budget before those that do not), and one row per
    (defense, default|tuned, holdout member) with its DER. The tuned row is the robust search's
    choice; when no finalist kept the budget on the holdout, its best finalist, flagged
    (``chosen`` False, ``tuned_ok`` False). ``defenses``: only these (a leaderboard resumed
    with a shorter ``defenses`` list, or one whose last search is unfinished, reports the
    finished ones it lists)."""
    exp_id = client.get_run(parent).info.experiment_id
    rows, members = [], []
    for search in _robust_children(client, exp_id, parent):
        tags = search.data.tags
        defense = tags["d3tune.defense"]
        if defenses is not None and defense not in defenses:
            continue
        budget = float(search.data.params.get("max_acc_drop", "nan"))
        chosen = tags.get("d3tune.chosen", "none")
        children = _children(client, exp_id, search.info.run_id)
        holdout = {r.data.tags.get("d3tune.label"): r for r in children
                   if r.data.tags.get("d3tune.phase") == "holdout"}
        figures = {label: _figures(r) for label, r in holdout.items()}
        tuned = chosen
        if tuned not in holdout:  # no finalist kept the ACC budget: show the search's
            tuned = _search_best(holdout)  # best finalist, flagged (never a holdout pick)
        trials = [r for r in children if r.data.tags.get("d3tune.phase") == "search"]
        compute = sum(v for r in children if "d3tune.shared_with" not in r.data.tags
                      for k, v in r.data.metrics.items() if k.startswith("seconds."))
        cpu = {phase: sum(v for r in children if r.data.tags.get("d3tune.phase") == phase
                          and "d3tune.shared_with" not in r.data.tags
                          for k, v in r.data.metrics.items() if k.startswith("cpu_seconds."))
               for phase in ("search", "holdout")}
        knobs = search.data.params.get("space_dims")  # logged by the robust search
        row: dict[str, Any] = {"defense": defense, "trials": len(trials),
                               "knobs": int(knobs) if knobs is not None else math.nan,
                               "compute_s": compute, "search_cpu_s": cpu["search"],
                               "holdout_cpu_s": cpu["holdout"],
                               "tuned_label": tuned, "chosen": chosen in holdout}
        for side, label in (("default", DEFAULT_LABEL), ("tuned", tuned)):
            f = figures.get(label, {"worst_der": math.nan, "acc_drop": math.nan,
                                    "s_per_member": math.nan, "ders": {}})
            row.update({f"{side}_worst_der": f["worst_der"], f"{side}_acc_drop": f["acc_drop"],
                        f"{side}_ok": bool(f["acc_drop"] <= budget + 1e-12),
                        f"{side}_s_per_member": f["s_per_member"]})
            members += [{"defense": defense, "row": side, "member": k, "der": v}
                        for k, v in sorted(f["ders"].items())]
        row["gain"] = row["tuned_worst_der"] - row["default_worst_der"]
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    if not table.empty:
        table = table.sort_values(["tuned_ok", "tuned_worst_der", "default_worst_der"],
                                  ascending=False, na_position="last").reset_index(drop=True)
    return table, pd.DataFrame(members, columns=["defense", "row", "member", "der"])


def progress(client: Any, parent: str, defenses: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per setting searched, per defense, in the order the search ran them: the
    member-seconds it spent, the running total, and the best complete within-budget search
    worst case so far (NaN until one exists). What "tuned as hard" looks like: whether each
    defense's search had levelled off, against trials and against compute."""
    exp_id = client.get_run(parent).info.experiment_id
    rows = []
    for search in _robust_children(client, exp_id, parent):
        defense = search.data.tags["d3tune.defense"]
        if defenses is not None and defense not in defenses:
            continue
        trials = [r for r in _children(client, exp_id, search.info.run_id)
                  if r.data.tags.get("d3tune.phase") == "search"]
        best, spent = math.nan, 0.0
        for i, r in enumerate(sorted(trials, key=lambda r: (r.info.start_time, r.info.run_id))):
            m = r.data.metrics
            cost = sum(v for k, v in m.items() if k.startswith("seconds."))
            spent += cost
            if r.data.tags.get("d3tune.admissible") == "true" and "worst_der" in m:
                best = m["worst_der"] if math.isnan(best) else max(best, m["worst_der"])
            rows.append({"defense": defense, "trial": i + 1, "seconds": cost,
                         "cum_seconds": spent, "best_so_far": best,
                         "pruned": r.data.tags.get("d3tune.pruned") == "true"})
    return pd.DataFrame(rows, columns=["defense", "trial", "seconds", "cum_seconds",
                                       "best_so_far", "pruned"])


def plot_progress(prog: pd.DataFrame, out: Path) -> Path:
    """Best-so-far search worst case per defense, against trials (left) and member-seconds of
    compute (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for defense, rows in prog.groupby("defense", sort=False):
        for ax, x in zip(axes, ("trial", "cum_seconds")):
            ax.step(rows[x], rows["best_so_far"], where="post", label=defense)
    axes[0].set_xlabel("settings searched (trials)")
    axes[1].set_xlabel("compute spent (member-seconds)")
    axes[0].set_ylabel("best search worst-case DER so far\n(complete, within the ACC budget)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Search progress per defense", fontsize=10)
    fig.tight_layout()
    path = out / "progress.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def threat_model(member: str) -> str:
    """A member id without its seed (``badnets_s3`` -> ``badnets``): the threat model it is one
    seed of, so a question like "who wins on BadNets?" reads off one column."""
    head, sep, seed = member.rpartition("_s")
    return head if sep and head and seed.isdigit() else member


def per_threat_model(table: pd.DataFrame, members: pd.DataFrame) -> pd.DataFrame:
    """Mean holdout DER per defense (in the table's order), row (default | tuned) and threat
    model: one row per (defense, row), one column per threat model."""
    if members.empty:
        return pd.DataFrame(columns=["defense", "row"])
    m = members.assign(threat_model=members["member"].map(threat_model))
    wide = m.pivot_table(index=["defense", "row"], columns="threat_model", values="der",
                         aggfunc="mean")
    order = [(d, r) for d in table["defense"] for r in ("default", "tuned") if (d, r) in wide.index]
    wide = wide.reindex(order).reset_index()
    wide.columns.name = None
    return wide


def _pts(v: Any, ok: bool = True) -> str:
    """Points of ACC drop; '!' marks a drop over the ACC budget."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" + ("" if ok else "!")


def _threat_model_lines(table: pd.DataFrame, per_model: pd.DataFrame) -> list[str]:
    models = [c for c in per_model.columns if c not in ("defense", "row")]
    if not models:
        return []
    by_row = per_model.set_index(["defense", "row"])
    lines = ["", "## Mean holdout DER per threat model (default / tuned)", "",
             "| defense | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for defense in table["defense"]:
        sides = [s for s in ("default", "tuned") if (defense, s) in by_row.index]
        cells = [" / ".join(fixed(by_row.loc[(defense, s), tm]) for s in sides) or "-"
                 for tm in models]
        lines.append(f"| {defense} | " + " | ".join(cells) + " |")
    return lines


def markdown(spec: LeaderboardSpec, table: pd.DataFrame, population_s: float | None,
             per_model: pd.DataFrame | None = None) -> str:
    """The table; with ``per_model`` (``per_threat_model``'s frame) the per-threat-model means."""
    first = spec.searches[0]
    lines = [f"# Leaderboard: {spec.name}", "",
             f"Population: {len(first.members)} members on seeds "
             f"{sorted({m.seed for m in first.members})}; holdout seeds "
             f"{sorted({m.seed for m in first.holdout})} (never seen by a search). "
             f"Budget {first.budget} settings per defense"
             + (f" and {first.compute_budget_s:.0f} member-seconds of compute (equal compute)"
                if first.compute_budget_s else "") + "; ACC budget "
             f"{first.max_acc_drop * 100:.1f} points (mean ACC drop); top_k {first.top_k}.",
             f"Backdoored models built once for all defenses: "
             f"{fixed(population_s, 0)} s.", "",
             "All figures are on the holdout seeds, read back from MLflow. *Tuned* is the robust "
             "search's choice: its rank-1 finalist, confirmed on the holdout (an ACC drop "
             "over the budget there is marked '!', never replaced by another finalist). "
             "'!' after an ACC drop: over the budget. Gain = tuned - default worst-case DER. "
             "Seconds per member: one member evaluation (model load, defense, evaluation). "
             "Compute: the sum of every member evaluation of the defense (search and holdout). "
             "Knobs: the dimensions of the defense's search space (equal trials are not equal "
             "search effort when the spaces differ).",
             "", "| # | defense | default worst DER | default ACC drop (pts) | tuned worst DER | "
             "tuned ACC drop (pts) | tuning gain | s/member default | s/member tuned | trials | "
             "knobs | compute (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in table.iterrows():
        lines.append(f"| {i + 1} | {r['defense']} | {fixed(r['default_worst_der'])} | "
                     f"{_pts(r['default_acc_drop'], r['default_ok'])} | "
                     f"{fixed(r['tuned_worst_der'])} | "
                     f"{_pts(r['tuned_acc_drop'], r['tuned_ok'])} | {fixed(r['gain'])} | "
                     f"{fixed(r['default_s_per_member'], 1)} | {fixed(r['tuned_s_per_member'], 1)} | "
                     f"{r['trials']} | {fixed(r['knobs'], 0)} | {fixed(r['compute_s'], 0)} |")
    if per_model is not None:
        lines += _threat_model_lines(table, per_model)
    return ("\n".join(lines) + "\n\n![leaderboard](leaderboard.png)\n\n"
            "Search progress (best worst case so far, against trials and against compute): "
            "![progress](progress.png)\n")


def plot(table: pd.DataFrame, members: pd.DataFrame, out: Path) -> Path:
    """Default vs tuned per defense: every holdout member's DER (the spread) and the worst case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 1.1 * len(table)), 4.2))
    for x, defense in enumerate(table["defense"]):
        for side, dx, color in (("default", -0.17, "tab:gray"), ("tuned", 0.17, "tab:blue")):
            ders = members[(members["defense"] == defense) & (members["row"] == side)]["der"]
            if ders.empty:
                continue
            ax.vlines(x + dx, ders.min(), ders.max(), color=color, alpha=0.5)
            ax.scatter([x + dx] * len(ders), ders, color=color, alpha=0.45, s=14)
            ax.scatter([x + dx], [ders.min()], color=color, marker="_", s=300, linewidths=2.5,
                       label=f"{side}: worst case" if x == 0 else None)
    ax.set_xticks(range(len(table)), list(table["defense"]))
    ax.set_ylabel("DER on the holdout members")
    ax.set_title("Default (gray) vs tuned (blue) on the holdout seeds\n"
                 "dots: members; bar: worst case", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = out / "leaderboard.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(spec: LeaderboardSpec, client: Any, parent: str,
                 state: dict[str, Any]) -> LeaderboardReport:
    """Table from MLflow, the per-member spread and per-threat-model means, plots, the replicated
    section, as Markdown, HTML and CSV files in the leaderboard's report folder. Reads MLflow,
    writes nothing there."""
    done = [d for d in spec.defenses if state["defenses"].get(d, {}).get("done")]
    table, members = read_back(client, parent, done)
    out = spec.state_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    per_model = per_threat_model(table, members)
    text = markdown(spec, table, state.get("population_seconds"), per_model)
    replicated = None
    if spec.replicates > 1:
        from d3tune.reports.replicate_report import replicated_leaderboard

        imported = [i.defense for i in spec.imported
                    if state["defenses"].get(i.defense, {}).get("done")]
        replicated = replicated_leaderboard(spec, state, done + imported, out)
        text += "\n" + "\n".join(replicated.lines + import_lines(spec, state)) + "\n"
        export_draws(spec, state, done, out)
    (out / "leaderboard.md").write_text(text)
    table.to_csv(out / "leaderboard.csv", index=False)
    members.to_csv(out / "members.csv", index=False)
    per_model.to_csv(out / "per_threat_model.csv", index=False)
    plot(table, members, out)
    prog = progress(client, parent, done)
    prog.to_csv(out / "progress.csv", index=False)
    if not prog.empty:
        plot_progress(prog, out)
    (out / "leaderboard.html").write_text(markdown_page(text, out, f"leaderboard {spec.name}"))
    return LeaderboardReport(table, members, out, replicated)


def import_lines(spec: LeaderboardSpec, state: dict[str, Any]) -> list[str]:
    """Where each imported defense's draws came from and what was checked before pairing."""
    lines = []
    for imp in spec.imported:
        entry = state["defenses"].get(imp.defense) or {}
        if not entry.get("imported"):
            continue
        spot = entry.get("spot_check") or {}
        commits = ", ".join(c[:10] for c in entry.get("git_commits") or [])
        lines += ["", f"{imp.defense}: draws imported from `{imp.path}`"
                  f"{f' (searched at commit {commits})' if commits else ''}, not searched "
                  f"here. The {entry.get('models_checked', 0)} backdoored models both runs used "
                  "are the same (cache keys and weights' SHA-256), and replicate "
                  f"{spot.get('replicate')}'s row {spot.get('row')} on {spot.get('member')}, "
                  f"re-run here, gave DER {fixed(spot.get('der', math.nan), 4)} as the file "
                  f"records (within {spot.get('tolerance', 0):g}): its draws pair with this "
                  "run's."]
    return lines


def export_draws(spec: LeaderboardSpec, state: dict[str, Any], done: Sequence[str],
                 out: Path) -> list[Path]:
    """``draws_<defense>.json`` for every replicated defense searched here, so a later
    leaderboard can pair with its draws without searching it again (imported_draws)."""
    from d3tune.search import imported_draws

    paths = []
    for d in done:
        summaries = state["defenses"][d].get("replicates")
        if summaries and not state["defenses"][d].get("imported"):
            search = spec.search_of(d)
            files = imported_draws.population_files(spec.state_dir, [search])
            paths.append(imported_draws.export(search, summaries, files, out))
    return paths


def parent_metrics(report: LeaderboardReport) -> dict[str, float]:
    """What the leaderboard's parent run records: compute and tuned worst case per defense, and
    the replicated figures."""
    table = report.table
    metrics = {f"compute_s.{r['defense']}": float(r["compute_s"]) for _, r in table.iterrows()}
    metrics.update({f"tuned_worst_der.{r['defense']}": float(r["tuned_worst_der"])
                    for _, r in table.iterrows() if not math.isnan(r["tuned_worst_der"])})
    if report.replicated is not None:
        metrics.update({k: v for k, v in report.replicated.metrics.items() if v == v})
    return metrics


def print_report(spec: LeaderboardSpec, report: LeaderboardReport, tuned: Path, seconds: float,
                 parent: str, exp_id: str, console: Console) -> None:
    """The table, the replicated answers and where everything is, on the console."""
    print_table(spec, report.table, console)
    if report.replicated is not None:
        report.replicated.print(console)
    console.print(f"report: {report.out / 'leaderboard.md'}; tuned settings: "
                  f"{tuned}/<defense>.yaml; this invocation {seconds:.0f} s")
    console.print(f"MLflow parent run {parent} in experiment {spec.experiment!r}")
    console.print(tracking.ui_hint(tracking.tracking_uri(), exp_id), soft_wrap=True)


def print_table(spec: LeaderboardSpec, table: pd.DataFrame, console: Console) -> None:
    """The leaderboard's table on the console."""
    first = spec.searches[0]
    t = Table(title=f"{spec.name}: holdout seeds {sorted({m.seed for m in first.holdout})}, "
              f"budget {first.budget} settings per defense")
    for col in ("defense", "default worst", "default drop", "tuned worst", "tuned drop", "gain",
                "s/member", "compute s"):
        t.add_column(col, justify="right")
    for _, r in table.iterrows():
        t.add_row(r["defense"], fixed(r["default_worst_der"]),
                  _pts(r["default_acc_drop"], r["default_ok"]), fixed(r["tuned_worst_der"]),
                  _pts(r["tuned_acc_drop"], r["tuned_ok"]), fixed(r["gain"]),
                  f"{fixed(r['default_s_per_member'], 1)} / {fixed(r['tuned_s_per_member'], 1)}",
                  fixed(r["compute_s"], 0))
    console.print(t)
    console.print("'!': mean ACC drop over the budget "
                  f"({first.max_acc_drop * 100:.1f} points); on a tuned row, the search's "
                  "rank-1 setting broke it on the holdout seeds (reported, never replaced)")
    for _, r in table.iterrows():  # each defense's total compute, so a cheap one's edge shows
        console.print(f"{r['defense']}: total compute {fixed(r['compute_s'], 0)} s "
                      f"({r['trials']} settings searched + holdout rows)")


__all__ = ["read_back", "per_threat_model", "progress", "plot_progress", "threat_model",
           "markdown", "plot", "write_report", "parent_metrics", "print_report", "print_table",
           "LeaderboardReport"]
