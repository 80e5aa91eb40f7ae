"""What a robust search shows: a Markdown report with plots (worst-case DER over trials; a
member x setting heat map of the finalists, on the search seeds and on the holdout seeds), the
console summary (total time, what exact pruning saved), and the parent MLflow run's artifacts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from d3tune import tracking
from d3tune.numbers import fixed
from d3tune.reports.html import markdown_page
from d3tune.search.robust_rules import admissible, population_ceiling, tradeoff

log = logging.getLogger(__name__)

TRADEOFF_BUDGETS = (0.02, 0.03, 0.05, 0.10)


def short(setting: dict[str, Any]) -> str:
    """{'defense.lr': 0.01234, ...} -> 'lr=0.0123 ...' (the report's setting column)."""
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k.removeprefix('defense.')}={fmt(v)}" for k, v in sorted(setting.items())
                    if k != "defense.name") or "(profile defaults)"


def _plots(outcome: Any, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths: list[Path] = []
    spec, search, hold = outcome.spec, outcome.search, outcome.holdout
    if not search.empty:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        done = search[search["complete"]]
        ok = done[done["mean_acc_drop"].map(lambda d: admissible(d, spec.max_acc_drop))
                  .astype(bool)]  # (a list would select columns when no setting completed)
        bad = done.drop(ok.index)
        pruned = search[search["pruned"]]
        ax.scatter(ok["trial"], ok["worst_der"], c="tab:green", label="complete, within budget")
        ax.scatter(bad["trial"], bad["worst_der"], c="tab:orange", marker="s",
                   label="complete, over the ACC budget")
        ax.scatter(pruned["trial"], pruned["worst_der"], c="tab:gray", marker="x",
                   label="pruned (running worst case, an upper bound)")
        cut = search[search["cut"]]
        if not cut.empty:
            ax.scatter(cut["trial"], cut["worst_der"], c="tab:purple", marker="+",
                       label="cut by the time budget (running worst case)")
        best, line = -np.inf, []
        for _, r in search.iterrows():
            if r["complete"] and admissible(r["mean_acc_drop"], spec.max_acc_drop):
                best = max(best, r["worst_der"])
            line.append(best if best > -np.inf else np.nan)
        ax.step(search["trial"], line, where="post", c="tab:green", alpha=0.6,
                label="best within budget so far")
        ax.set_xlabel("trial (setting), in order of creation")
        ax.set_ylabel("worst-case DER over the population")
        ax.set_title(f"{spec.name}: worst-case DER over trials (ACC budget "
                     f"{spec.max_acc_drop * 100:.0f} points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "worst_der_over_trials.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    for phase, column, rows in (("search", "search_ders", hold[hold["kind"] != "reference"]
                                 if not hold.empty else hold),
                                ("holdout", "holdout_ders", hold)):
        if rows.empty or not any(rows[column].map(bool)):
            continue
        members = sorted({m for d in rows[column] for m in d})
        grid = np.array([[d.get(m, np.nan) for d in rows[column]] for m in members], dtype=float)
        fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(rows), 1.2 + 0.32 * len(members)))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(rows)), list(rows["label"]), rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(members)), members, fontsize=8)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if grid[i, j] == grid[i, j]:
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, label="DER")
        ax.set_title(f"DER per member, {phase} seeds")
        fig.tight_layout()
        paths.append(out / f"heatmap_{phase}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def markdown(outcome: Any, images: list[Path]) -> str:
    """The robust search's report as Markdown (population, settings, chosen row, holdout rows,
    trade-off, plots)."""
    spec, search, hold = outcome.spec, outcome.search, outcome.holdout
    pop = outcome.population
    excluded = list(pop.loc[pop["excluded"], "member"])
    n_done = int(search["complete"].sum()) if not search.empty else 0
    n_pruned = int(search["pruned"].sum()) if not search.empty else 0
    n_cut = int(search["cut"].sum()) if not search.empty else 0
    n_ok = int(sum(admissible(d, spec.max_acc_drop) for d in
                   search.loc[search["complete"], "mean_acc_drop"])) if n_done else 0
    sec = outcome.seconds
    lines = [f"# Robust search: {spec.name} (defense {spec.defense})", "",
             f"Population: {len(spec.members) - sum(pop['phase'].eq('search') & pop['excluded'])}"
             f" members searched on seeds {sorted({m.seed for m in spec.members})}, holdout seeds "
             f"{sorted({m.seed for m in spec.holdout})}; left out (ASR before < {spec.min_asr}): "
             f"{', '.join(excluded) or 'none'}.",
             *held_out_line(spec),
             f"Budget {spec.budget} settings; ACC budget {spec.max_acc_drop * 100:.1f} points "
             f"(mean ACC drop); top_k {spec.top_k}.",
             f"Time: total {sec.get('total', 0):.0f} s (population "
             f"{sec.get('population', 0):.0f} s, search {sec.get('search', 0):.0f} s, "
             f"confirmation {sec.get('confirmation', 0):.0f} s)"
             " in this invocation.",
             f"Settings: {len(search)} tried, {n_done} complete ({n_ok} within the ACC budget), "
             f"{n_pruned} stopped by exact pruning, {n_cut} cut by the time budget; member "
             "evaluations skipped by pruning "
             f"{outcome.skipped} of {outcome.total}"
             + (f" ({100 * outcome.skipped / outcome.total:.0f} %)." if outcome.total else "."),
             *ceiling_lines(pop), ""]
    if outcome.chosen is not None:
        c = outcome.chosen
        broke = "" if c["holdout_admissible"] else (
            " **It breaks the ACC budget on the holdout seeds** (reported, not replaced: the "
            "holdout never selects).")
        lines += ["Protocol: the search's seeds select (finalists ranked by search worst-case "
                  "DER); the holdout seeds only confirm: the chosen setting is the search's "
                  "rank-1 finalist.", "",
                  f"**Chosen** (search rank {int(c['search_rank']) + 1}): {short(c['shown'])}: "
                  "holdout worst-case DER "
                  f"{c['holdout_worst_der']:.3f}, mean ACC drop "
                  f"{c['holdout_mean_acc_drop'] * 100:.1f} points (search: "
                  f"{c['search_worst_der']:.3f}, "
                  f"{c['search_mean_acc_drop'] * 100:.1f} points).{broke}", ""]
    else:
        lines += ["**No setting kept the ACC budget in the search**: no finalist, nothing "
                  "chosen.", ""]
    if not hold.empty:
        lines += ["## Finalists and references on the holdout seeds", "",
                  "| row | setting | search worst DER | search ACC drop | holdout worst DER | "
                  "holdout mean DER | holdout ACC drop | within budget |",
                  "|---|---|---|---|---|---|---|---|"]
        for _, r in hold.iterrows():
            mark = " (chosen)" if outcome.chosen is not None and r["label"] == \
                outcome.chosen["label"] else (" (trade-off only)" if r["kind"] == "tradeoff"
                                              else "")
            drop = r["search_mean_acc_drop"]
            lines.append(f"| {r['label']}{mark} | {short(r['shown'])} | "
                         f"{fixed(r['search_worst_der'])} | "
                         f"{'-' if drop is None or drop != drop else f'{drop * 100:.1f}'} | "
                         f"{r['holdout_worst_der']:.3f} | {r['holdout_mean_der']:.3f} | "
                         f"{r['holdout_mean_acc_drop'] * 100:.1f} | "
                         f"{'yes' if r['holdout_admissible'] else 'no'} |")
        lines += ["", "## Trade-off on the holdout seeds (every row above)", "",
                  "| ACC budget (points) | best holdout worst-case DER | row |", "|---|---|---|"]
        for budget, row in tradeoff(hold.to_dict("records"), TRADEOFF_BUDGETS):
            lines.append(f"| {budget * 100:.0f} | "
                         f"{fixed(row['holdout_worst_der']) if row else '-'} | "
                         f"{row['label'] + ': ' + short(row['shown']) if row else 'none'} |")
        lines.append("")
    if n_done:
        done = search[search["complete"]].sort_values(["worst_der", "mean_der"], ascending=False)
        lines += ["## What the search explored (complete settings, best first)", "",
                  "| trial | setting | worst DER | mean DER | mean ACC drop | weakest member |",
                  "|---|---|---|---|---|---|"]
        for _, r in done.head(20).iterrows():
            weakest = min(r["ders"], key=r["ders"].get) if r["ders"] else "-"
            lines.append(f"| {r['trial']} | {short(r['setting'])} | {r['worst_der']:.3f} | "
                         f"{r['mean_der']:.3f} | {r['mean_acc_drop'] * 100:.1f} | {weakest} |")
        lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def held_out_line(spec: Any) -> list[str]:
    """One line naming the held-out attacks, when the holdout confirms on attacks the search
    never saw (``holdout_attacks``); nothing when it repeats the population's threat models."""
    searched = {m.fields.get("attack.name") for m in spec.members}
    held = sorted({m.fields.get("attack.name") for m in spec.holdout} - searched)
    return [f"Held-out attacks (never seen by the search, confirmation only): "
            f"{', '.join(held)}."] if held else []


def ceilings(pop: Any) -> dict[str, tuple[float, str]]:
    """Per phase (search, holdout): the lowest DER ceiling among the members kept."""
    if pop.empty:
        return {}
    kept = pop[~pop["excluded"].astype(bool)]
    out = {}
    for phase in ("search", "holdout"):
        found = population_ceiling(kept[kept["phase"].eq(phase)].to_dict("records"))
        if found is not None:
            out[phase] = found
    return out


def ceiling_lines(pop: Any) -> list[str]:
    """The DER ceiling the population puts on every setting, per phase, as report lines."""
    found = ceilings(pop)
    if not found:
        return []
    parts = [f"{phase} {value:.3f} ({member})" for phase, (value, member) in found.items()]
    return ["DER ceiling (no setting's worst case can exceed it: the lowest (1 + ASR before) / 2 "
            f"among the members kept): {', '.join(parts)}."]


def write_report(outcome: Any, out: Path) -> Path:
    """Write the report (Markdown, HTML, plots) into ``out``; returns the folder."""
    out.mkdir(parents=True, exist_ok=True)
    images = _plots(outcome, out)
    text = markdown(outcome, images)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(markdown_page(text, out, f"robust search {outcome.spec.name}"))
    if not outcome.search.empty:
        outcome.search.to_json(out / "search.json", orient="records", indent=1)
    if not outcome.holdout.empty:
        outcome.holdout.to_json(out / "holdout.json", orient="records", indent=1)
    return out


def print_summary(outcome: Any, console: Console, callback: Any) -> None:
    """The holdout rows, the chosen setting and what pruning saved, on the console."""
    hold = outcome.holdout
    if not hold.empty:
        t = Table(title=f"{outcome.spec.name}: finalists and references on holdout seeds "
                  f"{sorted({m.seed for m in outcome.spec.holdout})}")
        for col in ("row", "setting", "search worst", "holdout worst", "holdout ACC drop", "ok"):
            t.add_column(col, justify="right")
        for _, r in hold.iterrows():
            t.add_row(r["label"], short(r["shown"]), fixed(r["search_worst_der"]),
                      fixed(r["holdout_worst_der"]), f"{r['holdout_mean_acc_drop'] * 100:.1f}",
                      "yes" if r["holdout_admissible"] else "no")
        console.print(t)
    c = outcome.chosen
    if c is not None:
        console.print(f"chosen: {short(c['shown'])}: holdout worst-case DER "
                      f"{c['holdout_worst_der']:.4f}, mean ACC drop "
                      f"{c['holdout_mean_acc_drop'] * 100:.2f} points; wrote {outcome.yaml_path} "
                      f"(use it with `d3tune run --config {outcome.yaml_path}`)")
        if not c["holdout_admissible"]:
            console.print("the chosen setting breaks the ACC budget on the holdout seeds "
                          "(reported, not replaced: the holdout never selects)")
    else:
        console.print("no setting kept the ACC budget in the search: no finalist, no defaults "
                      "written")
    for line in ceiling_lines(outcome.population):
        console.print(line)
    pct = 100 * outcome.skipped / outcome.total if outcome.total else 0.0
    console.print(f"total time {outcome.seconds.get('total', 0):.0f} s; exact pruning skipped "
                  f"{outcome.skipped} of {outcome.total} member evaluations ({pct:.0f} %)")
    console.print(f"report: {outcome.report_dir / 'report.md'}")
    if callback.client is not None and callback.parent_id:
        console.print(f"MLflow parent run {callback.parent_id} in experiment "
                      f"{outcome.spec.experiment!r}")
        console.print(tracking.ui_hint(callback.uri, callback.exp_id), soft_wrap=True)


