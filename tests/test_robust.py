"""Robust search: the pure decision rules on hand-made member reports (exact pruning, the ACC
constraint, member order), spec validation, and a tiny search on a real local Ray (holdout
seeds never seen by the search, member exclusion, MLflow layout, YAML usable by ``run``)."""
from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest

from d3tune.errors import UsageError
from d3tune.search.mlflow_callback import load_ledger
from d3tune.search.robust_rules import (Finished, choose, finalists, incumbent, member_order,
                                 tradeoff_extras,
                                 prune_threshold, pruning_savings, should_prune)
from d3tune.specs.robust_spec import load_robust, member_config, robust_plan
from d3tune.runstate import study_storage

# ---------------------------------------------------------------------------------------------
# Exact pruning on hand-made reports


def test_no_pruning_until_top_k_admissible_settings_have_finished():
    one = [Finished(0.9, 0.01)]
    assert prune_threshold([], 1, 0.03) is None
    assert prune_threshold(one, 2, 0.03) is None  # only one finalist known: anything may enter
    assert not should_prune(0.0, prune_threshold(one, 2, 0.03))
    assert prune_threshold(one, 1, 0.03) == 0.9


def test_prunes_only_when_the_running_worst_case_is_below_the_kth_best():
    finished = [Finished(0.95, 0.01), Finished(0.80, 0.02), Finished(0.70, 0.00)]
    thr = prune_threshold(finished, 2, 0.03)
    assert thr == 0.80  # the second best admissible final worst case
    assert should_prune(0.79, thr)
    assert not should_prune(0.80, thr)  # a tie may still enter the top 2: never pruned
    assert not should_prune(0.85, thr)


def test_inadmissible_settings_never_set_the_bar():
    # 0.99 blew the ACC budget: it is not a finalist, so it must not raise the threshold
    finished = [Finished(0.99, 0.10), Finished(0.60, 0.02)]
    assert prune_threshold(finished, 1, 0.03) == 0.60
    assert prune_threshold([Finished(0.99, 0.10)], 1, 0.03) is None
    assert not should_prune(0.7, prune_threshold(finished, 1, 0.03))


def _search(settings, top_k, max_drop, prune):
    """Sequential search over hand-made settings (each a list of (der, acc_drop) per member),
    member reports built by the trainable's own ``summary`` and stopped by the real
    ``ExactPruning`` scheduler: the finalists and how many member evaluations ran."""
    from ray.tune.schedulers import TrialScheduler

    from d3tune.search.robust_pruning import ExactPruning
    from d3tune.search.robust_trainable import complete, summary

    scheduler = ExactPruning(top_k, max_drop)
    trials, evaluated, rows = [], 0, []
    for i, members in enumerate(settings):
        trial = _Trial(str(i), "RUNNING")
        trials.append(trial)
        reports = []
        for j, (der, drop) in enumerate(members):
            reports.append({"member": f"m{j}", "der": der, "acc_drop": drop})
            evaluated += 1
            trial.last_result = summary(reports, len(members))
            if prune and scheduler.on_trial_result(_Controller(trials), trial,
                                                   trial.last_result) == TrialScheduler.STOP:
                break
        trial.status = "TERMINATED"
        if complete(trial.last_result):
            rows.append({"id": i, **trial.last_result, "complete": True})
    picked = finalists(rows, top_k, max_drop)
    return [r["id"] for r in picked], evaluated


@pytest.mark.parametrize("seed", range(20))
def test_pruning_is_exact_the_finalists_equal_an_unpruned_search(seed):
    rng = random.Random(seed)
    settings = [[(rng.random(), rng.uniform(-0.01, 0.06)) for _ in range(6)] for _ in range(25)]
    for top_k in (1, 3):
        pruned, n_pruned = _search(settings, top_k, 0.03, prune=True)
        full, n_full = _search(settings, top_k, 0.03, prune=False)
        assert pruned == full
        assert n_pruned <= n_full == 25 * 6


def test_pruning_saves_evaluations_on_a_clear_case():
    settings = [[(0.9, 0.0)] * 4, [(0.2, 0.0)] + [(0.95, 0.0)] * 3]
    ids, evaluated = _search(settings, 1, 0.03, prune=True)
    assert ids == [0] and evaluated == 5  # the second setting stopped after its first member
    rows = [{"members_total": 4, "members_done": 4}, {"members_total": 4, "members_done": 1,
                                                      "pruned": True}]
    assert pruning_savings(rows) == (3, 8)


# ---------------------------------------------------------------------------------------------
# The ACC constraint and the choice


