"""Leaderboard: spec (equal budget and population for every defense, default spaces around the
defenses' own defaults), the table computed from MLflow read-back (hand-made store), and a tiny
leaderboard on a real local Ray: every defense gets exactly the budget, the default row runs the
defense's own defaults, holdout seeds are never used by a search, resume after an interruption
continues with the defense it was in."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from d3tune.errors import UsageError
from d3tune.defenses import DEFENSES, leaderboard_order
from d3tune.specs.leaderboard_spec import leaderboard_plan, load_leaderboard
from d3tune.runstate import study_storage

REPO = Path(__file__).parent.parent
BUILT_IN = ("d3", "ft", "fp", "nad", "fst", "ft_sam", "ibau", "sau", "anp")


def test_shipped_spec_gives_every_defense_the_same_budget_and_population():
    spec = load_leaderboard(REPO / "search_spaces" / "leaderboard_digits.yaml")
    assert spec.defenses == BUILT_IN and len(spec.searches) == 9
    first = spec.searches[0]
    assert len(first.members) == 18 and {m.seed for m in first.holdout} == {3, 4}
    for s in spec.searches:
        assert (s.budget, s.max_acc_drop, s.top_k, s.search_seed) == (
            first.budget, first.max_acc_drop, first.top_k, first.search_seed)
        assert s.members == first.members and s.holdout == first.holdout
        assert [r.name for r in s.references] == ["default"]
        assert s.references[0].setting == () and not s.references[0].replace_base
    assert {s.budget for s in spec.with_budget(3).searches} == {3}


@pytest.mark.parametrize("defense", BUILT_IN)
def test_default_space_contains_the_defense_defaults(defense):
    """Tuning can always find the default again: each searched knob's range holds it."""
    from d3tune.data import load_dataset  # noqa: F401  (registers the profiles)
    from d3tune.defenses import DEFENSES
    from d3tune.specs.fields import parse_dist as _parse_dist

    defaults = asdict(DEFENSES[defense].params())
    defaults.update({"lr": 0.01, "epochs": 40, "batch_size": 32, "weight_decay": 0.0})  # digits
    assert DEFENSES[defense].citation  # the registry entry carries the paper too
    for path, raw in DEFENSES[defense].space.items():
        knob = path.removeprefix("defense.")
        dist = _parse_dist(path, raw, path)
        value = defaults[knob]
        if dist.kind in ("uniform", "loguniform", "int"):
            assert dist.args[0] <= value <= dist.args[1], (defense, knob, value, dist.args)
        else:
            assert value in dist.args, (defense, knob, value, dist.args)


SPEC = {
    "name": "lb", "population": {"attacks": ["blended"], "seeds": [0]}, "holdout_seeds": [1],
    "defenses": ["ft", "fst"], "budget": 2, "top_k": 1, "max_acc_drop": 0.9,
    "base": {"train": {"epochs": 3}, "defense": {"epochs": 2}},
    "spaces": {"ft": {"defense.lr": {"loguniform": [0.005, 0.05]}},
               "fst": {"defense.alpha": {"uniform": [0.05, 0.5]}}},
    "max_concurrent": 1,
}


@pytest.mark.parametrize("edit,needle", [
    ({"defenses": ["ft", "fts"]}, "defenses[1]: unknown defense 'fts'"),
    ({"defenses": ["ft", "ft"]}, "defenses: a defense is listed twice"),
    ({"spaces": {"nad": {"defense.lr": {"uniform": [0.1, 0.2]}}}}, "spaces.nad: not a defense"),
    ({"spaces": {"ft": {"defense.alpha": {"uniform": [0.1, 0.2]}}}}, "[ft]: space.defense.alpha"),
    ({"budget": 0}, "budget"),
    ({"holdout_seeds": [0]}, "holdout_seeds: seed(s) [0]"),
    ({"base": {"defense": {"name": "d3"}}}, "base.defense.name"),
    ({"references": ["paper"]}, "references: unknown field"),
    ({"start_with_default": "yes"}, "start_with_default: expected true or false"),
    ({"spaces": {"ft": {"defense.lr": {"uniform": [0.02, 0.05]}}}},
     "[ft]: start_with.default: defense.lr: 0.01 lies outside the space"),
])
def test_bad_leaderboard_spec_names_the_field(edit, needle):
    with pytest.raises(UsageError, match=None) as exc:
        leaderboard_plan({**SPEC, **edit}, "lb.yaml")
    assert needle in str(exc.value), str(exc.value)


