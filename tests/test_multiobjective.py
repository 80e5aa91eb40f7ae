"""Issue 18 (multi-objective sweeps) and the searcher side of issue 22, without Ray running:
the Optuna study records early-stopped trials as PRUNED, names its objectives, keeps
constraints; fronts hold finished, feasible trials only; one importance plot per objective and
no raw library warning; a resumed searcher continues the trials Tune's snapshot missed."""
from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("ray")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from d3tune.errors import UsageError  # noqa: E402
from d3tune.search.optuna_search import ResumableOptunaSearch  # noqa: E402
from d3tune.runstate import TRIAL_KEY  # noqa: E402
from d3tune.specs.sweep_spec import load_plan  # noqa: E402
from d3tune.search.sweep_driver import best_rows, optuna_plots  # noqa: E402


def _plan(tmp_path: Path, extra: str = ""):
    spec = tmp_path / "mo.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: mo
        storage: {tmp_path / 'tune'}
        base: {{data: {{name: digits}}, attack: {{name: badnets}}, defense: {{name: d3}}}}
        space:
          defense.lr: {{loguniform: [0.001, 0.1]}}
          defense.eps: {{uniform: [0.0, 0.5]}}
        metric: [acc, asr]
        mode: [max, min]
        """) + textwrap.dedent(extra))
    return load_plan(spec, "sweep")


SPACE = {"defense.lr": optuna.distributions.FloatDistribution(0.001, 0.1, log=True),
         "defense.eps": optuna.distributions.FloatDistribution(0.0, 0.5)}


def _searcher(db: Path, constraints=(), seed: int = 0) -> ResumableOptunaSearch:
    extra = {"constraints": constraints} if constraints else {}
    return ResumableOptunaSearch(
        space=dict(SPACE), metric=["acc", "asr"], mode=["max", "min"],
        sampler=optuna.samplers.TPESampler(seed=seed),
        storage=optuna.storages.RDBStorage(f"sqlite:///{db}"), study_name="mo", **extra)


def _row(acc: float, asr: float, final: bool = True, epoch: int = 20) -> dict:
    return {"acc": acc, "asr": asr, "der": 0.5, "acc_before": 0.98, "asr_before": 1.0,
            "epoch": epoch, "final": final, "training_iteration": epoch}


def test_an_asha_stopped_trial_is_pruned_with_its_last_values_and_off_the_front(tmp_path):
    s = _searcher(tmp_path / "s.db")
    for tid in ("ran", "cut"):
        s.suggest(tid)
    s.on_trial_complete("ran", _row(0.90, 0.10))
    s.on_trial_complete("cut", _row(0.095, 0.0, final=False, epoch=10))  # destroyed model
    study = s._ot_study
    ran, cut = study.trials
    assert (ran.state, cut.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    assert cut.user_attrs["d3tune.last_values"] == {"acc": 0.095, "asr": 0.0}
    assert cut.user_attrs["d3tune.result"]["epoch"] == 10
    assert [t.number for t in study.best_trials] == [ran.number]  # the dashboard's front


def test_one_objective_a_stopped_trial_keeps_its_last_value(tmp_path):
    """Tune does not pass the result that made ASHA stop a trial to the searcher: the study
    still gets it as the trial's last intermediate value (Optuna's value of a PRUNED trial)."""
    s = ResumableOptunaSearch(space={"defense.lr": SPACE["defense.lr"]}, metric="der",
                              mode="max", sampler=optuna.samplers.TPESampler(seed=0),
                              storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db"),
                              study_name="one")
    s.suggest("cut")
    s.on_trial_complete("cut", {"der": 0.3, "epoch": 1, "final": False,
                                "training_iteration": 1})
    cut, = s._ot_study.trials
    assert cut.state == TrialState.PRUNED and cut.intermediate_values == {1: 0.3}


def test_the_study_names_its_objectives(tmp_path):
    s = _searcher(tmp_path / "s.db")
    s.suggest("t1")
    assert optuna.load_study(study_name="mo", storage=f"sqlite:///{tmp_path / 's.db'}"
                             ).metric_names == ["acc", "asr"]


def test_the_printed_front_holds_finished_feasible_trials_only(tmp_path):
    df = pd.DataFrame({"acc": [0.95, 0.095, 0.97, 0.80], "asr": [0.10, 0.0, 0.6, 0.05],
                       "acc_before": [0.98] * 4, "error": [False] * 4,
                       "stopped_early": [False, True, False, False]})
    front = best_rows(_plan(tmp_path), df)
    assert sorted(front.index) == [0, 2, 3]  # the stopped trial (ASR 0) would dominate
    constrained = _plan(tmp_path, "constraints: {max_acc_drop: 0.05}\n")
    assert constrained.constraints == (("max_acc_drop", 0.05),)
    assert sorted(best_rows(constrained, df).index) == [0, 2]  # 0.98 - 0.80 > 0.05


def test_a_constraint_reaches_optuna(tmp_path):
    s = _searcher(tmp_path / "s.db", constraints=(("max_acc_drop", 0.05),))
    for tid in ("keeps", "drops"):
        s.suggest(tid)
    s.on_trial_complete("keeps", _row(0.95, 0.20))
    s.on_trial_complete("drops", _row(0.60, 0.00))  # dominates, but loses 0.38 ACC
    keeps, drops = s._ot_study.trials
    assert drops.state == TrialState.COMPLETE
    assert [t.number for t in s._ot_study.best_trials] == [keeps.number]


@pytest.mark.parametrize("bad, field", [("{max_acc_drop: 2}", "max_acc_drop"),
                                        ("{max_acc_dorp: 0.1}", "max_acc_dorp"),
                                        ("[0.05]", "constraints")])
def test_a_bad_constraint_names_its_field(tmp_path, bad, field):
    with pytest.raises(UsageError, match=f"constraints.*{field}|{field}"):
        _plan(tmp_path, f"constraints: {bad}\n")


def _study_with_trials(plan, n: int = 6) -> None:
    """A finished multi-objective study where the plan's summary looks for it."""
    plan.paths.state_dir.mkdir(parents=True)
    study = optuna.create_study(study_name=plan.name, directions=["maximize", "minimize"],
                                storage=plan.paths.optuna_storage)
    dists = dict(SPACE)
    for i in range(n):
        lr, eps = 0.001 * (1.8 ** i), 0.5 * ((i * 7) % n) / n
        study.add_trial(optuna.trial.create_trial(
            params={"defense.lr": lr, "defense.eps": eps}, distributions=dists,
            values=[0.9 - eps / 2, 0.5 - 4 * lr]))


