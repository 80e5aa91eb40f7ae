"""The decisions of a robust search, as pure functions of plain numbers (no Ray, no MLflow).

A *setting* is scored by its worst-case DER over the population's members, subject to its mean
ACC drop staying within a budget. Everything here is decided from member reports, so each rule
can be tested on hand-made numbers.

Exact pruning (``prune_threshold`` / ``should_prune``). A trial evaluates one setting member by
member and reports the running minimum of DER. A minimum can only fall as members are added, so
the running worst case is an upper bound of the setting's final worst case. The search keeps
the top_k admissible settings (the finalists); once top_k admissible settings have finished,
a new one enters that set only if its final worst case beats the k-th best of them (ties are
kept: we never prune on equality). So a running worst case strictly below that k-th best proves
the setting can never become a finalist, whatever its remaining members and its ACC drop turn
out to be: stopping it changes no finalist. It only saves member evaluations. The ACC drop is
not monotone in the members (a member may *gain* accuracy), so nothing is pruned on it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

EPS = 1e-12


@dataclass(frozen=True)
class Finished:
    """A setting that was evaluated on every member (never a pruned one)."""

    worst_der: float
    mean_acc_drop: float


def admissible(mean_acc_drop: float, max_acc_drop: float) -> bool:
    """Whether a mean ACC drop keeps the budget (a tolerance of 1e-12 for float sums)."""
    return mean_acc_drop <= max_acc_drop + EPS


def prune_threshold(finished: Iterable[Finished], top_k: int, max_acc_drop: float) -> float | None:
    """The worst case a running setting must still be able to reach: the k-th best final worst
    case among finished admissible settings; None (never prune) while fewer than k exist."""
    worsts = sorted((f.worst_der for f in finished if admissible(f.mean_acc_drop, max_acc_drop)),
                    reverse=True)
    return worsts[top_k - 1] if len(worsts) >= top_k else None


def should_prune(running_worst: float, threshold: float | None) -> bool:
    """Strictly below the threshold: this setting cannot become a finalist (see module doc)."""
    return threshold is not None and running_worst < threshold - EPS


def worst_and_drop(reports: Sequence[Mapping[str, float]]) -> tuple[float, float, float]:
    """(running worst-case DER, mean ACC drop, mean DER) of member reports with der/acc_drop."""
    ders = [float(r["der"]) for r in reports]
    drops = [float(r["acc_drop"]) for r in reports]
    return min(ders), sum(drops) / len(drops), sum(ders) / len(ders)


def incumbent(rows: Iterable[Mapping[str, Any]], max_acc_drop: float) -> Mapping[str, Any] | None:
    """The best complete setting: admissible ones first, then by worst-case and mean DER.
    Rows carry worst_der, mean_der, mean_acc_drop and complete (bool)."""
    done = [r for r in rows if r.get("complete")]
    if not done:
        return None
    return max(done, key=lambda r: (admissible(r["mean_acc_drop"], max_acc_drop),
                                    r["worst_der"], r["mean_der"]))


def member_order(member_ids: Sequence[str],
                 incumbent_ders: Mapping[str, float] | None) -> list[str]:
    """Likely failures first: the members on which the incumbent scored lowest DER come first,
    so a weaker setting falls below the pruning threshold after as few members as possible.
    Members the incumbent has no figure for keep their spec order, ahead of the rest."""
    if not incumbent_ders:
        return list(member_ids)
    unknown = [m for m in member_ids if m not in incumbent_ders]
    known = sorted((m for m in member_ids if m in incumbent_ders),
                   key=lambda m: (incumbent_ders[m], member_ids.index(m)))
    return unknown + known


def search_key(row: Mapping[str, Any]) -> tuple[float, float]:
    """How the search ranks complete settings: worst-case DER, then mean DER."""
    return (row["worst_der"], row["mean_der"])


def finalists(rows: Sequence[Mapping[str, Any]], top_k: int,
              max_acc_drop: float) -> list[Mapping[str, Any]]:
    """The top_k complete admissible settings, in search order (best first)."""
    done = [r for r in rows if r.get("complete")]
    return sorted((r for r in done if admissible(r["mean_acc_drop"], max_acc_drop)),
                  key=search_key, reverse=True)[:top_k]


def tradeoff_extras(rows: Sequence[Mapping[str, Any]], picked: Sequence[Mapping[str, Any]],
                    budgets: Sequence[float]) -> list[tuple[float, Mapping[str, Any]]]:
    """For each trade-off budget, the search's best complete setting admissible at that budget,
    when it is not already a finalist: (budget, row). These settings broke (or may break) the
    search's own ACC budget, so they are confirmed for the trade-off table only and can never
    be chosen as the defaults."""
    done = [r for r in rows if r.get("complete")]
    out: list[tuple[float, Mapping[str, Any]]] = []
    for budget in budgets:
        ok = [r for r in done if admissible(r["mean_acc_drop"], budget)]
        if ok:
            best = max(ok, key=search_key)
            if all(best is not p for p in picked) and all(best is not r for _, r in out):
                out.append((budget, best))
    return out


def choose(finalist_rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The confirmed setting: the search's rank-1 finalist. The holdout confirms and never
    selects: no holdout figure is compared between finalists, and a rank-1 finalist that breaks
    the ACC budget on the holdout is reported as breaking it (``holdout_admissible``) rather
    than replaced by the next one, so the reported holdout figure is one unbiased estimate, not
    the best of k noisy ones. Rows carry search_rank (0 = the search's best). None without
    finalists (no setting kept the ACC budget in the search)."""
    return min(finalist_rows, key=lambda r: r["search_rank"], default=None)


def tradeoff(holdout_rows: Sequence[Mapping[str, Any]], budgets: Sequence[float]
             ) -> list[tuple[float, Mapping[str, Any] | None]]:
    """For each ACC budget, the holdout row with the best holdout worst-case DER within it.
    Descriptive (every confirmed row at once, the references included), never a choice: the
    defaults come from ``choose``."""
    out: list[tuple[float, Mapping[str, Any] | None]] = []
    for b in budgets:
        ok = [r for r in holdout_rows if admissible(r["holdout_mean_acc_drop"], b)]
        out.append((b, max(ok, key=lambda r: (r["holdout_worst_der"], r["holdout_mean_der"]))
                    if ok else None))
    return out


def pruning_savings(rows: Iterable[Mapping[str, Any]]) -> tuple[int, int]:
    """(member evaluations skipped by pruning, member evaluations a full search would run)."""
    skipped = total = 0
    for r in rows:
        total += int(r["members_total"])
        if r.get("pruned"):
            skipped += int(r["members_total"]) - int(r["members_done"])
    return skipped, total


def der_ceiling(asr_before: float) -> float:
    """The most DER any defense can score on a member: all of its ASR removed, no accuracy
    lost. DER = (ASR removed - ACC lost + 1) / 2, so a backdoor that planted to ASR 0.76 caps
    every setting's DER on that member at 0.88."""
    from d3tune.metrics import (
        der,  # here: the rules above stay importable without torch
    )

    return der(1.0, asr_before, 1.0, 0.0)


def population_ceiling(members: Iterable[Mapping[str, Any]]) -> tuple[float, str] | None:
    """(ceiling, member) of the member with the lowest DER ceiling: no setting's worst-case DER
    over these members can exceed it, so a search whose best worst case is near it is
    saturated by the population, not short of search. Rows need ``member`` and
    ``asr_before``; None for no rows."""
    rows = [(der_ceiling(float(r["asr_before"])), str(r["member"])) for r in members]
    return min(rows) if rows else None
