"""The sweep callback's MLflow logging without Ray running: buffered per-epoch metrics reach the
store at a checkpoint and at a trial's end, once per epoch, whatever the trial re-reports."""
from __future__ import annotations

import sqlite3
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray")

from d3tune.search import engine  # noqa: E402
from d3tune.search import mlflow_callback as tracking_tune  # noqa: E402
from d3tune.specs.sweep_spec import load_plan  # noqa: E402


@dataclass
class FakeTrial:
    trial_id: str
    config: dict[str, Any] = field(default_factory=dict)
    last_result: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"fake_{self.trial_id}"


def _steps(db: Path) -> dict[str, list[int]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("select run_uuid, step from metrics where key='acc' order by step")
        out: dict[str, list[int]] = {}
        for run, step in rows:
            out.setdefault(run, []).append(step)
    return out


def _result(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "acc": 0.9 + epoch / 100, "asr": 0.1, "ra": 0.8, "der": 0.7,
            "acc_before": 0.95, "asr_before": 0.99, "ra_before": 0.0}


def flaky(real: Any, outage: dict[str, bool]) -> Any:
    """The real MLflow client, failing every call while ``outage["on"]``."""
    class Flaky:
        def __getattr__(self, name: str) -> Any:
            method = getattr(real, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                if outage["on"]:
                    raise ConnectionError("tracking server down")
                return method(*args, **kwargs)
            return call

    return Flaky()


def _callback(tmp_path: Path, setup: bool = True) -> tracking_tune.MlflowSweepCallback:
    """The driver's callback of a one-knob sweep, set up (parent run created) on the store."""
    spec = tmp_path / "s.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: s
        storage: {tmp_path / 'tune'}
        base: {{data: {{name: digits}}, attack: {{name: badnets}}, defense: {{name: d3}}}}
        space: {{defense.lr: {{choice: [0.01]}}}}
        """))
    plan = load_plan(spec, "sweep")
    cb = tracking_tune.MlflowSweepCallback(plan)
    if setup:
        cb.setup()
    return cb


def test_epochs_are_buffered_then_logged_once_at_checkpoint_and_end(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setattr(tracking_tune, "FLUSH_EVERY_S", 3600.0)
    cb = _callback(tmp_path)
    trial = FakeTrial("t1", config={"defense.lr": 0.01})
    cb.on_trial_start(0, [], trial)
    for epoch in (1, 2, 3):
        cb.on_trial_result(0, [], trial, _result(epoch))
    child = cb.state["children"]["t1"]
    assert child not in _steps(db) and cb.state["steps"].get("t1", 0) == 0  # still buffered
    cb.on_checkpoint(0, [], trial, checkpoint=None)
    assert _steps(db)[child] == [1, 2, 3] and cb.state["steps"]["t1"] == 3
    for epoch in (2, 3, 4, 5):  # a retried trial re-reports epochs 2-3 from an older checkpoint
        cb.on_trial_result(0, [], trial, _result(epoch))
    trial.last_result = _result(5)
    cb.on_trial_complete(0, [], trial)
    assert _steps(db)[child] == [1, 2, 3, 4, 5]  # each epoch once, none lost
    with sqlite3.connect(db) as con:
        status = con.execute("select status from runs where run_uuid=?", (child,)).fetchone()[0]
    assert status == "FINISHED" and cb.state["done"] == ["t1"]


def test_a_buffer_older_than_the_flush_interval_is_written_with_the_next_result(tmp_path,
                                                                                monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setattr(tracking_tune, "FLUSH_EVERY_S", 5.0)
    clock = [1000.0]
    monkeypatch.setattr(tracking_tune, "time",  # this module's clock only
                        SimpleNamespace(time=time.time, monotonic=lambda: clock[0]))
    cb = _callback(tmp_path)
    trial = FakeTrial("t1", config={"defense.lr": 0.01})
    cb.on_trial_result(0, [], trial, _result(1))
    clock[0] += 4.9
    cb.on_trial_result(0, [], trial, _result(2))
    child = cb.state["children"]["t1"]
    assert child not in _steps(db)
    clock[0] += 0.2
    cb.on_trial_result(0, [], trial, _result(3))
    assert _steps(db)[child] == [1, 2, 3]
    cb.on_trial_result(0, [], trial, _result(4))
    cb.on_experiment_end([])
    assert _steps(db)[child] == [1, 2, 3, 4]


def test_a_trial_rerun_after_resume_does_not_end_the_sweep(tmp_path):
    """Tune may run a trial again after --resume when its end missed the last snapshot; Ray's
    OptunaSearch would raise on its first report, ours keeps the study's first result."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from d3tune.search.optuna_search import ResumableOptunaSearch

    for cls, survives in ((OptunaSearch, False), (ResumableOptunaSearch, True)):
        def searcher() -> OptunaSearch:
            storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / cls.__name__}.db")
            return cls(space={"lr": tune.uniform(0.0, 1.0)}, metric="der", mode="max",
                       sampler=optuna.samplers.TPESampler(seed=0), storage=storage,
                       study_name="s")

        first = searcher()
        assert first.suggest("t1") is not None
        first.on_trial_result("t1", {"der": 0.5, "training_iteration": 1})
        snapshot = str(tmp_path / f"{cls.__name__}.pkl")
        first.save(snapshot)  # Tune's last snapshot: t1 still running
        first.on_trial_complete("t1", {"der": 0.6, "training_iteration": 2})
        resumed = searcher()  # the driver was killed; --resume restores the snapshot
        resumed.restore(snapshot)
        if survives:
            resumed.on_trial_result("t1", {"der": 0.1, "training_iteration": 3})
            resumed.on_trial_complete("t1", {"der": 0.2, "training_iteration": 2})
            done = resumed._ot_study.trials[0]
            assert done.state == optuna.trial.TrialState.COMPLETE and done.value == 0.6
        else:
            with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
                resumed.on_trial_result("t1", {"der": 0.1, "training_iteration": 3})


def test_an_early_stopped_trial_is_tagged_so_users_can_filter_it(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cb = _callback(tmp_path)
    for tid, epoch, final in (("ran", 4, True), ("cut", 1, False)):
        trial = FakeTrial(tid, config={"d3tune.trial": len(cb.state["children"])},
                          last_result={**_result(epoch), "final": final})
        cb.on_trial_start(0, [], trial)
        cb.on_trial_complete(0, [], trial)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    tags = {tid: client.get_run(cb.state["children"][tid]).data.tags["d3tune.stopped_early"]
            for tid in ("ran", "cut")}
    assert tags == {"ran": "false", "cut": "true"}
    runs = client.search_runs([cb.exp_id], "tags.`d3tune.stopped_early` = 'false'")
    assert [r.info.run_id for r in runs] == [cb.state["children"]["ran"]]


def test_a_trial_recreated_under_a_new_id_after_resume_reuses_its_child_run(tmp_path,
                                                                            monkeypatch):
    """Tune's snapshot may predate a trial: after --resume the same trial (same Optuna number)
    comes back under a new Tune id. The ledger maps it to its first child run: no second one,
    and an ended trial is not finished twice."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cb = _callback(tmp_path)
    ended = FakeTrial("old_ended", config={"d3tune.trial": 0}, last_result=_result(4))
    running = FakeTrial("old_running", config={"d3tune.trial": 1})
    for t in (ended, running):
        cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], running, _result(1))
    cb.on_checkpoint(0, [], running, checkpoint=None)
    cb.on_trial_complete(0, [], ended)
    assert engine.replay_table(cb.plan) == {"optuna:0": {**_result(4)}}
    # the driver is killed; a new driver (new callback) sees both again under new ids
    cb2 = tracking_tune.MlflowSweepCallback(cb.plan)
    cb2.setup()
    again = FakeTrial("new_ended", config={"d3tune.trial": 0}, last_result=_result(4))
    rerun = FakeTrial("new_running", config={"d3tune.trial": 1}, last_result=_result(2))
    for t in (again, rerun):
        cb2.on_trial_start(0, [], t)
    for epoch in (1, 2):
        cb2.on_trial_result(0, [], rerun, _result(epoch))
    cb2.on_trial_complete(0, [], again)
    cb2.on_trial_complete(0, [], rerun)
    assert cb2.close_unfinished() == 0
    with sqlite3.connect(db) as con:
        children = dict(con.execute(
            "select r.run_uuid, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
            "where t.key = 'mlflow.parentRunId'"))
        resumed = con.execute("select count(*) from tags where key='d3tune.resumed'").fetchone()
    assert sorted(children.values()) == ["FINISHED", "FINISHED"]  # two trials, two runs
    assert _steps(db)[cb.state["children"]["old_running"]] == [1, 2]  # epoch 1 not twice
    assert resumed == (1,)  # the in-flight trial says it was run again


def test_mlflow_calls_owed_at_a_kill_are_made_by_the_next_driver(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cb = _callback(tmp_path)
    trial = FakeTrial("t1", config={"d3tune.trial": 0}, last_result=_result(4))
    cb.on_trial_start(0, [], trial)
    monkeypatch.setattr(cb, "_close_child", lambda tid, status: None)  # killed right here
    cb.on_trial_complete(0, [], trial)
    assert cb.state["closing"] == {"t1": "FINISHED"}
    cb2 = tracking_tune.MlflowSweepCallback(cb.plan)
    cb2.setup()
    assert cb2.state["closing"] == {}
    with sqlite3.connect(db) as con:
        status = con.execute("select status from runs where run_uuid=?",
                             (cb.state["children"]["t1"],)).fetchone()[0]
    assert status == "FINISHED"


def test_the_ledger_records_a_trial_end_while_mlflow_is_down_and_runs_follow_later(
        tmp_path, monkeypatch):
    """A store that fails at setup (or at a trial's end) must not cost the ledger: --resume
    reads it to skip finished trials. Once the store answers, the runs are made."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cb = _callback(tmp_path, setup=False)
    plan = cb.plan
    real_connect = cb.connect

    def down() -> None:
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(cb, "connect", down)
    cb.setup()
    assert cb.client is None and cb.parent_id is None
    first = FakeTrial("t1", config={"d3tune.trial": 0}, last_result=_result(4))
    cb.on_trial_start(0, [], first)
    cb.on_trial_complete(0, [], first)
    ledger = tracking_tune.load_ledger(cb.state_dir)
    assert ledger["done"] == ["t1"] and ledger["results"]["t1"]["epoch"] == 4
    assert engine.replay_table(plan)  # a resumed sweep would not run t1 again

    monkeypatch.setattr(cb, "connect", real_connect)  # the store is back
    cb.down_until = 0.0
    second = FakeTrial("t2", config={"d3tune.trial": 1}, last_result=_result(4))
    cb.on_trial_start(0, [], second)
    cb.on_trial_complete(0, [], second)
    assert cb.parent_id is not None and "t2" in cb.state["children"]
    assert tracking_tune.load_ledger(cb.state_dir)["done"] == ["t1", "t2"]
    with sqlite3.connect(db) as con:
        status = con.execute("select status from runs where run_uuid=?",
                             (cb.state["children"]["t2"],)).fetchone()[0]
    assert status == "FINISHED"


def test_what_mlflow_missed_in_an_outage_is_told_once_it_answers(tmp_path, monkeypatch):
    """Epochs reported, a child run to make and a trial end to record while the store is down
    all reach it once it answers again: every epoch once, every run FINISHED, none RUNNING."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setattr(tracking_tune, "FLUSH_EVERY_S", 0.0)
    cb = _callback(tmp_path)
    outage = {"on": False}
    cb.client = flaky(cb.client, outage)
    running = FakeTrial("t1", config={"d3tune.trial": 0})
    cb.on_trial_start(0, [], running)
    cb.on_trial_result(0, [], running, _result(1))
    outage["on"] = True
    cb.on_trial_result(0, [], running, _result(2))
    cb.on_trial_result(0, [], running, _result(3))
    late = FakeTrial("t2", config={"d3tune.trial": 1}, last_result=_result(2))
    cb.on_trial_start(0, [], late)  # its child run cannot be made now
    cb.on_trial_result(0, [], late, _result(1))
    cb.on_trial_result(0, [], late, _result(2))
    cb.on_trial_complete(0, [], late)  # it ends during the outage
    assert cb.owed and "t2" not in cb.state["children"] and cb.state["closing"] == {
        "t2": "FINISHED"}
    assert tracking_tune.load_ledger(cb.state_dir)["done"] == ["t2"]  # the ledger has it
    outage["on"] = False  # the server is back; the next event tells MLflow what it missed
    cb.down_until = 0.0
    running.last_result = _result(4)
    cb.on_trial_result(0, [], running, _result(4))
    cb.on_trial_complete(0, [], running)
    cb.on_experiment_end([])
    assert not cb.owed and cb.state["closing"] == {} and not cb.pending
    steps = _steps(db)
    assert steps[cb.state["children"]["t1"]] == [1, 2, 3, 4]  # each epoch once, none lost
    assert steps[cb.state["children"]["t2"]] == [1, 2]
    with sqlite3.connect(db) as con:
        statuses = dict(con.execute("select run_uuid, status from runs"))
    assert statuses[cb.state["children"]["t1"]] == "FINISHED"
    assert statuses[cb.state["children"]["t2"]] == "FINISHED"
    assert "RUNNING" not in {s for r, s in statuses.items() if r != cb.parent_id}


def test_at_the_end_an_mlflow_still_down_leaves_its_debt_in_the_ledger(tmp_path, monkeypatch,
                                                                       caplog):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setattr(tracking_tune, "FINAL_PATIENCE_S", 0.0)
    cb = _callback(tmp_path)
    trial = FakeTrial("t1", config={"d3tune.trial": 0}, last_result=_result(2))
    cb.on_trial_start(0, [], trial)

    def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("tracking server down")

    monkeypatch.setattr(cb.client, "set_terminated", down)
    cb.on_trial_complete(0, [], trial)
    with caplog.at_level("WARNING"):
        cb.on_experiment_end([])
    assert tracking_tune.load_ledger(cb.state_dir)["closing"] == {"t1": "FINISHED"}
    assert any("still owed" in r.getMessage() for r in caplog.records)


def test_a_trial_end_told_twice_logs_its_final_metrics_once(tmp_path, monkeypatch):
    """A driver killed between a trial's final metrics and its status leaves the end owed;
    the next driver tells it again, and the final metrics (same time, same values) stay one
    row each."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cb = _callback(tmp_path)
    trial = FakeTrial("t1", config={"d3tune.trial": 0}, last_result=_result(4))
    cb.on_trial_start(0, [], trial)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("the driver died here")

    monkeypatch.setattr(cb.client, "set_terminated", killed)
    cb.on_trial_complete(0, [], trial)
    assert cb.state["closing"] == {"t1": "FINISHED"}  # metrics written, status still owed
    cb2 = tracking_tune.MlflowSweepCallback(cb.plan)
    cb2.setup()
    assert cb2.state["closing"] == {}
    with sqlite3.connect(db) as con:
        rows = con.execute("select count(*) from metrics where key='der' and step=0 and "
                           "run_uuid=?", (cb.state["children"]["t1"],)).fetchone()[0]
    assert rows == 1


def test_a_robust_search_tells_mlflow_the_members_an_outage_missed_once(tmp_path, monkeypatch):
    """The robust search's callback shares the sweeps' ledger and catch-up: a member reported
    while the store is down, and the setting's end, reach MLflow once it answers; every member
    figure once, the run FINISHED with its pruning and admissibility tags."""
    from d3tune.search.robust_mlflow import RobustMlflowCallback
    from d3tune.search.robust_trainable import summary
    from d3tune.specs.robust_spec import robust_plan

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    spec = robust_plan({
        "name": "rob", "defense": "d3", "storage": str(tmp_path / "runs"), "budget": 1,
        "space": {"defense.lr": {"loguniform": [0.01, 0.05]}},
        "population": {"attacks": ["badnets", "blended", "wanet"], "datasets": ["digits"],
                       "seeds": [0]},
        "holdout_seeds": [1]}, "test")
    cb = RobustMlflowCallback(spec)
    cb.setup()
    outage = {"on": False}
    cb.client = flaky(cb.client, outage)
    ids = [m.id for m in spec.members]
    rows = [{"member": m, "seed": 0, "der": 0.9 - i / 10, "acc_drop": 0.01, "acc_after": 0.95,
             "asr_after": 0.05, "ra_after": 0.9, "seconds": 1.0, "cpu_seconds": 1.0}
            for i, m in enumerate(ids)]
    trial = FakeTrial("r1", config={"d3tune.trial": 0, "defense.lr": 0.02})
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, summary(rows[:1], 3))
    outage["on"] = True
    cb.on_trial_result(0, [], trial, summary(rows[:2], 3))  # lost to the outage ...
    outage["on"] = False
    cb.down_until = 0.0
    trial.last_result = summary(rows, 3)
    cb.on_trial_result(0, [], trial, trial.last_result)  # ... and told with the next one
    cb.on_trial_complete(0, [], trial)
    cb.on_trial_complete(0, [], trial)  # told twice (a driver kill): logged once
    assert not cb.owed and cb.state["closing"] == {} and cb.state["done"] == ["r1"]
    run = cb.state["children"]["r1"]
    with sqlite3.connect(db) as con:
        counts = dict(con.execute("select key, count(*) from metrics where run_uuid=? "
                                  "group by key", (run,)))
        steps = [s for (s,) in con.execute("select step from metrics where run_uuid=? and "
                                           "key='worst_der' order by step", (run,))]
        status = con.execute("select status from runs where run_uuid=?", (run,)).fetchone()[0]
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (run,)))
    assert all(counts[f"der.{m}"] == 1 for m in ids), counts
    assert steps == [0, 1, 3]  # running worst case after members 1 and 3, and the final one
    assert status == "FINISHED" and tags["d3tune.pruned"] == "false"
    assert tags["d3tune.admissible"] == "true" and tags["d3tune.phase"] == "search"
