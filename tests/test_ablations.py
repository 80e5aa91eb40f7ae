"""Ablation specs, reports and the robust-defaults rule."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pandas as pd
import pytest

from d3tune.errors import UsageError
from d3tune.reports.sweep_report import robust_defaults, summary_table
from d3tune.specs.sweep_spec import load_plan

SHIPPED = sorted(Path(__file__).resolve().parents[1].joinpath("ablations").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_ablations_load(path):
    plan = load_plan(path, "ablation")
    assert plan.cells and plan.kind == "ablation"


def test_cells_are_the_exact_product_of_axes_attacks_and_seeds(tmp_path):
    spec = tmp_path / "a.yaml"
    spec.write_text(textwrap.dedent("""
        name: a
        axes:
          defense.radius: [0.5, 1.0, 2.0]
          defense.p: [1, 2]
          zip:
            - {defense.lr: 0.01, defense.epochs: 10}
            - {defense.lr: 0.02, defense.epochs: 5}
        attacks: [badnets, blended]
        seeds: [0, 1, 2]
        """))
    plan = load_plan(spec, "ablation")
    assert len(plan.cells) == 3 * 2 * 2 * 2 * 3
    keys = {tuple(sorted(c.items())) for c in plan.cells}
    assert len(keys) == len(plan.cells)  # no duplicates
    assert all({"defense.radius", "defense.p", "defense.lr", "defense.epochs", "attack.name",
                "seed"} == set(c) for c in plan.cells)
    assert {(c["defense.lr"], c["defense.epochs"]) for c in plan.cells} == {(0.01, 10), (0.02, 5)}


def test_a_bad_cell_value_names_the_axis(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\naxes:\n  defense.radius: [1.0, -2.0]\n")
    with pytest.raises(UsageError, match=r"axes: defense\.radius"):
        load_plan(spec, "ablation")


def _results() -> pd.DataFrame:
    rows = []
    # setting A: great on badnets, fails on blended; B: good on both; C: best DER but costs ACC
    for setting, per_attack, drop in (("A", {"badnets": 0.99, "blended": 0.55}, 0.01),
                                      ("B", {"badnets": 0.90, "blended": 0.85}, 0.015),
                                      ("C", {"badnets": 0.99, "blended": 0.97}, 0.05)):
        for attack, der in per_attack.items():
            for seed in (0, 1):
                rows.append({"defense.init": setting, "attack.name": attack, "seed": seed,
                             "der": der - 0.01 * seed, "acc_drop": drop,
                             "acc_after": 0.9, "asr_after": 0.1, "ra_after": 0.8})
    return pd.DataFrame(rows)


def test_defaults_pick_the_best_worst_case_under_the_acc_budget():
    res = robust_defaults(_results(), ["defense.init"], max_acc_drop=0.02)
    assert res.best.setting == {"defense.init": "B"}
    assert res.best.worst_der == pytest.approx(0.84)
    assert res.runner_up.setting == {"defense.init": "A"}
    assert res.margin == pytest.approx(0.84 - 0.54)
    assert (res.considered, res.admissible) == (3, 2)
    loose = robust_defaults(_results(), ["defense.init"], max_acc_drop=0.1)
    assert loose.best.setting == {"defense.init": "C"}


def test_defaults_refuse_when_nothing_satisfies_the_budget():
    with pytest.raises(UsageError, match="no setting keeps the mean ACC drop within 0.005"):
        robust_defaults(_results(), ["defense.init"], max_acc_drop=0.005)
    with pytest.raises(UsageError, match="vary no setting"):
        robust_defaults(_results(), [], max_acc_drop=0.1)


def test_summary_is_mean_and_std_over_seeds():
    t = summary_table(_results(), ["defense.init", "attack.name"])
    row = t[(t["defense.init"] == "A") & (t["attack.name"] == "badnets")].iloc[0]
    assert row["der_mean"] == pytest.approx(0.985) and row["der_std"] == pytest.approx(0.005)
    assert row["n"] == 2
