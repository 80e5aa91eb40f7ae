"""Reports: interactions are shown, never averaged away; intervals and comparisons; names;
one self-contained HTML page. All on hand-made frames (no training, no MLflow)."""
from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest

from d3tune import stats
from d3tune.numbers import fixed, fmt
from d3tune.reports.html import markdown_page
from d3tune.reports.sweep_report import build_report, discretise, heatmaps, plan_layout, tidy
from d3tune.reports.layout import integral_knobs, levels


def _frame(der, seeds=(0, 1), noise=0.005, attacks=("badnets",)) -> pd.DataFrame:
    """der(setting dict, attack) -> mean DER; seeds add +-noise."""
    rows = []
    for ratio, bs, init, attack, seed in itertools.product(
            (0.05, 0.1), (32, 256), ("random", "zero"), attacks, seeds):
        s = {"data.clean_ratio": ratio, "defense.batch_size": bs, "defense.init": init}
        d = der(s, attack) + (noise if seed % 2 else -noise)
        rows.append({**s, "attack": attack, "seed": seed, "der": d, "asr_after": 1 - d,
                     "acc_after": 0.95, "acc_drop": 0.02})
    return pd.DataFrame(rows)


def _interaction(s, attack):
    """Batch 32 at 10 % removes the backdoor, batch 256 at 10 % does not; at 5 % both half do.
    defense.init: 'zero' costs 0.2 DER, but only at batch 32 / 10 % (one cell)."""
    base = {(0.1, 32): 0.98, (0.1, 256): 0.75, (0.05, 32): 0.6, (0.05, 256): 0.58}
    cell = (s["data.clean_ratio"], s["defense.batch_size"])
    d = base[cell]
    if s["defense.init"] == "zero" and cell == (0.1, 32):
        d -= 0.2
    return d


def test_a_knob_whose_levels_differ_by_more_than_the_seed_spread_gets_panels_not_an_average():
    df = _frame(_interaction)
    knobs = ["data.clean_ratio", "defense.batch_size", "defense.init"]
    layout = plan_layout(df, knobs, ["attack"], "der", ["seed"])
    # defense.init explains the least variance, yet in one cell its levels differ by 0.2 while
    # seeds differ by 0.01: it must get a panel per level, not be folded into a mean
    assert list(layout.importance)[-1] == "defense.init"
    assert "defense.init" in layout.panels and not layout.averaged
    eff = stats.knob_effect(df, "defense.init", knobs[:2], "der", ["seed"])
    assert eff.matters and eff.level_gap == pytest.approx(0.2)
    assert eff.where == {"data.clean_ratio": 0.1, "defense.batch_size": 32}


def test_a_knob_within_the_seed_spread_is_averaged_and_the_report_says_so(tmp_path):
    df = _frame(lambda s, a: _interaction({**s, "defense.init": "random"}, a)
                + (0.004 if s["defense.init"] == "zero" else 0.0), noise=0.01)
    knobs = ["data.clean_ratio", "defense.batch_size", "defense.init"]
    layout = plan_layout(df, knobs, ["attack"], "der", ["seed"])
    assert [e.knob for e in layout.averaged] == ["defense.init"]
    build_report(df, tmp_path, title="t", settings=knobs)
    md = (tmp_path / "report.md").read_text()
    assert "Averaged over defense.init in the heat maps" in md
    assert "differ in mean DER by at most 0.004, within the seed spread (0.020)" in md


def test_two_knob_interaction_is_on_the_axes_with_every_cell_its_own_mean(tmp_path):
    df = _frame(lambda s, a: _interaction({**s, "defense.init": "random"}, a))
    df = df[df["defense.init"] == "random"].drop(columns="defense.init")
    knobs = ["data.clean_ratio", "defense.batch_size"]
    layout = plan_layout(df, knobs, ["attack"], "der", ["seed"])
    assert {layout.x, layout.y} == set(knobs) and layout.panels == [] and not layout.averaged
    cells = stats.cell_stats(df, knobs, "der").set_index(knobs)["mean"]
    assert cells[(0.1, 32)] == pytest.approx(0.98) and cells[(0.1, 256)] == pytest.approx(0.75)
    assert heatmaps(df, layout, tmp_path / "h.png").stat().st_size > 10_000


def test_several_attacks_get_one_panel_each(tmp_path):
    df = _frame(lambda s, a: 0.9 if a == "badnets" else 0.5, attacks=("badnets", "blended"))
    layout = plan_layout(df, ["data.clean_ratio", "defense.batch_size"], ["attack"], "der",
                         ["seed"])
    assert layout.panels == ["attack"]