@pytest.fixture
def plugin_defense():
    """A defense registered as a plugin registers it (d3tune.defenses.register), with its
    search space, head and citation beside its code; removed again afterwards."""
    from dataclasses import dataclass

    from d3tune.defenses import register

    @dataclass(frozen=True)
    class Params:
        strength: float = 0.5

    register("shrink", Params, space={"defense.strength": {"uniform": [0.1, 0.9]}},
             uses_head=True, citation="A. Plugin: Shrinking heads, 2026", cost=0.1)(
        lambda model, x, y, cfg, ctx: None)
    yield "shrink"
    DEFENSES._items.pop("shrink", None)


def test_a_plugin_defense_joins_a_leaderboard_with_no_edit_to_d3tune(plugin_defense):
    spec = leaderboard_plan({**SPEC, "defenses": ["ft", plugin_defense],
                             "spaces": {"ft": SPEC["spaces"]["ft"]}}, "lb.yaml")
    search = spec.search_of(plugin_defense)
    assert [d.path for d in search.space] == ["defense.strength"]
    (point,) = search.start_points  # its own default, as for the built-in defenses
    assert dict(point) == {"defense.strength": 0.5}
    # without a `defenses` list: every registered defense with a space, D3 first, cheapest next
    everything = leaderboard_plan({k: v for k, v in SPEC.items()
                                   if k not in ("defenses", "spaces", "base")}, "lb.yaml")
    assert everything.defenses[:2] == ("d3", plugin_defense)
    assert everything.defenses[-1] == "anp" and set(BUILT_IN) < set(everything.defenses)
    assert leaderboard_order(["anp", "ft", "d3"]) == ("d3", "ft", "anp")


def test_a_defense_without_a_space_needs_one_in_the_spec():
    from d3tune.defenses import register

    register("spaceless")(lambda model, x, y, cfg, ctx: None)
    try:
        with pytest.raises(UsageError, match=r"spaces\.spaceless: defense 'spaceless' "
                                             r"registers no search space"):
            leaderboard_plan({**SPEC, "defenses": ["ft", "spaceless"],
                              "spaces": {"ft": SPEC["spaces"]["ft"]}}, "lb.yaml")
    finally:
        DEFENSES._items.pop("spaceless", None)


def test_every_search_starts_from_its_defense_defaults():
    """Equal budget, and the same first setting for all: each defense's own default, so with
    a small budget no defense's "tuned" row can lose to its default on the search members."""
    from d3tune.specs.robust_spec import member_config

    spec = leaderboard_plan(SPEC, "lb.yaml")
    for search in spec.searches:
        (point,) = search.start_points
        cfg = member_config(search, search.members[0], dict(point))
        default = member_config(search, search.members[0], {}, search.references[0])
        assert cfg == default, search.defense
    off = leaderboard_plan({**SPEC, "start_with_default": False}, "lb.yaml")
    assert all(s.start_points == () for s in off.searches)


# ---------------------------------------------------------------------------------------------
# The table, from a hand-made MLflow store


