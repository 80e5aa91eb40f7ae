"""Small statistics for reports: cell means with confidence intervals, knob importance, and
whether the best setting is distinguishable from the runner-up.

Why these and not more: ablations here have 2-5 seeds per cell, so a min..max band or a std says
little about whether two settings differ. A t interval is honest at small n (it is wide, and it
says so), and a paired test over the population members two settings share (same attack, same
seed, hence the same backdoored model) removes the variance that both settings inherit from
that model. Everything works on a plain DataFrame: one row per trial, setting columns, metric
columns, and member columns (seed, attack, ...), so sweeps, ablations, the robust search and the
leaderboard can all call it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


def t_interval(values: Any, level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of a Student-t interval for the mean; low/high are NaN for n < 2
    (one seed says nothing about the spread, and the report prints "n=1" rather than a band)."""
    from scipy import stats

    x = np.asarray(pd.Series(values).dropna(), dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def cell_stats(df: pd.DataFrame, by: list[str], metric: str, level: float = 0.95) -> pd.DataFrame:
    """Per cell of ``by``: mean, t interval, min, max (the seed spread) and n of ``metric``."""
    rows = []
    groups = df.groupby(by, dropna=False, sort=True, observed=True) if by else [((), df)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        mean, lo, hi, n = t_interval(part[metric], level)
        vals = part[metric].dropna()
        rows.append({**dict(zip(by, key)), "mean": mean, "lo": lo, "hi": hi,
                     "min": float(vals.min()) if n else math.nan,
                     "max": float(vals.max()) if n else math.nan, "n": n})
    return pd.DataFrame(rows)


def importance(df: pd.DataFrame, knobs: list[str], metric: str) -> dict[str, float]:
    """Share of the metric's variance explained by each knob's main effect (eta squared:
    between-level sum of squares / total), highest first. A data-only measure: it needs no
    model, works on grids and on sweeps, and is 0 for a knob that changes nothing."""
    y = df[metric].astype(float)
    total = float(((y - y.mean()) ** 2).sum())
    out = {}
    for k in knobs:
        if total <= 0:
            out[k] = 0.0
            continue
        g = df.groupby(k, dropna=False, observed=True)[metric]
        between = float((g.size() * (g.mean() - y.mean()) ** 2).sum())
        out[k] = between / total
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True)
class KnobEffect:
    """How much a knob's levels differ, against the seed spread, where the others are held."""

    knob: str
    level_gap: float    # largest |mean(level a) - mean(level b)| within one cell of the others
    seed_spread: float  # largest min..max range over seeds among the cells compared
    where: dict[str, Any]  # the cell of the other knobs where that gap is

    @property
    def matters(self) -> bool:
        """Levels differ by more than the seeds do: averaging over it would hide a result."""
        return self.level_gap > self.seed_spread + 1e-12


def knob_effect(df: pd.DataFrame, knob: str, others: list[str], metric: str,
                seed_cols: list[str]) -> KnobEffect:
    """The knob's largest level gap in ``metric`` with every other knob held fixed. The seed
    spread is the largest min..max over the seed columns among the cells compared (0 with one
    seed, so with one seed any gap matters: nothing shows it is noise)."""
    best = KnobEffect(knob, 0.0, 0.0, {})
    groups = df.groupby(others, dropna=False, sort=True, observed=True) if others else [((), df)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        levels = part.groupby(knob, dropna=False, observed=True)[metric]
        means = levels.mean()
        if len(means) < 2:
            continue
        gap = float(means.max() - means.min())
        spread = float((levels.max() - levels.min()).max()) if seed_cols else 0.0
        if gap - spread > best.level_gap - best.seed_spread or not best.where:
            best = KnobEffect(knob, gap, spread, dict(zip(others, key)))
    return best


@dataclass(frozen=True)
class Comparison:
    """Best vs runner-up setting by the mean of a metric over the members they share."""

    best: dict[str, Any]
    runner_up: dict[str, Any]
    best_mean: float
    runner_mean: float
    diff: float           # mean paired difference best - runner-up
    lo: float             # t interval of the difference (NaN when n < 2)
    hi: float
    n: int                # pairs (members both settings were evaluated on)
    paired_on: list[str]

    @property
    def distinguishable(self) -> bool:
        """The interval of the difference excludes 0 (at the interval's level)."""
        return self.n >= 2 and not math.isnan(self.lo) and (self.lo > 0 or self.hi < 0)

    def sentence(self, metric: str, level: float = 0.95) -> str:
        if self.n < 2:
            verdict = f"cannot tell them apart (n = {self.n} pair; no spread to judge by)"
        elif self.distinguishable:
            verdict = f"distinguishable at {level:.0%} (difference {self.diff:+.3f}, " \
                      f"CI {self.lo:+.3f}..{self.hi:+.3f}, n = {self.n} pairs)"
        else:
            verdict = f"not distinguishable at {level:.0%} (difference {self.diff:+.3f}, " \
                      f"CI {self.lo:+.3f}..{self.hi:+.3f}, n = {self.n} pairs)"
        return (f"best {_fmt_setting(self.best)} (mean {metric} {self.best_mean:.3f}) vs "
                f"runner-up {_fmt_setting(self.runner_up)} ({self.runner_mean:.3f}): {verdict}")


def compare_top(df: pd.DataFrame, settings: list[str], metric: str, members: list[str],
                maximize: bool = True, level: float = 0.95) -> Comparison | None:
    """Rank settings by mean ``metric``; compare the top two with a paired t interval over the
    members (e.g. attack x seed) both were run on. None with fewer than two settings."""
    if not settings:
        return None
    means = df.groupby(settings, dropna=False, observed=True)[metric].mean() \
        .sort_values(ascending=not maximize)
    if len(means) < 2:
        return None
    keys = [k if isinstance(k, tuple) else (k,) for k in means.index[:2]]
    parts = []
    for key in keys:
        mask = np.ones(len(df), dtype=bool)
        for col, v in zip(settings, key):
            mask &= (df[col].isna() if _isnan(v) else df[col] == v).to_numpy()
        part = df[mask]
        parts.append(part.groupby(members, dropna=False, observed=True)[metric].mean()
                     if members else part[metric].reset_index(drop=True))
    joined = pd.concat(parts, axis=1, join="inner").dropna()
    d = joined.iloc[:, 0] - joined.iloc[:, 1]
    mean, lo, hi, n = t_interval(d, level)
    return Comparison({s: _plain(v) for s, v in zip(settings, keys[0])},
                      {s: _plain(v) for s, v in zip(settings, keys[1])},
                      float(means.iloc[0]), float(means.iloc[1]), mean, lo, hi, n, list(members))


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _plain(v: Any) -> Any:
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _fmt_setting(s: dict[str, Any]) -> str:
    from d3tune.numbers import fmt

    return "{" + ", ".join(f"{k} {fmt(v)}" for k, v in s.items()) + "}"


# ---------------------------------------------------------------------------------------------
# Replicated searches: how sure an answer is (Bouthillier et al., "Accounting for Variance in
# Machine Learning Benchmarks", MLSys 2021). A draw is one (replicate, holdout seed): a whole
# search, confirmed on one unseen seed. Intervals are percentile bootstraps over the draws
# (scipy.stats.bootstrap): the percentile method stays defined when every draw is equal (two
# identical defenses give P = 0.5 exactly, and an interval [0.5, 0.5]), where BCa is not.

BOOTSTRAP_RESAMPLES = 10_000
INTERVAL_KIND = "95 % percentile bootstrap over the (replicate, holdout seed) draws"


def prob_ahead(a: Any, b: Any, axis: int = -1) -> Any:
    """P(A > B) over paired draws: the share of pairs where A scores higher, a tie counting
    one half (so two identical defenses give exactly 0.5)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.mean((a > b) + 0.5 * (a == b), axis=axis)


def bootstrap_interval(statistic: Any, samples: tuple[Any, ...], paired: bool,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """(low, high) of a percentile bootstrap of ``statistic`` (vectorised over ``axis``);
    NaN for fewer than two draws, where no spread can be estimated."""
    from scipy import stats

    if len(samples[0]) < 2:
        return math.nan, math.nan
    res = stats.bootstrap(samples, statistic, paired=paired, vectorized=True,
                          confidence_level=level, n_resamples=BOOTSTRAP_RESAMPLES,
                          method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_interval(values: Any, level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n): the expected value of a procedure's figure over its draws, with
    its percentile bootstrap interval."""
    x = np.asarray(pd.Series(values).dropna(), dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan, 0
    low, high = bootstrap_interval(np.mean, (x,), paired=False, level=level)
    return float(x.mean()), low, high, len(x)


@dataclass(frozen=True)
class Ahead:
    """P(A > B) over paired draws, its interval, and the verdict the interval allows."""

    a: str
    b: str
    p: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        """'A ahead' only when the whole interval is above 0.5 (B likewise below it);
        otherwise the draws cannot tell the two apart."""
        if self.low > 0.5:
            return f"{self.a} ahead"
        if self.high < 0.5:
            return f"{self.b} ahead"
        return "not separable"


def compare_paired(a_name: str, a: Any, b_name: str, b: Any, level: float = 0.95) -> Ahead:
    """P(A > B) with its bootstrap interval over draws paired by position (the same replicate
    and holdout seed: the same backdoored models for both)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired draws need equal 1-d shapes, got {a.shape} and {b.shape}")
    low, high = bootstrap_interval(prob_ahead, (a, b), paired=True, level=level)
    return Ahead(a_name, b_name, float(prob_ahead(a, b)), low, high, len(a))
