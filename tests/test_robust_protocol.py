"""The robust protocol's held-out parts: search and holdout score on disjoint halves of each
test set (``split_test``), and leave-one-attack-out searches confirm each attack family on a
search that never saw it."""
from __future__ import annotations

import textwrap
from dataclasses import replace

import pandas as pd
import pytest
import torch

from d3tune.data import TEST_SPLITS, load_dataset, split_test, half_indices
from d3tune.errors import UsageError
from d3tune.search.robust_loo import leave_one_attack_out, run_leave_one_attack_out
from d3tune.specs.robust_spec import member_config, robust_plan
from d3tune.yamlio import parse_yaml

SPEC = """
name: proto
defense: d3
base:
  train: {epochs: 1}
  defense: {epochs: 1}
population:
  attacks: [badnets, blended, {name: blended, alpha: 0.1}, wanet]
  seeds: [0]
holdout_seeds: [1, 2]
budget: 2
top_k: 1
space:
  defense.lr: {loguniform: [0.005, 0.05]}
references: [profile]
"""


def spec_data(text: str = SPEC) -> dict:
    return parse_yaml(textwrap.dedent(text), "spec")


# ---------------------------------------------------------------------------------------------
# The test-set split


def test_test_halves_are_disjoint_stratified_fixed_and_cover_the_set():
    y = torch.arange(101) % 7  # uneven classes, odd sizes
    search, holdout = half_indices(y, "search"), half_indices(y, "holdout")
    assert set(search.tolist()).isdisjoint(holdout.tolist())
    assert sorted(search.tolist() + holdout.tolist()) == list(range(101))
    for c in range(7):  # each class split as evenly as its count allows
        n_s, n_h = int((y[search] == c).sum()), int((y[holdout] == c).sum())
        assert n_s - n_h in (0, 1)
    assert torch.equal(search, half_indices(y, "search"))  # part of the data: fixed
    assert not torch.equal(search, torch.arange(len(search)))  # shuffled, not a prefix
    with pytest.raises(ValueError):
        half_indices(y, "all")


def test_split_test_cuts_only_the_test_set():
    data = load_dataset("digits")
    half = split_test(data, "search")
    assert torch.equal(half.x_train, data.x_train) and len(half.y_test) < len(data.y_test)
    assert split_test(data, "all") is data
    assert len(split_test(data, "holdout").y_test) + len(half.y_test) == len(data.y_test)


def test_search_and_holdout_members_score_on_disjoint_test_images_of_one_cached_model():
    from d3tune.cache import cache_key
    from d3tune.trial import attack_settings, backdoored_model

    spec = robust_plan(spec_data(), "proto.yaml")
    assert {m.fields["data.test_split"] for m in spec.members} == {"search"}
    assert {m.fields["data.test_split"] for m in spec.holdout} == {"holdout"}
    data = load_dataset("digits")
    search_cfg = member_config(spec, spec.members[0], {})
    holdout_cfg = replace(search_cfg, data=replace(search_cfg.data, test_split="holdout"))
    assert search_cfg.data.test_split == "search"
    # the backdoored model does not depend on the split: one cache entry serves both halves
    assert cache_key(attack_settings(search_cfg, data)) == \
        cache_key(attack_settings(holdout_cfg, data))
    dev = torch.device("cpu")
    sets = {}
    for cfg in (search_cfg, holdout_cfg, replace(search_cfg, data=replace(
            search_cfg.data, test_split="all"))):
        model, test_sets, _, _ = backdoored_model(cfg, data, dev, None, None)
        sets[cfg.data.test_split] = test_sets()
    key = lambda x: {bytes(img.numpy()) for img in x}  # noqa: E731
    s, h, a = sets["search"], sets["holdout"], sets["all"]
    assert key(s.x_clean).isdisjoint(key(h.x_clean))
    assert len(s.y_clean) + len(h.y_clean) == len(a.y_clean)
    assert key(s.x_bd).isdisjoint(key(h.x_bd))  # poisoned images come from each half
    assert len(s.y_bd_true) + len(h.y_bd_true) == len(a.y_bd_true)
    assert key(s.x_bd) | key(h.x_bd) == key(a.x_bd)


def test_split_test_can_be_turned_off_and_the_population_owns_it():
    spec = robust_plan(spec_data(SPEC + "split_test: false\n"), "proto.yaml")
    assert all("data.test_split" not in m.fields for m in spec.members + spec.holdout)
    assert member_config(spec, spec.holdout[0], {}).data.test_split == "all"
    with pytest.raises(UsageError, match="split_test: expected true or false"):
        robust_plan(spec_data(SPEC + "split_test: maybe\n"), "proto.yaml")
    with pytest.raises(UsageError, match="base.data.test_split"):
        robust_plan(spec_data(SPEC.replace("train: {epochs: 1}",
                                           "data: {test_split: holdout}")), "proto.yaml")
    assert "holdout" in TEST_SPLITS


def test_a_run_refuses_an_unknown_test_split():
    from d3tune.config import trial_config

    with pytest.raises(UsageError, match="data.test_split.*'half'"):
        trial_config({"data": {"test_split": "half"}})


# ---------------------------------------------------------------------------------------------
# Leave-one-attack-out


