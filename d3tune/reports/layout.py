"""Which knobs a report puts on the heat maps' axes, which get panels, and which it may average.

The rule the report keeps: never a silent average over a knob that matters. The two knobs that
explain most of the metric's variance go on the axes; every population column that varies
(several attacks, datasets, architectures) gets panels; any further knob is averaged only when,
with the others held, its levels differ by no more than the seeds do, and the report says so.
Also the names people read: records by their record name, knobs by their spec names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from d3tune import stats

POPULATION_LABELS = ("attack", "data.name", "model.arch")  # members a setting is judged over
SEEDS = ("seed",)
# (label, column, higher is better)
METRICS: tuple[tuple[str, str, bool], ...] = (("DER", "der", True), ("ASR", "asr_after", False),
                                              ("ACC", "acc_after", True))


def record_name(path: str) -> str:
    """An imported BackdoorBench model is known by its record folder (record/<name>/...pt)."""
    p = Path(str(path))
    return p.parent.name or p.stem


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """One ``attack`` column that names imported models by their record, in place of
    attack.name / attack.result (which would say "backdoorbench" for every record)."""
    out = df.copy()
    if "attack.name" not in out and "attack.result" not in out:
        return out
    label = out["attack.name"].astype(str) if "attack.name" in out \
        else pd.Series("", index=out.index)
    if "attack.result" in out:
        rec = out["attack.result"].map(
            lambda r: record_name(r) if isinstance(r, str) and r else None)
        label = rec.where(rec.notna(), label)
    out = out.drop(columns=[c for c in ("attack.name", "attack.result") if c in out])
    out.insert(0, "attack", label)
    return out


def integral_knobs(df: pd.DataFrame, knobs: list[str]) -> pd.DataFrame:
    """A knob whose every level is a whole number reads as integers (p 1 and 2, not 1.0 and 2.0,
    though the trial config stores D3's p as a float); a knob with any fraction stays float."""
    out = df.copy()
    for k in knobs:
        col = out[k]
        if pd.api.types.is_float_dtype(col):
            vals = col.dropna()
            if len(vals) and (vals == vals.round()).all():
                out[k] = col.round().astype("Int64")
    return out


def levels(df: pd.DataFrame, col: str) -> list[Any]:
    """The values of a column in their natural order (a binned knob's bins low to high)."""
    if isinstance(df[col].dtype, pd.CategoricalDtype):
        present = set(df[col].dropna())
        return [c for c in df[col].cat.categories if c in present]
    vals = list(pd.unique(df[col].dropna()))
    try:
        return sorted(vals)
    except TypeError:
        return vals


def select(df: pd.DataFrame, cols: list[str], key: tuple) -> pd.DataFrame:
    """The rows of ``df`` whose ``cols`` equal ``key`` (NaN matching NaN)."""
    mask = np.ones(len(df), dtype=bool)
    for c, v in zip(cols, key):
        mask &= (df[c].isna() if v is None or v is pd.NA or (isinstance(v, float) and v != v)
                 else df[c] == v).to_numpy(dtype=bool)
    return df[mask]


def discretise(df: pd.DataFrame, knobs: list[str], max_levels: int = 8,
               bins: int = 5) -> pd.DataFrame:
    """A sweep's continuous knobs (more than ``max_levels`` values) as ``bins`` quantile bins
    ("0.01-0.03"), so the same heat maps serve grids and sweeps; a grid's knobs pass unchanged."""
    out = df.copy()
    for k in knobs:
        col = out[k]
        if not pd.api.types.is_numeric_dtype(col) or col.nunique() <= max_levels:
            continue
        cut = pd.qcut(col.astype(float), bins, duplicates="drop")
        span = col.astype(float).groupby(cut, observed=True).agg(["min", "max"])
        labels = {iv: f"{lo:.3g}-{hi:.3g}" for iv, (lo, hi) in span.iterrows()}  # values seen
        out[k] = pd.Categorical(cut.map(labels), categories=list(labels.values()), ordered=True)
    return out


@dataclass(frozen=True)
class Layout:
    """How a sweep report arranges its tables: which columns are settings, members and metrics."""
    x: str | None             # most important knob (by variance of the metric it explains)
    y: str | None             # second most important
    panels: list[str]         # one panel per combination: population members, knobs that matter
    averaged: list[stats.KnobEffect]  # knobs whose levels differ by less than the seed spread
    importance: dict[str, float]


def plan_layout(df: pd.DataFrame, settings: list[str], population: list[str],
                metric: str = "der", seeds: list[str] = list(SEEDS)) -> Layout:
    """Axes = the two knobs that explain most of the metric's variance; every population
    column that varies (e.g. several attacks) gets its own panels; a further knob is averaged
    only when its levels differ by no more than the seed spread, else it gets panels too."""
    imp = stats.importance(df, settings, metric)
    order = list(imp)
    panels = [p for p in population if p in df and df[p].astype(str).nunique() > 1]
    averaged = []
    for k in order[2:]:
        others = [c for c in settings + panels if c != k]
        eff = stats.knob_effect(df, k, others, metric, [s for s in seeds if s in df])
        if eff.matters:
            panels.append(k)
        else:
            averaged.append(eff)
    return Layout(order[0] if order else None, order[1] if len(order) > 1 else None,
                  panels, averaged, imp)