def test_inadmissible_setting_is_never_the_incumbent_or_a_finalist():
    rows = [{"worst_der": 0.99, "mean_der": 0.99, "mean_acc_drop": 0.08, "complete": True},
            {"worst_der": 0.70, "mean_der": 0.80, "mean_acc_drop": 0.02, "complete": True},
            {"worst_der": 0.95, "mean_der": 0.95, "mean_acc_drop": 0.00, "complete": False}]
    assert incumbent(rows, 0.03) is rows[1]
    assert finalists(rows, 3, 0.03) == [rows[1]]
    # a trade-off budget confirms the 8-point setting too, but as a trade-off row, never a
    # finalist (it broke the search's budget: it cannot be chosen)
    assert tradeoff_extras(rows, [rows[1]], (0.10,)) == [(0.10, rows[0])]
    assert tradeoff_extras(rows, [rows[1]], (0.03,)) == []  # already a finalist


def test_holdout_confirms_in_search_order_and_never_selects():
    """The search's rank-1 finalist is the choice, whatever the holdout says: the best holdout
    worst case never wins (a lower-ranked setting would win on holdout noise), and a rank-1
    finalist that breaks the ACC budget on the holdout is reported as breaking it, never
    replaced by the next finalist (which would make the holdout select after all)."""
    rows = [{"label": "second", "search_rank": 1, "holdout_worst_der": 0.97,
             "holdout_mean_der": 0.98, "holdout_mean_acc_drop": 0.01},
            {"label": "first", "search_rank": 0, "holdout_worst_der": 0.81,
             "holdout_mean_der": 0.9, "holdout_mean_acc_drop": 0.03},
            {"label": "third", "search_rank": 2, "holdout_worst_der": 0.99,
             "holdout_mean_der": 0.99, "holdout_mean_acc_drop": 0.00}]
    assert choose(rows)["label"] == "first"  # though 'second' scored higher on holdout
    rows[1]["holdout_mean_acc_drop"] = 0.05  # the search's best breaks the budget on holdout
    assert choose(rows)["label"] == "first"  # still the choice (reported as breaking it)
    assert choose([]) is None


def test_tradeoff_table_reads_every_confirmed_row():
    from d3tune.search.robust_rules import tradeoff

    rows = [{"label": "a", "holdout_worst_der": 0.97, "holdout_mean_der": 0.98,
             "holdout_mean_acc_drop": 0.05},
            {"label": "b", "holdout_worst_der": 0.81, "holdout_mean_der": 0.9,
             "holdout_mean_acc_drop": 0.03},
            {"label": "c", "holdout_worst_der": 0.81, "holdout_mean_der": 0.8,
             "holdout_mean_acc_drop": 0.01}]
    (b3, r3), (b5, r5), (b0, r0) = tradeoff(rows, (0.03, 0.05, 0.0))
    assert r3["label"] == "b"  # a is better but over budget; b wins the tie on mean DER
    assert r5["label"] == "a" and r0 is None


def test_members_the_incumbent_failed_on_come_first():
    ids = ["badnets_s0", "blended_s0", "wanet_s0", "lf_s0"]
    assert member_order(ids, None) == ids
    order = member_order(ids, {"badnets_s0": 0.99, "blended_s0": 0.55, "wanet_s0": 0.97})
    assert order == ["lf_s0", "blended_s0", "wanet_s0", "badnets_s0"]


# ---------------------------------------------------------------------------------------------
# Spec


SPEC = """
name: tiny
defense: d3
base:
  train: {epochs: 3}
  defense: {epochs: 2}
population:
  attacks: [blended, {name: badnets, ratio: 0.0}]   # the second plants nothing: left out
  seeds: [0]
holdout_seeds: [1]
budget: 2
top_k: 1
max_acc_drop: 0.9
space:
  defense.lr: {loguniform: [0.005, 0.05]}
  defense.eps: {uniform: [0.0, 0.3]}
references:
  - name: gentle
    setting: {defense.epochs: 2, defense.lr: 0.001}
max_concurrent: 2
"""


def test_spec_members_and_cache_keys_match_single_runs(tmp_path):
    spec = robust_plan(load_yaml_text(SPEC.replace("train: {epochs: 3}\n  ", "")), "tiny.yaml")
    assert [m.id for m in spec.members] == ["blended_s0", "badnets-ratio0-0_s0"]
    assert [m.id for m in spec.holdout] == ["blended_s1", "badnets-ratio0-0_s1"]
    cfg = member_config(spec, spec.holdout[0], {"defense.lr": 0.02})
    assert cfg.seed == 1 and cfg.attack.name == "blended" and cfg.defense.lr == 0.02
    assert cfg.eval.every == cfg.defense.epochs  # only the final metrics are computed
    from d3tune.cache import cache_key
    from d3tune.cli import build_parser, trial_dict_from_args
    from d3tune.config import resolve, trial_config
    from d3tune.data import load_dataset
    from d3tune.trial import attack_settings

    single = resolve(trial_config(trial_dict_from_args(
        build_parser().parse_args(["run", "--attack", "blended", "--seed", "1"]))))
    data = load_dataset("digits")
    assert cache_key(attack_settings(cfg, data)) == cache_key(attack_settings(single, data))