def _store(tmp_path, figures):
    """A leaderboard parent with one robust child per defense, each with a search child per
    trial and holdout children (default and chosen) holding per-member metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("lb", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp, tags={"d3tune.kind": "leaderboard"}).info.run_id
    for defense, (default, tuned, trials) in figures.items():
        rid = client.create_run(exp, tags={"mlflow.parentRunId": parent, "d3tune.kind": "robust",
                                           "d3tune.defense": defense,
                                           "d3tune.chosen": "trial-0"}).info.run_id
        client.log_param(rid, "max_acc_drop", 0.02)  # as the robust search logs it
        client.log_param(rid, "space_dims", len(defense) + 1)
        for i in range(trials):
            c = client.create_run(exp, tags={"mlflow.parentRunId": rid,
                                             "d3tune.phase": "search"}).info.run_id
            client.log_metric(c, "seconds.a_s0", 2.0)
        for label, ders in (("ref-default", default), ("trial-0", tuned)):
            c = client.create_run(exp, tags={"mlflow.parentRunId": rid, "d3tune.phase": "holdout",
                                             "d3tune.label": label}).info.run_id
            for member, der in ders.items():
                client.log_metric(c, f"der.{member}", der)
                client.log_metric(c, f"acc_drop.{member}", 0.01 if label == "trial-0" else 0.03)
                client.log_metric(c, f"seconds.{member}", 1.0)
            client.log_metric(c, "holdout_worst_der", 0.0)  # an aggregate the table must ignore
    return client, parent


def test_table_is_computed_from_mlflow_read_back(tmp_path):
    from d3tune.reports.leaderboard_report import read_back

    client, parent = _store(tmp_path, {
        "ft": ({"a_s3": 0.5, "b_s3": 0.9}, {"a_s3": 0.7, "b_s3": 0.95}, 2),
        "d3": ({"a_s3": 0.8, "b_s3": 0.99}, {"a_s3": 0.9, "b_s3": 0.97}, 2)})
    table, members = read_back(client, parent)
    assert list(table["defense"]) == ["d3", "ft"]  # sorted by tuned worst case
    d3 = table.iloc[0]
    assert d3["default_worst_der"] == 0.8 and d3["tuned_worst_der"] == 0.9
    assert d3["gain"] == pytest.approx(0.1)
    assert d3["default_acc_drop"] == pytest.approx(0.03)
    assert d3["tuned_acc_drop"] == pytest.approx(0.01)
    assert d3["tuned_ok"] and not d3["default_ok"]  # 3 points over the 2-point budget
    assert d3["trials"] == 2 and d3["tuned_s_per_member"] == 1.0
    assert d3["knobs"] == 3  # the space_dims param of d3's robust search run
    assert d3["compute_s"] == pytest.approx(2 * 2.0 + 4 * 1.0)  # search + holdout evaluations
    assert len(members) == 8 and set(members["row"]) == {"default", "tuned"}
    # a leaderboard reporting only its finished (or listed) defenses
    only, only_members = read_back(client, parent, ["ft"])
    assert list(only["defense"]) == ["ft"] and set(only_members["defense"]) == {"ft"}
    # change a stored member metric: the table follows the store
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              "tags.`d3tune.label` = 'trial-0'")
    ft_tuned = [r for r in runs if r.data.metrics["der.a_s3"] == 0.7][0]
    client.log_metric(ft_tuned.info.run_id, "der.a_s3", 0.99)
    table, _ = read_back(client, parent)
    assert list(table["defense"]) == ["ft", "d3"] and table.iloc[0]["tuned_worst_der"] == 0.95


def test_per_threat_model_means_answer_the_badnets_question(tmp_path):
    """The per-threat-model table averages a threat model's holdout seeds, per defense and row,
    keeps the leaderboard's order and goes into the markdown; ids with '_s' inside survive."""
    from d3tune.reports.leaderboard_report import markdown, per_threat_model, read_back, threat_model

    assert threat_model("input_aware_s12") == "input_aware"
    assert threat_model("bb-my_sweep") == "bb-my_sweep"  # no seed suffix: kept whole
    client, parent = _store(tmp_path, {
        "ft": ({"badnets_s3": 0.5, "badnets_s4": 0.7, "input_aware_s3": 0.9},
               {"badnets_s3": 0.6, "badnets_s4": 0.8, "input_aware_s3": 0.95}, 1),
        "d3": ({"badnets_s3": 0.9, "badnets_s4": 0.96, "input_aware_s3": 0.7},
               {"badnets_s3": 0.98, "badnets_s4": 1.0, "input_aware_s3": 0.8}, 1)})
    table, members = read_back(client, parent)
    wide = per_threat_model(table, members)
    assert list(table["defense"]) == ["d3", "ft"]
    assert list(zip(wide["defense"], wide["row"])) == [
        ("d3", "default"), ("d3", "tuned"), ("ft", "default"), ("ft", "tuned")]  # table order
    assert list(wide.columns) == ["defense", "row", "badnets", "input_aware"]
    assert wide["badnets"].tolist() == pytest.approx([0.93, 0.99, 0.6, 0.7])
    assert wide["input_aware"].tolist() == pytest.approx([0.7, 0.8, 0.9, 0.95])
    text = markdown(leaderboard_plan(SPEC, "lb.yaml"), table, 1.0, wide)
    assert "| d3 | 0.930 / 0.990 | 0.700 / 0.800 |" in text