def test_t_interval_and_n():
    mean, lo, hi, n = stats.t_interval([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert hi - mean == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2) * s / sqrt(n)
    _, lo1, hi1, n1 = stats.t_interval([0.5])
    assert n1 == 1 and math.isnan(lo1) and math.isnan(hi1)  # no band at n = 1


def test_best_vs_runner_up_is_paired_over_the_shared_members():
    rows = []
    for seed in range(4):
        shift = 0.1 * seed  # seeds differ a lot; A beats B by 0.02 on every seed
        rows += [{"k": "A", "seed": seed, "der": 0.6 + shift + 0.02},
                 {"k": "B", "seed": seed, "der": 0.6 + shift}]
    df = pd.DataFrame(rows)
    c = stats.compare_top(df, ["k"], "der", ["seed"])
    assert c.best == {"k": "A"} and c.n == 4 and c.distinguishable
    assert c.diff == pytest.approx(0.02)
    noisy = df.assign(der=df["der"] + [0.0, 0.0, 0.05, 0.0, -0.05, 0.0, 0.0, 0.0])
    c2 = stats.compare_top(noisy, ["k"], "der", ["seed"])
    assert not c2.distinguishable and "not distinguishable at 95%" in c2.sentence("DER")
    assert "n = 4 pairs" in c2.sentence("DER")


def test_names_records_by_record_and_integers_as_integers(tmp_path):
    rows = []
    for rec, bs, seed in itertools.product(("badnet_0_1", "blended_0_1"), (32, 256), (0, 1)):
        rows.append({"attack.name": "backdoorbench",
                     "attack.result": f"record/{rec}/attack_result.pt",
                     "defense.batch_size": bs, "seed": seed, "der": 0.5 + seed / 10,
                     "asr_after": 0.3, "acc_after": 0.9})
    df = pd.DataFrame(rows)
    df.loc[0, "acc_after"] = float("nan")  # a float column with a gap keeps ints elsewhere
    df["defense.p"] = [1.0, 2.0] * 4  # D3's p is a float field; the spec said 1 and 2
    df["defense.radius"] = [0.5, 2.0] * 4
    t = integral_knobs(tidy(df), ["defense.p", "defense.radius"])
    assert list(t["defense.p"][:2]) == [1, 2] and list(t["defense.radius"][:2]) == [0.5, 2.0]
    assert set(t["attack"]) == {"badnet_0_1", "blended_0_1"} and "attack.name" not in t
    build_report(t.drop(columns=["defense.p", "defense.radius"]), tmp_path, title="names",
                 settings=["defense.batch_size"])
    md = (tmp_path / "report.md").read_text()
    assert "| badnet_0_1 | 32 |" in md or "| 32 | badnet_0_1 |" in md
    assert not re.search(r"\b(32|256)\.0\b", md) and "backdoorbench" not in md
    assert fmt(2.0) == "2.0" and fmt(np.int64(32)) == "32" and fmt(1e-4) == "0.0001"


def test_html_report_is_one_self_contained_page(tmp_path):
    df = _frame(_interaction, attacks=("badnets", "blended"))
    build_report(df, tmp_path, title="<self>", settings=["data.clean_ratio", "defense.batch_size",
                                                         "defense.init"])
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # heat maps and the scatter, inline
    assert not re.search(r"<(script|link|iframe)|src=\"(?!data:)|url\(", page)
    assert "&lt;self&gt;" in page and "<table>" in page
    md = (tmp_path / "report.md").read_text()
    assert "![heatmaps](heatmaps.png)" in md and "data:image" not in md


def test_markdown_reports_get_the_same_self_contained_page(tmp_path):
    """Robust and leaderboard reports are Markdown text; their HTML has the tables rendered,
    local images inline, nothing fetched, and markup in the text escaped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(tmp_path / "plot.png")
    plt.close(fig)
    md = ("# leaderboard <x>\n\n| defense | DER |\n|---|---|\n| d3 | " + fixed(0.90312) + " |\n"
          "| ft | " + fixed(float("nan")) + " |\n\n![plot](plot.png)\n\n![gone](missing.png)\n")
    page = markdown_page(md, tmp_path, "leaderboard <x>")
    assert "<table>" in page and "<td>0.903</td>" in page and "<td>-</td>" in page
    assert page.count("data:image/png;base64,") == 1  # the file that exists, inlined
    assert 'src="missing.png"' in page  # a missing file stays a reference, never a crash
    assert "&lt;x&gt;" in page and "<x>" not in page
    assert not re.search(r"<(script|link|iframe)|url\(", page)


def test_a_sweeps_continuous_knobs_are_binned_in_order(tmp_path):
    """Sweeps feed the same report: 30 distinct learning rates become 5 ordered bins."""
    lrs = [10 ** (-3 + 2 * i / 29) for i in range(30)]
    df = pd.DataFrame({"defense.lr": lrs, "defense.p": [1, 2] * 15, "seed": 0,
                       "der": [0.5 + 0.01 * i for i in range(30)], "asr_after": 0.2,
                       "acc_after": 0.9})
    shown = discretise(df, ["defense.lr", "defense.p"])
    bins = levels(shown, "defense.lr")
    assert len(bins) == 5 and bins[0].startswith("0.001") and bins[-1].endswith("-0.1")
    assert levels(shown, "defense.p") == [1, 2]  # a grid knob passes unchanged
    build_report(df, tmp_path, title="sweep", settings=["defense.lr", "defense.p"])
    assert (tmp_path / "heatmaps.png").stat().st_size > 10_000
