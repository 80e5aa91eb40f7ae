"""What a replicated search or leaderboard shows: the procedure's expected holdout worst case
with its interval, one row per (replicate, holdout seed), how far the replicates' chosen
settings land apart, compute in CPU seconds, and P(A > B) with its verdict between defenses.

Why its own page: a figure without its spread is half a figure. The interval and the number of
draws stand next to every expected value, and a difference is claimed only where its interval
says so (``d3tune.stats.Ahead.verdict``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from rich.console import Console
from rich.table import Table

from d3tune.numbers import fixed
from d3tune.stats import INTERVAL_KIND, Ahead, mean_interval

DEFAULT_ROW = "ref-default"  # the leaderboard's default reference (specs.leaderboard)


def delivered_row(summary: Mapping[str, Any]) -> str | None:
    """The row a replicate's tuning delivers: its chosen setting; when its search kept no
    setting within the ACC budget, the defense's default, which is what a user of that search
    is left with. Dropping such a replicate instead would count only the searches that
    succeeded, and flatter the procedure. None when neither was scored."""
    if summary.get("chosen"):
        return summary["chosen"]
    return DEFAULT_ROW if summary.get("draws", {}).get(DEFAULT_ROW) else None


def draws(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per holdout seed, from one row's holdout member results (member, seed, der, acc_drop):
    the worst-case DER over that seed's members, their mean DER and mean ACC drop."""
    by_seed: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_seed.setdefault(int(r["seed"]), []).append(r)
    out = []
    for seed, rs in sorted(by_seed.items()):
        ders = [float(r["der"]) for r in rs]
        drops = [float(r["acc_drop"]) for r in rs]
        out.append({"seed": seed, "worst_der": min(ders), "mean_der": sum(ders) / len(ders),
                    "mean_acc_drop": sum(drops) / len(drops), "members": len(rs)})
    return out


def chosen_draws(summary: Mapping[str, Any], label: str | None = None) -> list[dict[str, Any]]:
    """A replicate's draws for ``label`` (default: the row its tuning delivers,
    ``delivered_row``); [] when it has none."""
    label = label or delivered_row(summary)
    return list(summary["draws"].get(label, [])) if label else []


def draw_table(summaries: Sequence[Mapping[str, Any]], label: str | None = None) -> pd.DataFrame:
    """One row per (replicate, holdout seed): worst-case DER, mean DER, mean ACC drop of the
    replicate's chosen row (or of ``label``, e.g. the default reference)."""
    rows = [{"replicate": s["replicate"], "row": label or delivered_row(s), **d}
            for s in summaries for d in chosen_draws(s, label)]
    return pd.DataFrame(rows, columns=["replicate", "row", "seed", "worst_der", "mean_der",
                                       "mean_acc_drop", "members"])


