"""Report figures: heat maps of every metric over the two most important knobs (one row of
panels per attack and per further knob that matters; each cell's seed spread written in it) and
ACC against ASR per trial. Matplotlib with the Agg backend: no display needed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from d3tune import stats
from d3tune.numbers import fmt as html_fmt
from d3tune.reports.layout import METRICS, Layout, levels, select


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel_keys(df: pd.DataFrame, panels: list[str]) -> list[tuple]:
    if not panels:
        return [()]
    keys = df[panels].drop_duplicates().itertuples(index=False, name=None)
    try:
        return sorted(keys)
    except TypeError:
        return list(keys)


def _panel_title(panels: list[str], key: tuple) -> str:
    return ", ".join(f"{p} {html_fmt(v)}" if p != "attack" else html_fmt(v)
                     for p, v in zip(panels, key))


def heatmaps(df: pd.DataFrame, layout: Layout, path: Path,
             metrics: tuple[tuple[str, str, bool], ...] = METRICS, title: str = "") -> Path:
    """One row of heat maps per panel, one column per metric; each cell the mean over seeds
    (and over averaged knobs, named in the title) with the min..max written under it."""
    plt = _plt()
    keys = _panel_keys(df, layout.panels)
    xs = levels(df, layout.x) if layout.x else [None]
    ys = levels(df, layout.y) if layout.y else [None]
    axes_cols = [c for c in (layout.y, layout.x) if c]
    w = max(3.4, 0.95 * len(xs) + 1.9)
    h = max(2.4, 0.62 * len(ys) + 1.5)
    fig, axes = plt.subplots(len(keys), len(metrics), figsize=(w * len(metrics), h * len(keys)),
                             squeeze=False)
    for j, (label, col, higher) in enumerate(metrics):
        vals = df[col].astype(float)
        vmin, vmax = (0.0, 1.0) if label in ("DER", "ASR") \
            else (float(vals.min()), float(vals.max()))
        if vmax - vmin < 1e-9:
            vmin, vmax = vmin - 0.01, vmax + 0.01
        cmap = "RdYlGn" if higher else "RdYlGn_r"
        for i, key in enumerate(keys):
            ax = axes[i][j]
            part = select(df, layout.panels, key)
            grid = np.full((len(ys), len(xs)), np.nan)
            cells = stats.cell_stats(part, axes_cols, col) if axes_cols else \
                stats.cell_stats(part.assign(_all=0), ["_all"], col)
            for _, c in cells[cells["n"] > 0].iterrows():
                yi = ys.index(c[layout.y]) if layout.y else 0
                xi = xs.index(c[layout.x]) if layout.x else 0
                grid[yi, xi] = c["mean"]
                text = f"{c['mean']:.3f}"
                if c["n"] >= 2:
                    text += f"\n{c['min']:.2f}–{c['max']:.2f}"
                ax.text(xi, yi, text, ha="center", va="center", fontsize=8.5,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.65))
            im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            long = max((len(html_fmt(v)) for v in xs), default=0) > 6
            ax.set_xticks(range(len(xs)), [html_fmt(v) for v in xs], rotation=30 if long else 0,
                          ha="right" if long else "center")
            ax.set_yticks(range(len(ys)), [html_fmt(v) for v in ys])
            ax.set_xlabel(layout.x or "")
            ax.set_ylabel(layout.y or "")
            ns = cells["n"][cells["n"] > 0]
            n = "0" if ns.empty else \
                f"{ns.min()}" if ns.min() == ns.max() else f"{ns.min()}-{ns.max()}"
            head = f"{label} ({'higher' if higher else 'lower'} is better), n={n}"
            ax.set_title(head + (f"\n{_panel_title(layout.panels, key)}" if key else ""),
                         fontsize=9.5)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    sub = title + ("; " if title else "") + "cell: mean over seeds, below it min–max"
    if layout.averaged:
        sub += "; averaged over " + ", ".join(e.knob for e in layout.averaged)
    fig.suptitle(sub, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter(df: pd.DataFrame, panels: list[str], path: Path) -> Path:
    """ACC against ASR after the defense, one colour per panel (e.g. attack)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for key in _panel_keys(df, panels):
        part = select(df, panels, key)
        ax.scatter(part["asr_after"], part["acc_after"], alpha=0.7,
                   label=_panel_title(panels, key) or "all trials")
    ax.set_xlabel("ASR after defense (lower is better)")
    ax.set_ylabel("ACC after defense")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