def test_one_importance_plot_per_objective_and_no_raw_warning(tmp_path):
    plan = _plan(tmp_path)
    _study_with_trials(plan)
    out = tmp_path / "out"
    out.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = optuna_plots(plan, out)
    names = sorted(p.name for p in paths)
    assert names == ["importance_acc.png", "importance_asr.png", "parallel_coordinates.png"]
    assert all((out / n).stat().st_size > 0 for n in names)
    assert [str(w.message) for w in caught] == []  # PedAnova's "low `target`" stays out


def test_a_resumed_searcher_continues_trials_its_snapshot_missed(tmp_path):
    """Tune snapshots its searcher every few seconds. Trials created after the last snapshot
    are in the study only: the resumed searcher hands them, oldest first, to the new Tune trials
    (an ended one to be replayed, an in-flight one to run again under its own Optuna trial),
    then draws fresh parameters, none equal to theirs."""
    first = _searcher(tmp_path / "s.db")
    first.suggest("a")
    snapshot = str(tmp_path / "searcher.pkl")
    first.save(snapshot)  # Tune's last snapshot: it knows trial a only
    first.on_trial_complete("a", _row(0.9, 0.1))
    b, c = first.suggest("b"), first.suggest("c")
    first.on_trial_complete("b", _row(0.8, 0.05, final=False, epoch=5))  # ASHA stop; c in flight
    resumed = _searcher(tmp_path / "s.db")  # the driver was killed; --resume
    resumed.restore(snapshot)
    assert resumed.suggest("b2") == b and resumed.suggest("c2") == c
    fresh = resumed.suggest("d")
    assert fresh[TRIAL_KEY] == 3
    assert {k: v for k, v in fresh.items() if k != TRIAL_KEY} not in (
        {k: v for k, v in x.items() if k != TRIAL_KEY} for x in (b, c))
    resumed.on_trial_result("b2", _row(0.1, 0.1, epoch=1))  # a replay's report: ignored
    resumed.on_trial_complete("b2", {**_row(0.8, 0.05, final=False, epoch=5), "replayed": True})
    resumed.on_trial_complete("c2", _row(0.85, 0.02))
    resumed.on_trial_complete("d", _row(0.7, 0.3))
    study = resumed._ot_study
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED,
                                               TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[2].values == [0.85, 0.02]  # the in-flight trial, finished once
    assert "run again" in study.trials[2].user_attrs["d3tune.note"]
    from d3tune.search.optuna_search import ended_results

    assert sorted(ended_results(f"sqlite:///{tmp_path / 's.db'}", "mo")) == [
        "optuna:0", "optuna:1", "optuna:2", "optuna:3"]