def load_yaml_text(text: str):
    from d3tune.yamlio import parse_yaml

    return parse_yaml(textwrap.dedent(text), "spec")


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.replace("holdout_seeds: [1]", "holdout_seeds: [0, 1]"), "holdout_seeds"),
    (lambda s: s.replace("defense.eps: {uniform", "seed: {choice: [0, 1]}\n  x: {uniform"),
     "space.seed"),
    (lambda s: s.replace("  defense: {epochs: 2}", "  attack: {name: wanet}"), "base.attack.name"),
    (lambda s: s.replace("references:", "references:\n  - papper"), "did you mean 'paper'"),
    (lambda s: s.replace("budget: 2", "budget: 0"), "budget"),
    (lambda s: s + "holdout_attacks: [blended]\n", "holdout_attacks: 'blended' is also a population"),
    (lambda s: s + "holdout_attacks: [{name: badnets, ratio: 0.2}]\n",
     "holdout_attacks: 'badnets-ratio0-2' is also a population"),
    (lambda s: s + "holdout_attacks: [wanet, wanet]\n", "holdout_attacks: listed twice"),
    (lambda s: s + "holdout_attacks: [wanett]\n", "wanett"),
    (lambda s: s + "holdout_attacks: []\n", "holdout_attacks: expected a non-empty list"),
])
def test_bad_robust_spec_names_the_field(edit, needle):
    with pytest.raises(UsageError, match=needle):
        robust_plan(load_yaml_text(edit(SPEC)), "tiny.yaml")


def test_holdout_attacks_confirm_on_threat_models_the_search_never_saw():
    text = SPEC.replace("seeds: [0]", "seeds: [0]\n  archs: [cnn, preactresnet18]")
    spec = robust_plan(load_yaml_text(text + "holdout_attacks: [wanet, {name: sig, delta: 30}]\n"),
                       "tiny.yaml")
    searched = {m.fields["attack.name"] for m in spec.members}
    held = {m.fields["attack.name"] for m in spec.holdout}
    assert searched == {"blended", "badnets"} and held == {"wanet", "sig"}
    assert [m.id for m in spec.holdout] == ["wanet_cnn_s1", "wanet_preactresnet18_s1",
                                            "sig-delta30_cnn_s1", "sig-delta30_preactresnet18_s1"]
    sig = member_config(spec, spec.holdout[2], {})
    assert sig.attack.params.delta == 30 and sig.seed == 1 and sig.model.arch == "cnn"


def test_shipped_spec_loads():
    spec = load_robust(Path(__file__).parent.parent / "search_spaces" / "robust_d3_digits.yaml")
    assert len(spec.members) == 18 and {m.seed for m in spec.holdout} == {3, 4}
    assert {r.name for r in spec.references} >= {"paper", "profile"}
    assert spec.max_acc_drop == 0.03


# ---------------------------------------------------------------------------------------------
# A tiny search on a real local Ray