def test_a_holdout_run_shared_by_two_rows_counts_once_in_compute(tmp_path):
    """When the default wins its search, the default and tuned rows share one holdout run
    (tag d3tune.shared_with on the second row): compute counts its seconds once."""
    from d3tune.reports.leaderboard_report import read_back

    same = {"a_s3": 0.5, "b_s3": 0.9}
    client, parent = _store(tmp_path, {"ft": (same, same, 2)})
    exp = client.get_run(parent).info.experiment_id
    (default,) = client.search_runs([exp], "tags.`d3tune.label` = 'ref-default'")
    table, _ = read_back(client, parent)
    assert table.iloc[0]["compute_s"] == pytest.approx(2 * 2.0 + 4 * 1.0)
    client.set_tag(default.info.run_id, "d3tune.shared_with", "trial-0")
    table, _ = read_back(client, parent)
    assert table.iloc[0]["compute_s"] == pytest.approx(2 * 2.0 + 2 * 1.0)
    assert table.iloc[0]["default_worst_der"] == 0.5  # its figures still read as before


def test_without_a_tuned_choice_the_best_finalist_is_shown_flagged_and_ranked_last(tmp_path):
    from d3tune.reports.leaderboard_report import markdown, read_back

    client, parent = _store(tmp_path, {"ft": ({"a_s3": 0.5}, {"a_s3": 0.7}, 1),
                                       "fst": ({"a_s3": 0.4}, {"a_s3": 0.6}, 1)})
    robust = client.search_runs([client.get_run(parent).info.experiment_id],
                                "tags.`d3tune.defense` = 'ft'")[0]
    client.set_tag(robust.info.run_id, "d3tune.chosen", "none")  # no finalist kept the budget
    client.log_metric([r for r in client.search_runs(
        [robust.info.experiment_id], f"tags.mlflow.parentRunId = '{robust.info.run_id}'")
        if r.data.tags.get("d3tune.label") == "trial-0"][0].info.run_id, "acc_drop.a_s3", 0.05)
    table, _ = read_back(client, parent)
    assert list(table["defense"]) == ["fst", "ft"]  # ft's 0.7 is over the budget: after fst
    ft = table.iloc[1]
    assert ft["tuned_label"] == "trial-0" and not ft["chosen"] and not ft["tuned_ok"]
    assert ft["tuned_worst_der"] == 0.7 and ft["gain"] == pytest.approx(0.2)
    spec = leaderboard_plan(SPEC, "lb.yaml")
    assert "| 2 | ft | 0.500 | 3.0! | 0.700 | 5.0! | 0.200 |" in markdown(spec, table, 1.0)


def test_without_a_choice_the_shown_finalist_is_the_searchs_best_not_the_holdouts(tmp_path):
    """The flagged tuned row is the finalist the search ranked first, even when another
    finalist scored higher on the holdout (on main the holdout's best was shown)."""
    from d3tune.reports.leaderboard_report import read_back

    client, parent = _store(tmp_path, {"ft": ({"a_s3": 0.5}, {"a_s3": 0.9}, 1)})
    exp = client.get_run(parent).info.experiment_id
    robust = client.search_runs([exp], "tags.`d3tune.defense` = 'ft'")[0]
    client.set_tag(robust.info.run_id, "d3tune.chosen", "none")
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{robust.info.run_id}'")
    trial0 = next(r for r in runs if r.data.tags.get("d3tune.label") == "trial-0")
    client.set_tag(trial0.info.run_id, "d3tune.search_rank", "1")
    client.set_tag(trial0.info.run_id, "d3tune.row_kind", "finalist")
    for label, rank, kind, der in (("trial-7", 0, "finalist", 0.6),
                                   ("trial-2", 2, "tradeoff", 0.95)):
        c = client.create_run(exp, tags={"mlflow.parentRunId": robust.info.run_id,
                                         "d3tune.phase": "holdout", "d3tune.label": label,
                                         "d3tune.search_rank": str(rank),
                                         "d3tune.row_kind": kind}).info.run_id
        client.log_metric(c, "der.a_s3", der)
        client.log_metric(c, "acc_drop.a_s3", 0.05)
    table, _ = read_back(client, parent)
    row = table.iloc[0]
    assert row["tuned_label"] == "trial-7" and row["tuned_worst_der"] == 0.6
    assert not row["chosen"]