def test_leave_one_attack_out_holds_out_each_family_once():
    specs = leave_one_attack_out(spec_data(), "proto.yaml")
    assert [f for f, _ in specs] == ["badnets", "blended", "wanet"]
    by = dict(specs)
    blended = by["blended"]
    assert blended.name == "proto-without-blended"
    searched = {m.fields["attack.name"] for m in blended.members}
    held = {m.id for m in blended.holdout}
    assert searched == {"badnets", "wanet"}  # both blended variants left the search
    assert held == {"blended_s1", "blended_s2", "blended-alpha0-1_s1", "blended-alpha0-1_s2"}
    for family, spec in specs:
        assert family not in {m.fields["attack.name"] for m in spec.members}
        assert {m.fields["attack.name"] for m in spec.holdout} == {family}
        assert {m.seed for m in spec.holdout} == {1, 2} and spec.budget == 2
        assert [r.name for r in spec.references] == ["profile"]


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.replace("[badnets, blended, {name: blended, alpha: 0.1}, wanet]",
                         "[blended, {name: blended, alpha: 0.1}]"),
     "population.attacks: leave-one-attack-out needs at least two attack families"),
    (lambda s: s + "holdout_attacks: [sig]\n", "holdout_attacks: leave-one-attack-out chooses"),
    (lambda s: s.replace("budget: 2", "budget: 0"), "proto.yaml: budget"),
])
def test_bad_leave_one_attack_out_spec_names_the_field(edit, needle):
    with pytest.raises(UsageError, match=needle):
        leave_one_attack_out(spec_data(edit(SPEC)), "proto.yaml")


class _Outcome:
    def __init__(self, spec, held_worst):
        self.spec = spec
        self.chosen = {"label": "trial-0", "shown": {"defense.lr": 0.01},
                       "search_worst_der": 0.9, "holdout_worst_der": held_worst,
                       "holdout_mean_der": held_worst + 0.02, "holdout_mean_acc_drop": 0.01}
        self.holdout = pd.DataFrame([
            {"label": "trial-0", "kind": "finalist", "holdout_worst_der": held_worst},
            {"label": "ref-profile", "kind": "reference", "holdout_worst_der": 0.5}])


def test_leave_one_attack_out_runs_each_search_and_tabulates_the_held_out_figures(tmp_path):
    specs = [(f, replace(s, storage=str(tmp_path / "tune")))
             for f, s in leave_one_attack_out(spec_data(), "proto.yaml")]
    calls = []

    def fake_search(spec, *, resume, address, out):
        calls.append((spec.name, resume, out.name))
        return _Outcome(spec, 0.1 * len(calls))

    table = run_leave_one_attack_out(specs, out_dir=tmp_path / "out", search=fake_search)
    assert [c[0] for c in calls] == ["proto-without-badnets", "proto-without-blended",
                                     "proto-without-wanet"]
    assert all(not resume for _, resume, _ in calls)  # nothing to resume: new searches
    assert list(table["held_out"]) == ["badnets", "blended", "wanet"]
    assert list(table["held_out_worst_der"]) == pytest.approx([0.1, 0.2, 0.3])
    assert list(table["ref-profile_worst_der"]) == [0.5] * 3
    saved = pd.read_csv(tmp_path / "out" / "proto.leave_one_attack_out.csv")
    assert list(saved["setting"]) == ["lr=0.01"] * 3

    # --resume resumes the searches that started and starts the ones that did not
    (tmp_path / "tune" / "proto-without-badnets.d3tune").mkdir(parents=True)
    calls.clear()
    run_leave_one_attack_out(specs, resume=True, out_dir=tmp_path / "out", search=fake_search)
    assert [resume for _, resume, _ in calls] == [True, False, False]


def test_cli_leave_one_attack_out_refuses_out_and_bad_specs(tmp_path, capsys):
    from d3tune.cli import main

    path = tmp_path / "proto.yaml"
    path.write_text(textwrap.dedent(SPEC) + "holdout_attacks: [sig]\n")
    assert main(["robust", str(path), "--leave-one-attack-out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holdout_attacks" in err[0]
    assert main(["robust", str(path), "--leave-one-attack-out", "--out", "x.yaml"]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow  # two tiny searches on a real local Ray: ~1-2 min on 2 cores
def test_leave_one_attack_out_end_to_end(local_ray, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    text = SPEC.replace("[badnets, blended, {name: blended, alpha: 0.1}, wanet]",
                        "[badnets, blended]").replace("holdout_seeds: [1, 2]",
                                                       "holdout_seeds: [1]")
    data = spec_data(text)
    data.update(budget=1, min_asr=0.0, max_acc_drop=1.0, storage=str(tmp_path / "tune"),
                cache_dir=str(tmp_path / "cache"), experiment="loo-test")
    specs = leave_one_attack_out(data, "proto.yaml")
    table = run_leave_one_attack_out(specs, out_dir=tmp_path / "out")
    assert list(table["held_out"]) == ["badnets", "blended"]
    assert table["held_out_worst_der"].between(0, 1).all()
    assert table["ref-profile_worst_der"].between(0, 1).all()
    assert (tmp_path / "out" / "proto.leave_one_attack_out.csv").is_file()
    # read back from MLflow: each search scored only the other attack, its holdout only the
    # held-out one, on the holdout seed
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("loo-test").experiment_id])
    for family, spec in specs:
        parent = next(r for r in runs if r.info.run_name == spec.name)
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        for r in kids:
            members = {k.split(".", 1)[1] for k in r.data.metrics if k.startswith("der.")}
            phase = r.data.tags["d3tune.phase"]
            other = ({"badnets", "blended"} - {family}).pop()
            assert members == ({f"{other}_s0"} if phase == "search" else {f"{family}_s1"})