@pytest.mark.slow  # ~40 s on an idle 2-core machine, 110 s under load: over the default budget
def test_tiny_robust_search_end_to_end(local_ray, tmp_path, monkeypatch, caplog):
    import optuna
    from mlflow.tracking import MlflowClient

    from d3tune.config import trial_config
    from d3tune.search.robust_driver import robust_search
    from d3tune.yamlio import load_yaml

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = load_yaml_text(SPEC)
    data.update(storage=str(tmp_path / "tune"), cache_dir=str(tmp_path / "cache"),
                experiment="robust-test")
    spec = robust_plan(data, str(tmp_path / "tiny.yaml"))
    caplog.set_level("WARNING")
    outcome = robust_search(spec, out=tmp_path / "defaults.yaml")

    # no poison, no backdoor (ASR before ~0.01): left out with a warning naming it, not scored
    pop = outcome.population.set_index("member")
    for member in ("badnets-ratio0-0_s0", "badnets-ratio0-0_s1"):
        assert pop.loc[member, "excluded"] and not pop.loc["blended_s0", "excluded"]
        assert any(member in r.getMessage() and "left out" in r.getMessage()
                   for r in caplog.records)
    assert len(outcome.search) == 2 and outcome.search["complete"].all()
    # A setting resumes from its member rows, not from the ledger: its checkpoint stays after it
    # ended (sweeps drop theirs), so a driver killed before Tune's next snapshot re-runs nothing
    assert len(list((tmp_path / "tune" / "tiny").glob("*/checkpoint_*"))) == 2
    kinds = sorted(outcome.holdout["kind"])
    assert kinds == ["finalist", "reference"]  # top_k 1, plus the named reference

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("robust-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["d3tune.kind"] == "robust"
    search = [r for r in children if r.data.tags.get("d3tune.phase") == "search"]
    holdout = [r for r in children if r.data.tags.get("d3tune.phase") == "holdout"]
    assert len(search) == 2 and len(holdout) == len(outcome.holdout)
    for r in search:  # holdout seeds never used during the search, read back from MLflow
        assert r.data.params["seeds"] == "0"
        members = {k.split(".", 1)[1] for k in r.data.metrics if k.startswith("der.")}
        assert members == {"blended_s0"}  # and the excluded member was never scored
        assert r.data.metrics["worst_der"] == pytest.approx(r.data.metrics["der.blended_s0"])
    for r in holdout:
        assert r.data.params["seeds"] == "1"
        assert {k for k in r.data.metrics if k.startswith("der.")} == {"der.blended_s1"}

    # the ACC budget reached Optuna as a constraint, stored per trial
    study = optuna.load_study(study_name="tiny",
                              storage=study_storage(tmp_path / "tune" / "tiny.d3tune"))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    for t in done:
        assert t.constraints == {"max_acc_drop": pytest.approx(
            t.user_attrs["mean_acc_drop"] - spec.max_acc_drop)}

    # the chosen defaults are a `d3tune run --config` file
    assert outcome.chosen is not None and outcome.chosen["kind"] == "finalist"
    cfg = trial_config(load_yaml(tmp_path / "defaults.yaml"))
    assert cfg.defense.name == "d3" and cfg.defense.lr == pytest.approx(
        outcome.chosen["setting"]["defense.lr"])
    report = outcome.report_dir
    for name in ("report.md", "report.html", "worst_der_over_trials.png", "heatmap_holdout.png"):
        assert (report / name).stat().st_size > 0
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "<table>" in page
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= artifacts

    # a second search of the same name needs --resume; resuming a finished one re-runs nothing
    with pytest.raises(UsageError, match="--resume"):
        robust_search(spec)
    again = robust_search(spec, resume=True, out=tmp_path / "again.yaml")
    assert len(again.search) == 2
    assert again.chosen["label"] == outcome.chosen["label"]
    assert len(client.search_runs([exp.experiment_id])) == len(runs)


@pytest.mark.slow
def test_compute_budget_ends_a_real_search_early(local_ray, tmp_path, monkeypatch):
    """A search with room for 6 settings but 1 member-second of compute stops after its first
    reports; the settings it cut are PRUNED in Optuna, never COMPLETE."""
    import optuna

    from d3tune.search.robust_driver import robust_search

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = load_yaml_text(SPEC)
    data.update(population={"attacks": ["blended"], "seeds": [0, 1]}, holdout_seeds=[2], budget=6,
                compute_budget_s=1.0, references=[], storage=str(tmp_path / "tune"),
                cache_dir=str(tmp_path / "cache"), experiment="robust-compute")
    spec = robust_plan(data, str(tmp_path / "tiny.yaml"))
    outcome = robust_search(spec, out=tmp_path / "d.yaml")
    assert 1 <= len(outcome.search) < 6
    study = optuna.load_study(study_name="tiny",
                              storage=study_storage(tmp_path / "tune" / "tiny.d3tune"))
    states = optuna.trial.TrialState
    assert len(study.trials) < 6
    for t in study.trials:  # complete on both members, or cut by the budget and PRUNED
        assert t.state in (states.COMPLETE, states.PRUNED), t
        assert (t.state == states.COMPLETE) == (t.user_attrs.get("members_done") == 2), t


@pytest.mark.slow
def test_sigkilled_search_resumes_without_rerunning_finished_settings(tmp_path):
    """Kill the driver (and its local Ray) once a setting has finished; --resume completes the
    search: every setting once in Optuna and MLflow, the finished one never evaluated again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna
    from mlflow.tracking import MlflowClient

    data = load_yaml_text(SPEC)
    data.update(population={"attacks": ["blended"], "seeds": [0, 1]}, holdout_seeds=[2],
                budget=3, max_concurrent=1, references=[], storage=str(tmp_path / "tune"),
                cache_dir=str(tmp_path / "cache"), experiment="robust-resume", name="resume")
    from d3tune.yamlio import dump_yaml

    spec = tmp_path / "resume.robust.yaml"
    dump_yaml(data, spec)
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    state = tmp_path / "tune" / "resume.d3tune" / "mlflow_state.json"
    cmd = [sys.executable, "-m", "d3tune", "robust", str(spec), "--out", str(tmp_path / "d.yaml")]
    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and first.poll() is None and not (
                state.exists() and load_ledger(state.parent)["done"]):
            time.sleep(0.5)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        done_before = load_ledger(state.parent)["done"]
        killed_at = time.time()
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.wait(30)
    assert len(done_before) >= 1

    proc = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = load_ledger(state.parent)
    search_done = [k for k in final["done"] if not k.startswith("holdout:")]
    assert len(search_done) == 3 and set(done_before) <= set(search_done)

    client = MlflowClient(f"sqlite:///{db}")
    for tid in done_before:  # finished before the kill: its members ran once, before the kill
        run_id = final["children"][tid]
        for member in ("blended_s0", "blended_s1"):
            history = client.get_metric_history(run_id, f"der.{member}")
            assert len(history) == 1 and history[0].timestamp / 1000 < killed_at
    study = optuna.load_study(study_name="resume",
                              storage=study_storage(tmp_path / "tune" / "resume.d3tune"))
    states = optuna.trial.TrialState
    assert len(study.trials) == 3
    for t in study.trials:  # a setting is COMPLETE exactly when it ran on both members
        assert t.state in (states.COMPLETE, states.PRUNED)
        assert (t.state == states.COMPLETE) == (t.user_attrs["members_done"] == 2), t
        assert bool(t.constraints) == (t.state == states.COMPLETE)
    assert (tmp_path / "d.yaml").exists()


# ---------------------------------------------------------------------------------------------
# The driver-side pieces, without a cluster


class _Trial:
    def __init__(self, trial_id, status, last_result=None):
        self.trial_id, self.status, self.last_result = trial_id, status, last_result


class _Controller:
    def __init__(self, trials):
        self.trials = trials

    def get_trials(self):
        return self.trials


def _result(worst, drop, done, total=3):
    return {"worst_der": worst, "mean_acc_drop": drop, "mean_der": worst, "members_done": done,
            "members_total": total}


def test_pruning_scheduler_stops_only_settings_that_cannot_win(tmp_path):
    import json

    from ray.tune.schedulers import TrialScheduler

    from d3tune.search.robust_pruning import ExactPruning

    record = tmp_path / "pruned.json"
    sched = ExactPruning(top_k=1, max_acc_drop=0.03, record=str(record))
    best = _Trial("a", "TERMINATED", _result(0.8, 0.01, 3))
    greedy = _Trial("g", "TERMINATED", _result(0.99, 0.20, 3))  # over the ACC budget
    cut = _Trial("c", "TERMINATED", _result(0.95, 0.0, 1))  # incomplete: sets no bar
    running = _Trial("b", "RUNNING")
    ctrl = _Controller([best, greedy, cut, running])
    assert sched.on_trial_result(ctrl, running, _result(0.81, 0.0, 1)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(ctrl, running, _result(0.80, 0.0, 2)) == TrialScheduler.CONTINUE
    assert not record.exists()
    assert sched.on_trial_result(ctrl, running, _result(0.79, 0.0, 2)) == TrialScheduler.STOP
    assert json.loads(record.read_text())["b"]["members_done"] == 2
    # without the admissible finisher, the 0.99 one (over budget) sets no bar
    alone = _Controller([greedy, cut, running])
    assert sched.on_trial_result(alone, running, _result(0.1, 0.0, 1)) == TrialScheduler.CONTINUE


def _robust_searcher(ids, max_acc_drop=0.03):
    from functools import partial

    import optuna

    from d3tune.search.tuner import define_by_run
    from d3tune.search.optuna_search import RobustOptunaSearch
    from d3tune.specs.fields import Dist

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return RobustOptunaSearch(space=partial(define_by_run, (Dist("defense.lr", "loguniform",
                                                                 (0.001, 0.1)),)),
                              metric="worst_der", mode="max",
                              sampler=optuna.samplers.TPESampler(seed=0),
                              member_ids=ids, max_acc_drop=max_acc_drop)


def test_searcher_orders_members_and_stores_the_constraint():
    from d3tune.search.robust_trainable import ORDER_KEY

    ids = ["badnets_s0", "blended_s0", "wanet_s0"]
    search = _robust_searcher(ids)
    first = search.suggest("t1")
    assert first[ORDER_KEY] == ids and 0.001 <= first["defense.lr"] <= 0.1
    ders = {"der.badnets_s0": 0.99, "der.blended_s0": 0.6, "der.wanet_s0": 0.9}
    search.on_trial_complete("t1", {**_result(0.6, 0.05, 3), **ders, "final": True})
    second = search.suggest("t2")
    assert second[ORDER_KEY] == ["blended_s0", "wanet_s0", "badnets_s0"]  # weakest first
    trial = search._ot_study.trials[0]
    assert trial.user_attrs["mean_acc_drop"] == 0.05 and trial.user_attrs["der.blended_s0"] == 0.6
    assert trial.constraints == {"max_acc_drop": pytest.approx(0.02)}  # infeasible


def test_pruned_and_cut_settings_reach_optuna_as_pruned_without_a_constraint():
    """A setting stopped before its last member (exact pruning, or cut by the time budget) is
    PRUNED in the study, its running worst cases as intermediate values at step = members
    done, and no ACC constraint: its partial figures never stand for a finished setting."""
    import optuna
    from optuna.trial import TrialState

    from d3tune.search.robust_trainable import summary

    ids = ["a_s0", "b_s0", "c_s0"]
    search = _robust_searcher(ids)
    rows = [{"member": m, "der": d, "acc_drop": 0.0} for m, d in zip(ids, (0.9, 0.8, 0.85))]
    for tid in ("done", "pruned", "cut"):
        search.suggest(tid)
    for n in (1, 2, 3):  # what population_trainable reports, member by member
        search.on_trial_result("done", summary(rows[:n], 3))
    search.on_trial_complete("done", summary(rows, 3))
    # a higher running worst case than the finished one: exact pruning never stops such a
    # setting, but a time budget can; and one pruned after a single member
    high = [{"member": m, "der": 0.99, "acc_drop": 0.10} for m in ids]
    for tid, n in (("pruned", 1), ("cut", 2)):
        for k in range(1, n + 1):
            search.on_trial_result(tid, summary(high[:k], 3))
        search.on_trial_complete(tid, summary(high[:n], 3))
    study = search._ot_study
    by_id = {t.user_attrs["d3tune.trial_id"]: t for t in study.trials}
    done, pruned, cut = by_id["done"], by_id["pruned"], by_id["cut"]
    assert done.state == TrialState.COMPLETE and done.value == pytest.approx(0.8)
    assert done.constraints == {"max_acc_drop": pytest.approx(-0.03)}
    assert done.intermediate_values == {1: 0.9, 2: 0.8, 3: 0.8}
    for t, n in ((pruned, 1), (cut, 2)):
        assert t.state == TrialState.PRUNED  # (Optuna gives it its last intermediate value)
        assert t.constraints == {}  # 0.10 drop over some members: no verdict on the budget
        assert sorted(t.intermediate_values) == list(range(1, n + 1))
        assert t.user_attrs["pruned"] is True and t.user_attrs["members_done"] == n
    # study.best_trials can only hold finished settings, though 0.99 > 0.8 on partial figures
    assert [t.number for t in study.best_trials] == [done.number]
    assert isinstance(study.sampler, optuna.samplers.TPESampler)


def test_compute_budget_counts_member_seconds_across_settings_and_a_resume(tmp_path):
    """Equal compute: the search stops once its settings' member evaluations add up to the
    budget, however they ran side by side; a resumed search counts what ended before it
    (from the study), and a setting reported again after the resume counts once."""
    import optuna

    from d3tune.search.optuna_search import RESULT_ATTR
    from d3tune.specs.robust_spec import robust_plan
    from d3tune.search.compute_budget import ComputeBudget

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    ended = study.ask()
    ended.set_user_attr(RESULT_ATTR, {"seconds.a_s0": 30.0, "seconds.b_s0": 20.0,
                                      "worst_der": 0.9})
    study.tell(ended, 0.9)

    stop = ComputeBudget(100.0, url, "s")
    report = lambda number, secs: {"config": {"d3tune.trial": number},  # noqa: E731
                                   **{f"seconds.m{i}": v for i, v in enumerate(secs)}}
    assert stop("t1", report(1, [10.0])) is False and not stop.stop_all()  # 50 + 10
    assert stop.spent() == 60.0
    stop("t1", report(1, [10.0, 15.0]))  # the same setting, one member more: 50 + 25
    stop("t2", report(2, [20.0]))  # another setting alongside: 50 + 25 + 20
    assert stop.spent() == 95.0 and not stop.stop_all()
    stop("t0", report(0, [30.0, 20.0]))  # the ended setting replayed after the resume
    assert stop.spent() == 95.0
    stop("t2", report(2, [20.0, 6.0]))
    assert stop.spent() == 101.0 and stop.stop_all()
    fresh = ComputeBudget(1.0)  # no study: nothing before
    assert fresh("x", {"seconds.a": 0.4}) is False and not fresh.stop_all()

    spec = robust_plan(load_yaml_text(SPEC + "compute_budget_s: 600\n"), "tiny.yaml")
    assert spec.compute_budget_s == 600.0
    with pytest.raises(UsageError, match="compute_budget_s: expected a number of seconds > 0"):
        robust_plan(load_yaml_text(SPEC + "compute_budget_s: 0\n"), "tiny.yaml")


# ---------------------------------------------------------------------------------------------
# start_with: the search's first settings


def test_start_with_reads_the_reference_from_its_resolved_config():
    text = SPEC.replace("max_concurrent: 2", "max_concurrent: 2\nstart_with: [profile]")
    text = text.replace("references:", "references:\n  - profile")
    spec = robust_plan(load_yaml_text(text), "tiny.yaml")
    (profile,) = (dict(p) for p in spec.start_points)
    assert profile == {"defense.lr": 0.01, "defense.eps": 0.1}  # digits profile, D3's own eps


@pytest.mark.parametrize("start,needle", [
    ("[gentle]", "start_with.gentle: defense.lr: 0.001 lies outside the space [0.005, 0.05]"),
    ("[nope]", "start_with.nope: not a reference of this spec"),
    ("profile", "start_with: expected a list of reference names"),
])
def test_bad_start_with_is_one_line_naming_the_field(start, needle):
    text = SPEC.replace("max_concurrent: 2", f"max_concurrent: 2\nstart_with: {start}")
    with pytest.raises(UsageError) as exc:
        robust_plan(load_yaml_text(text), "tiny.yaml")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_start_points_are_enqueued_once_even_when_the_study_is_set_up_again(tmp_path):
    """A resumed or restarted search sets its stored study up again; the start point must not
    be enqueued a second time (it would be run twice)."""
    from functools import partial

    import optuna

    from d3tune.search.tuner import define_by_run
    from d3tune.search.optuna_search import RobustOptunaSearch
    from d3tune.specs.fields import Dist

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = partial(define_by_run, (Dist("defense.lr", "loguniform", (0.001, 0.1)),
                                    Dist("defense.p", "choice", (1, 2))))

    def searcher():
        return RobustOptunaSearch(space=space, metric="worst_der", mode="max",
                                  sampler=optuna.samplers.TPESampler(seed=0),
                                  storage=optuna.storages.RDBStorage(url),
                                  study_name="s", points_to_evaluate=[{"defense.lr": 0.01,
                                                                       "defense.p": 2}],
                                  member_ids=["a"], max_acc_drop=0.03)

    first = searcher().suggest("t1")
    assert first["defense.lr"] == 0.01 and first["defense.p"] == 2
    again = searcher()  # the same study, loaded from storage
    study = optuna.load_study(study_name="s", storage=url)
    assert len(study.trials) == 1  # nothing new enqueued
    second = again.suggest("t2")
    assert second["defense.lr"] != 0.01  # a sampled setting, not the start point again


def test_the_holdout_splits_a_lone_candidate_over_the_free_slots():
    from d3tune.search.robust_driver import holdout_parts

    assert holdout_parts(2, 1, 12) == 2  # top_k 1, winner = default: both cores, not one
    assert holdout_parts(2, 2, 12) == 1 and holdout_parts(2, 3, 12) == 1
    assert holdout_parts(8, 3, 12) == 3 and holdout_parts(8, 1, 3) == 3  # never empty tasks
    assert holdout_parts(2, 0, 12) == 1 and holdout_parts(2, 1, 0) == 1


def test_a_finalist_equal_to_a_reference_shares_its_holdout_run():
    from d3tune.search.robust_driver import _holdout_runs

    text = SPEC.replace("references:", "references:\n  - profile\n  - {name: default, setting: {}}")
    spec = robust_plan(load_yaml_text(text), "tiny.yaml")
    refs = {r.name: r for r in spec.references}

    def runs(setting, reference=None):
        return _holdout_runs(spec, spec.holdout, {"setting": setting, "reference": reference}, refs)

    default = runs({}, "default")  # the base's defense epochs (2) kept, the rest D3's defaults
    assert runs({"defense.lr": 0.01, "defense.eps": 0.1}) == default
    assert runs({"defense.lr": 0.02, "defense.eps": 0.1}) != default
    assert runs({}, "profile") != default  # a built-in reference drops the base's epochs: 40


def test_der_ceiling_bounds_every_setting_and_names_the_member():
    """No defense can beat (1 + ASR before) / 2 on a member: the report says where the
    population caps the worst case (on digits Input-Aware seed 0, ASR 0.76 -> 0.879)."""
    from d3tune.metrics import der
    from d3tune.search.robust_rules import der_ceiling, population_ceiling

    for acc_b, asr_b in ((0.99, 0.757), (0.98, 1.0), (0.9, 0.0)):
        best = der(acc_b, asr_b, acc_b, 0.0)  # the best a defense can do
        assert der_ceiling(asr_b) == pytest.approx(best)
        assert der(acc_b, asr_b, acc_b - 0.01, 0.0) < der_ceiling(asr_b)
    rows = [{"member": "badnets_s0", "asr_before": 0.97},
            {"member": "input_aware_s0", "asr_before": 0.757}]
    value, member = population_ceiling(rows)
    assert member == "input_aware_s0" and value == pytest.approx(0.8785)
    assert population_ceiling([]) is None


def test_report_states_the_ceiling_per_phase():
    import pandas as pd

    from d3tune.reports.robust_report import ceiling_lines

    pop = pd.DataFrame([
        {"member": "a_s0", "phase": "search", "asr_before": 0.9, "excluded": False},
        {"member": "b_s0", "phase": "search", "asr_before": 0.1, "excluded": True},  # left out
        {"member": "a_s3", "phase": "holdout", "asr_before": 0.8, "excluded": False}])
    (line,) = ceiling_lines(pop)
    assert "search 0.950 (a_s0)" in line and "holdout 0.900 (a_s3)" in line


def _holdout_setup(tmp_path, monkeypatch, fail_on_get: int | None = None):
    """A 5-member holdout, one group of two candidates (the winner is the default), Ray
    faked: each task returns its members' rows at once; ``fail_on_get``: the driver dies
    (KeyboardInterrupt) on that ray.get call."""
    import ray

    from d3tune.search import robust_driver

    spec = robust_plan({"name": "h", "defense": "d3", "budget": 1, "max_concurrent": 2,
                        "population": {"attacks": ["blended"], "seeds": [0]},
                        "holdout_seeds": [1, 2, 3, 4, 5],
                        "space": {"defense.lr": {"loguniform": [0.005, 0.05]}}}, "h.yaml")
    calls: list[list[str]] = []
    gets = {"n": 0}

    class Task:
        @staticmethod
        def remote(spec_, members, setting, ref, threads):
            calls.append([m.id for m in members])
            rows = [{"member": m.id, "seed": m.seed, "der": float(m.seed)} for m in members]
            return type("Ref", (), {"rows": rows})()  # hashable, like an ObjectRef

    def get(ref):
        gets["n"] += 1
        if gets["n"] == fail_on_get:
            raise KeyboardInterrupt
        return ref.rows

    monkeypatch.setattr(ray, "wait", lambda refs, num_returns: (refs[:1], refs[1:]))
    monkeypatch.setattr(ray, "get", get)
    group = [{"label": "trial-0", "reference": None, "setting": {}},
             {"label": "ref-default", "reference": None, "setting": {}}]
    run = lambda done: robust_driver.run_holdout_groups(  # noqa: E731
        spec, [group], [(0, group)], {}, Task, tmp_path, done)
    return spec, calls, run


def test_a_split_holdout_keeps_every_member_once_in_holdout_order(tmp_path, monkeypatch):
    spec, calls, run = _holdout_setup(tmp_path, monkeypatch)
    done: dict = {}
    run(done)
    assert len(calls) == 2 and sorted(sum(calls, [])) == sorted(m.id for m in spec.holdout)
    for label in ("trial-0", "ref-default"):
        assert [r["member"] for r in done[label]] == [m.id for m in spec.holdout]
    assert json.loads((tmp_path / "holdout.json").read_text()) == done
    assert json.loads((tmp_path / "holdout_parts.json").read_text()) == {}


def test_a_killed_split_holdout_resumes_with_the_parts_that_came_in(tmp_path, monkeypatch):
    spec, calls, run = _holdout_setup(tmp_path, monkeypatch, fail_on_get=2)
    with pytest.raises(KeyboardInterrupt):  # the driver dies after the first part came in
        run({})
    first = calls[0]
    kept = json.loads((tmp_path / "holdout_parts.json").read_text())["trial-0"]
    assert [r["member"] for r in kept] == first
    spec, calls, run = _holdout_setup(tmp_path, monkeypatch)
    done: dict = {}
    run(done)
    assert sorted(sum(calls, [])) == sorted(m.id for m in spec.holdout if m.id not in first)
    assert [r["member"] for r in done["trial-0"]] == [m.id for m in spec.holdout]