# ---------------------------------------------------------------------------------------------
# A tiny leaderboard on a real local Ray, interrupted in its second defense and resumed


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_tiny_leaderboard_equal_budget_holdout_default_row_and_resume(local_ray, tmp_path,
                                                                      monkeypatch):
    import optuna
    from mlflow.tracking import MlflowClient

    import d3tune.search.leaderboard_driver as lb
    import d3tune.search.robust_driver as robust
    from d3tune.defenses import DEFENSES
    from d3tune.specs.robust_spec import member_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = leaderboard_plan({**SPEC, "storage": str(tmp_path / "tune"),
                             "cache_dir": str(tmp_path / "cache"), "experiment": "lb-test"},
                            str(tmp_path / "lb.yaml"))
    calls = []
    real_search, real_confirm = robust.robust_search, robust.confirm

    def spy(search, **kw):
        calls.append((search.defense, kw["resume"]))
        return real_search(search, **kw)

    def interrupted(search, *args, **kw):
        if search.defense == "fst":
            raise Interrupted  # killed after fst's search, before its confirmation
        return real_confirm(search, *args, **kw)

    monkeypatch.setattr(robust, "robust_search", spy)
    monkeypatch.setattr(robust, "confirm", interrupted)
    with pytest.raises(Interrupted):
        lb.run_leaderboard(spec)
    assert calls == [("ft", False), ("fst", False)]
    with pytest.raises(UsageError, match="--resume"):
        lb.run_leaderboard(spec)

    monkeypatch.setattr(robust, "confirm", real_confirm)
    outcome = lb.run_leaderboard(spec, resume=True)
    assert calls[2:] == [("fst", True)]  # ft finished before: not re-run; fst continued

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lb-test").experiment_id
    parents = client.search_runs([exp], "tags.`d3tune.kind` = 'leaderboard'")
    assert len(parents) == 1 and parents[0].info.run_id == outcome.parent_run_id
    searches = client.search_runs([exp], "tags.`d3tune.kind` = 'robust'")
    confirmed = {}  # defense -> (chosen label, holdout label -> metrics), read here directly
    assert sorted(r.data.tags["d3tune.defense"] for r in searches) == ["fst", "ft"]
    for r in searches:
        assert r.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{r.info.run_id}'")
        trials = [c for c in children if c.data.tags["d3tune.phase"] == "search"]
        holdout = {c.data.tags["d3tune.label"]: c for c in children
                   if c.data.tags["d3tune.phase"] == "holdout"}
        assert len(trials) == spec.budget  # exactly the budget, after the resume too
        for c in trials:  # holdout seeds never used by a search (read back from MLflow)
            assert c.data.params["seeds"] == "0"
            assert {k for k in c.data.metrics if k.startswith("der.")} == {"der.blended_s0"}
        confirmed[r.data.tags["d3tune.defense"]] = (r.data.tags.get("d3tune.chosen"), {
            label: c.data.metrics for label, c in holdout.items()})
        for c in holdout.values():
            assert c.data.params["seeds"] == "1"
            assert {k for k in c.data.metrics if k.startswith("der.")} == {"der.blended_s1"}
        # the default row changes no knob: only the defense and the spec's base epochs
        default = holdout["ref-default"].data.params
        assert {k for k in default if k.startswith("defense.")} == {"defense.name",
                                                                    "defense.epochs"}
        defense = r.data.tags["d3tune.defense"]
        study = optuna.load_study(study_name=f"lb-{defense}", storage=study_storage(
            tmp_path / "tune" / f"lb-{defense}.d3tune"))
        assert len(study.trials) == spec.budget
        search = next(s for s in spec.searches if s.defense == defense)
        assert study.trials[0].params == dict(search.start_points[0])  # the default, first
    for search in spec.searches:  # ... and it resolves to the defense's own defaults
        ref = search.references[0]
        cfg = member_config(search, search.holdout[0], {}, ref)
        assert cfg.defense.params == DEFENSES[search.defense].params()
        assert (cfg.defense.lr, cfg.defense.batch_size, cfg.defense.epochs) == (0.01, 32, 2)

    table = outcome.table
    for _, row in table.iterrows():  # each figure is the holdout run's own metric
        chosen, runs = confirmed[row["defense"]]
        assert row["default_worst_der"] == pytest.approx(runs["ref-default"]["holdout_worst_der"])
        assert row["default_acc_drop"] == pytest.approx(
            runs["ref-default"]["holdout_mean_acc_drop"])
        assert row["chosen"] == (chosen in runs) and row["tuned_label"] != "ref-default"
        if row["chosen"]:
            assert row["tuned_label"] == chosen
        assert row["tuned_worst_der"] == pytest.approx(
            runs[row["tuned_label"]]["holdout_worst_der"])
        assert row["gain"] == pytest.approx(row["tuned_worst_der"] - row["default_worst_der"])
    assert sorted(table["defense"]) == ["fst", "ft"] and set(table["trials"]) == {2}
    from d3tune.search.robust_driver import space_dims

    for search in spec.searches:
        (row,) = table[table["defense"] == search.defense].to_dict("records")
        assert row["knobs"] == space_dims(search) >= 1
    assert (table["compute_s"] > 0).all()
    prog = pd.read_csv(outcome.out_dir / "progress.csv")
    assert sorted(prog.groupby("defense").size().items()) == [("fst", 2), ("ft", 2)]
    for name in ("leaderboard.md", "leaderboard.html", "leaderboard.csv", "leaderboard.png",
                 "progress.png"):
        assert (outcome.out_dir / name).stat().st_size > 0
    assert (outcome.out_dir / "leaderboard.html").read_text().count("data:image/png;base64,") == 2
    per_model = pd.read_csv(outcome.out_dir / "per_threat_model.csv")
    assert sorted(per_model["defense"]) == ["fst", "fst", "ft", "ft"]
    assert list(per_model.columns) == ["defense", "row", "blended"]
    report = (outcome.out_dir / "leaderboard.md").read_text()
    assert "| fst | " in report.split("## Mean holdout DER per threat model")[1]
    for _, row in table.iterrows():
        if row["chosen"]:  # a YAML only for a setting that kept the ACC budget
            assert (spec.state_dir / "tuned" / f"{row['defense']}.yaml").exists()