def setting_spread(settings: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """How far apart the replicates' chosen settings land, per knob: min..max for numbers,
    the distinct values for the rest ("=" when every replicate chose the same)."""
    out: dict[str, str] = {}
    for knob in sorted({k for s in settings for k in s}):
        values = [s.get(knob) for s in settings]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(set(map(str, values))) == 1:
            out[knob] = f"= {values[0]}"
        elif len(numbers) == len(values):
            out[knob] = f"{min(numbers):.4g}..{max(numbers):.4g}"
        else:
            out[knob] = ", ".join(dict.fromkeys(map(str, values)))
    return out


@dataclass
class Procedure:
    """The procedure's answer over K replicates x M holdout seeds."""

    expected_worst_der: float
    low: float
    high: float
    draws: int
    replicates: int
    holdout_spread: float  # max - min over replicates of the chosen row's holdout worst case
    mean_acc_drop: float
    settings: dict[str, str] = field(default_factory=dict)
    search_cpu_s: float = math.nan
    holdout_cpu_s: float = math.nan
    interval: str = INTERVAL_KIND


def procedure(summaries: Sequence[Mapping[str, Any]], label: str | None = None) -> Procedure:
    """Expected holdout worst-case DER of the procedure (chosen rows, or ``label``'s), its
    interval, the spread of the replicates' holdout worst cases and chosen settings, and the
    compute spent (CPU seconds of the trial processes)."""
    table = draw_table(summaries, label)
    mean, low, high, n = mean_interval(table["worst_der"])
    worsts = [s["holdout_worst_der"][label or delivered_row(s)] for s in summaries
              if (label or delivered_row(s)) in s.get("holdout_worst_der", {})]
    settings = [s["setting"] for s in summaries if s.get("setting")] if label is None else []
    holdout_cpu = sum(float(s["holdout_cpu_s"].get(label or delivered_row(s), 0.0))
                      for s in summaries if (label or delivered_row(s)))
    return Procedure(mean, low, high, n, len(summaries),
                     max(worsts) - min(worsts) if worsts else math.nan,
                     float(table["mean_acc_drop"].mean()) if n else math.nan,
                     setting_spread(settings),
                     float(sum(float(s["search_cpu_s"]) for s in summaries)), holdout_cpu)


def adoption_pick(summaries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The rule fixed before the holdout: the replicate whose winner has the best
    search-phase worst case (the holdout never selects)."""
    chosen = [s for s in summaries if s.get("chosen")]
    return max(chosen, key=lambda s: (s["search_worst_der"], -s["replicate"]), default=None)


CITATION = ("Bouthillier et al., \"Accounting for Variance in Machine Learning Benchmarks\", "
            "MLSys 2021")


def interval(p: Any) -> str:
    """'0.912 [0.880, 0.941] (n = 9)' for a Procedure."""
    return f"{fixed(p.expected_worst_der)} [{fixed(p.low)}, {fixed(p.high)}] (n = {p.draws})"


def procedure_lines(outcome: Any, provenance: Mapping[str, Any]) -> list[str]:
    """The replicated search's report as Markdown lines: the procedure with its interval, every
    draw, each replicate's chosen setting, the settings' spread, compute and provenance."""
    spec, proc = outcome.spec, outcome.procedure
    lines = [f"# {spec.name}: {spec.replicates} replicated searches ({spec.defense})", "",
             f"Each replicate is a whole search (budget {spec.budget}, its own sampler seed and "
             f"population seeds), confirmed on holdout seeds "
             f"{provenance['holdout_seeds']}; a draw is one (replicate, holdout seed): the "
             "worst-case DER over that seed's holdout members. Interval: "
             f"{INTERVAL_KIND} ({CITATION}).", "",
             "| row | expected holdout worst-case DER [95 % interval] | mean ACC drop | "
             "replicates' holdout worst cases spread |", "|---|---|---|---|",
             f"| chosen (each replicate's rank-1 setting; its default where the search kept "
             f"none within the budget) | {interval(proc)} | "
             f"{fixed(proc.mean_acc_drop)} | {fixed(proc.holdout_spread)} |"]
    lines += [f"| {label} | {interval(p)} | {fixed(p.mean_acc_drop)} | "
              f"{fixed(p.holdout_spread)} |" for label, p in outcome.references.items()]
    lines += ["", "## Draws", "", "| replicate | seed | row | worst DER | mean DER | "
              "mean ACC drop |", "|---|---|---|---|---|---|"]
    for s in outcome.summaries:
        for label in [s.get("chosen"), *outcome.references]:
            for d in s["draws"].get(label, []) if label else []:
                lines.append(f"| {s['replicate']} | {d['seed']} | {label} | "
                             f"{fixed(d['worst_der'])} | {fixed(d['mean_der'])} | "
                             f"{fixed(d['mean_acc_drop'])} |")
    lines += ["", "## Chosen settings", "", "| replicate | search seed | search worst | "
              "holdout worst | keeps the ACC budget on the holdout | setting |",
              "|---|---|---|---|---|---|"]
    for s in outcome.summaries:
        label = s.get("chosen")
        lines.append(f"| {s['replicate']} | {s['search_seed']} | "
                     f"{fixed(s.get('search_worst_der'))} | "
                     f"{fixed(s['holdout_worst_der'].get(label)) if label else '-'} | "
                     f"{'-' if label is None else 'yes' if s['holdout_admissible'] else 'no'} | "
                     f"{_setting(s.get('setting'))} |")
    fallback = [s["replicate"] for s in outcome.summaries
                if not s.get("chosen") and delivered_row(s) == DEFAULT_ROW]
    if fallback:
        lines += ["", f"Replicate(s) {', '.join(map(str, fallback))}: the search kept no setting "
                  "within the ACC budget, so the procedure delivers the defense's default "
                  "there, and its draws are the default's (counted, not dropped)."]
    lines += ["", "How far apart the chosen settings land: " + (", ".join(
        f"{k.removeprefix('defense.')} {v}" for k, v in proc.settings.items()) or "-") + ".",
        "", f"Compute (CPU seconds of the trial processes): search {proc.search_cpu_s:.0f} s, "
        f"holdout of the chosen rows {proc.holdout_cpu_s:.0f} s."]
    pick = outcome.adopt
    if pick is not None:
        lines += ["", f"`d3tune adopt` takes replicate {pick['replicate']}'s setting (the best "
                  f"search-phase worst case, {fixed(pick['search_worst_der'])}: a rule fixed "
                  "before the holdout); it refuses when the spread above exceeds "
                  f"adopt_tolerance {spec.adopt_tolerance} (unless --force)."]
    lines += ["", "Provenance: " + ", ".join(f"{k} {v}" for k, v in provenance.items()
                                             if k != "replicates")]
    return lines


def _setting(setting: Mapping[str, Any] | None) -> str:
    if not setting:
        return "-"
    return " ".join(f"{k.removeprefix('defense.')}={v:.3g}" if isinstance(v, float) else
                    f"{k.removeprefix('defense.')}={v}" for k, v in sorted(setting.items())
                    if k != "defense.name")


def write_replicated_report(outcome: Any, provenance: Mapping[str, Any]) -> None:
    """Write ``procedure_lines`` to the outcome's report path."""
    outcome.report_path.write_text("\n".join(procedure_lines(outcome, provenance)) + "\n")


def print_procedure(outcome: Any, console: Console) -> None:
    """The procedure's table on the console, and where its files are."""
    t = Table(title=f"{outcome.spec.name}: {outcome.spec.replicates} replicates x holdout seeds "
              f"({INTERVAL_KIND})")
    for col in ("row", "expected worst DER", "95 % interval", "draws", "mean ACC drop",
                "spread"):
        t.add_column(col, justify="right")
    for label, p in [("chosen", outcome.procedure), *outcome.references.items()]:
        t.add_row(label, fixed(p.expected_worst_der), f"{fixed(p.low)}..{fixed(p.high)}",
                  str(p.draws), fixed(p.mean_acc_drop), fixed(p.holdout_spread))
    console.print(t)
    console.print(f"draws: {outcome.csv_path}; report: {outcome.report_path}")


def ahead_lines(comparisons: Sequence[Ahead]) -> list[str]:
    """The pairwise answers as a Markdown table."""
    lines = ["| A | B | P(A > B) | 95 % interval | pairs | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {c.a} | {c.b} | {fixed(c.p)} | {fixed(c.low)}..{fixed(c.high)} | {c.n} | "
              f"{c.verdict} |" for c in comparisons]
    return lines


def plot_draws(table: pd.DataFrame, out: Any) -> Any:
    """Per defense and row, every (replicate, holdout seed) draw's worst-case DER (one colour
    per replicate) beside the expected value and its interval: the reader sees at once whether
    a row's interval is wide because replicates disagree or because holdout seeds do."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(table.groupby(["defense", "kind"], sort=False))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 1.0 * len(groups)), 4.2))
    colours = plt.get_cmap("tab10")
    for x, ((defense, kind), g) in enumerate(groups):
        for r, rg in g.groupby("replicate"):
            ax.scatter([x - 0.3 + 0.08 * (int(r) % 4)] * len(rg), rg["worst_der"],
                       color=colours(int(r) % 10),
                       s=16, alpha=0.75, label=f"replicate {r}" if x == 0 else None)
        mean, low, high, _ = mean_interval(g["worst_der"])
        ax.errorbar([x + 0.18], [mean], yerr=[[mean - low], [high - mean]], fmt="o",
                    color="black" if kind == "tuned" else "tab:gray", capsize=4,
                    label=("expected, 95 % interval" if x == 0 else None))
    ax.set_xticks(range(len(groups)), [f"{d}\n{k}" for (d, k), _ in groups])
    ax.set_ylabel("holdout worst-case DER per draw")
    ax.set_title("Replicated: dots, every (replicate, holdout seed) draw;\n"
                 "bar, their mean with its 95 % percentile bootstrap interval", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / "replicated.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class ReplicatedBoard:
    """A replicated leaderboard's answer: per (defense, row) the procedure's figures, P(A > B)
    per pair over paired draws, the lines of its report section and its MLflow metrics."""

    procedures: dict[tuple[str, str], Any]
    comparisons: list[Ahead]
    lines: list[str]
    metrics: dict[str, float]

    def print(self, console: Console) -> None:
        """The replicated leaderboard's two tables (procedures, pairs) on the console."""
        t = Table(title=f"replicated: expected holdout worst-case DER ({INTERVAL_KIND})")
        for col in ("defense", "row", "expected", "95 % interval", "draws", "ACC drop", "spread"):
            t.add_column(col, justify="right")
        for (defense, row), p in self.procedures.items():
            t.add_row(defense, row, fixed(p.expected_worst_der), f"{fixed(p.low)}..{fixed(p.high)}",
                      str(p.draws), fixed(p.mean_acc_drop), fixed(p.holdout_spread))
        console.print(t)
        pairs = Table(title="P(A > B) over paired (replicate, holdout seed) draws")
        for col in ("A", "B", "P(A > B)", "95 % interval", "pairs", "verdict"):
            pairs.add_column(col, justify="right")
        for c in self.comparisons:
            pairs.add_row(c.a, c.b, fixed(c.p), f"{fixed(c.low)}..{fixed(c.high)}", str(c.n),
                          c.verdict)
        console.print(pairs)


def paired_worst(summaries: Sequence[Mapping[str, Any]], label: str | None = None
                 ) -> dict[tuple[int, int], float]:
    """(replicate, holdout seed) -> worst-case DER of the chosen row (or ``label``)."""
    out = {}
    for s in summaries:
        row = label or delivered_row(s)
        for d in s["draws"].get(row, []) if row else []:
            out[(int(s["replicate"]), int(d["seed"]))] = float(d["worst_der"])
    return out


def compare_defenses(summaries: Mapping[str, Sequence[Mapping[str, Any]]],
                     pairs: Sequence[tuple[str, str]]) -> list[Ahead]:
    """P(A > B) of the tuned rows over the draws both defenses have (the same replicate's
    population seeds and the same holdout seed: the same backdoored models for both)."""
    from d3tune.stats import compare_paired

    out = []
    for a, b in pairs:
        if a not in summaries or b not in summaries:
            continue
        wa, wb = paired_worst(summaries[a]), paired_worst(summaries[b])
        keys = sorted(set(wa) & set(wb))
        out.append(compare_paired(a, [wa[k] for k in keys], b, [wb[k] for k in keys]))
    return out


def replicated_leaderboard(spec: Any, state: Mapping[str, Any], done: Sequence[str],
                           out: Any) -> ReplicatedBoard:
    """The replicated section of a leaderboard's report, from the summaries its state keeps:
    draws CSV (``replicated_draws.csv``), pairs CSV (``pairs.csv``), Markdown lines, metrics."""
    summaries = {d: state["defenses"][d]["replicates"] for d in done
                 if state["defenses"][d].get("replicates")}
    procedures: dict[tuple[str, str], Any] = {}
    tables = []
    for defense, sums in summaries.items():
        for row, label in (("tuned", None), ("default", DEFAULT_ROW)):
            if label is not None and not all(label in s["draws"] for s in sums):
                continue
            procedures[(defense, row)] = procedure(sums, label)
            tables.append(draw_table(sums, label).assign(defense=defense, kind=row))
    comparisons = compare_defenses(summaries, spec.pairs)
    if tables:
        table = pd.concat(tables, ignore_index=True)
        table.to_csv(out / "replicated_draws.csv", index=False)
        plot_draws(table, out)
    pd.DataFrame([{"a": c.a, "b": c.b, "p_a_ahead": c.p, "low": c.low, "high": c.high,
                   "pairs": c.n, "verdict": c.verdict} for c in comparisons]).to_csv(
        out / "pairs.csv", index=False)
    k = spec.replicates
    holdout = sorted({m.seed for m in spec.searches[0].holdout})
    lines = ["## Replicated: how sure the answer is", "",
             f"{k} replicates per defense (each a whole search: its own sampler seed and "
             f"population seeds, seeds + 1000 r), confirmed on holdout seeds {holdout}: "
             f"{k * len(holdout)} draws per row. Interval: {INTERVAL_KIND} ({CITATION}). "
             "'A ahead' only where the interval of P(A > B) lies above 0.5.", "",
             "| defense | row | expected holdout worst-case DER [95 % interval] | mean ACC drop | "
             "replicates' spread | search CPU s | holdout CPU s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {d} | {row} | {interval(p)} | {fixed(p.mean_acc_drop)} | "
              f"{fixed(p.holdout_spread)} | {p.search_cpu_s:.0f} | {p.holdout_cpu_s:.0f} |"
              for (d, row), p in procedures.items()]
    for defense, sums in summaries.items():
        fallback = [str(s["replicate"]) for s in sums
                    if not s.get("chosen") and delivered_row(s) == DEFAULT_ROW]
        if fallback:
            lines += ["", f"{defense}: replicate(s) {', '.join(fallback)} kept no setting within "
                      "the ACC budget; the tuned row counts the default's draws there (what "
                      "that search delivers), rather than dropping them."]
    lines += ["", *ahead_lines(comparisons)]
    if tables:
        lines += ["", "![replicated draws](replicated.png)"]
    metrics: dict[str, float] = {}
    for (d, row), p in procedures.items():
        metrics.update({f"{row}_expected_worst_der.{d}": p.expected_worst_der,
                        f"{row}_expected_worst_der_low.{d}": p.low,
                        f"{row}_expected_worst_der_high.{d}": p.high})
    for c in comparisons:
        metrics.update({f"p_ahead.{c.a}_vs_{c.b}": c.p, f"p_ahead_low.{c.a}_vs_{c.b}": c.low,
                        f"p_ahead_high.{c.a}_vs_{c.b}": c.high})
    return ReplicatedBoard(procedures, comparisons, lines, metrics)


__all__ = ["draws", "chosen_draws", "draw_table", "setting_spread", "Procedure", "procedure",
           "adoption_pick", "procedure_lines", "write_replicated_report", "print_procedure", "ahead_lines",
           "interval", "CITATION", "compare_defenses", "replicated_leaderboard", "plot_draws",
           "delivered_row", "DEFAULT_ROW",
           "ReplicatedBoard"]