def test_search_dimensionality_of_the_shipped_spec():
    """The table's knobs column: D3 and NAD search 8 knobs, the fine-tuning family 4."""
    from d3tune.search.robust_driver import space_dims

    spec = load_leaderboard(Path(__file__).parent.parent / "search_spaces" /
                            "leaderboard_digits.yaml")
    dims = {s.defense: space_dims(s) for s in spec.searches}
    assert dims["d3"] == 8 and dims["nad"] == 8 and dims["ft"] == 4 and dims["fst"] == 4


def test_progress_is_best_so_far_over_trials_and_compute(tmp_path):
    """Per defense, in the order the search ran: member-seconds spent and the best complete
    within-budget worst case so far; pruned or over-budget settings never raise it."""
    from mlflow.tracking import MlflowClient

    from d3tune.reports.leaderboard_report import plot_progress, progress

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("lb", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp, tags={"d3tune.kind": "leaderboard"}).info.run_id
    rid = client.create_run(exp, tags={"mlflow.parentRunId": parent, "d3tune.kind": "robust",
                                       "d3tune.defense": "ft"}).info.run_id
    # (start ms, worst_der, admissible, pruned, seconds per member): created out of order
    for start, worst, ok, pruned, secs in ((3000, 0.95, "false", "false", (1.0, 1.0)),
                                           (1000, 0.60, "true", "false", (2.0, 2.0)),
                                           (4000, 0.99, "false", "true", (0.5,)),
                                           (2000, 0.70, "true", "false", (3.0, 1.0))):
        c = client.create_run(exp, start_time=start, tags={
            "mlflow.parentRunId": rid, "d3tune.phase": "search", "d3tune.admissible": ok,
            "d3tune.pruned": pruned}).info.run_id
        client.log_metric(c, "worst_der", worst)
        for i, v in enumerate(secs):
            client.log_metric(c, f"seconds.m{i}", v)
    prog = progress(client, parent)
    assert list(prog["trial"]) == [1, 2, 3, 4]
    assert list(prog["seconds"]) == [4.0, 4.0, 2.0, 0.5]
    assert list(prog["cum_seconds"]) == [4.0, 8.0, 10.0, 10.5]
    assert list(prog["best_so_far"]) == [0.6, 0.7, 0.7, 0.7]  # 0.95 over budget, 0.99 pruned
    assert list(prog["pruned"]) == [False, False, False, True]
    assert plot_progress(prog, tmp_path).stat().st_size > 0
