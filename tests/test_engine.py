"""The Ray Tune engine on a real local Ray: sweeps, MLflow parent/child runs, ASHA, cache reuse."""
from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from d3tune.specs.sweep_spec import load_plan  # noqa: E402
from d3tune.search.sweep_driver import pareto_front, run_plan  # noqa: E402
from d3tune.search.mlflow_callback import load_ledger  # noqa: E402
from d3tune.runstate import study_storage  # noqa: E402

TINY_BASE = """
base:
  data: {name: digits}
  attack: {name: badnets}
  train: {epochs: 3}
  defense: {name: d3, epochs: 4}
  eval: {subset: 100, every: 1}  # every epoch: the tests count per-epoch steps
"""


def write_spec(tmp_path: Path, body: str, name: str = "spec", concurrent: int = 2) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""
        name: {name}
        storage: {tmp_path / 'tune'}
        cache_dir: {tmp_path / 'cache'}
        experiment: test
        max_concurrent: {concurrent}
        """) + TINY_BASE + textwrap.dedent(body))
    return p


def mlflow_runs(db: Path) -> tuple[list[str], dict[str, str], dict[str, int]]:
    with sqlite3.connect(db) as con:
        runs = [r[0] for r in con.execute("select run_uuid from runs")]
        parents = dict(con.execute("select run_uuid, value from tags where key='mlflow.parentRunId'"))
        steps = dict(con.execute("select run_uuid, count(distinct step) from metrics "
                                 "where key='acc' group by run_uuid"))
    return runs, parents, steps


@pytest.fixture
def mlflow_db(tmp_path, monkeypatch) -> Path:
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    return db


def test_four_trial_sweep_logs_one_parent_four_children(local_ray, tmp_path, mlflow_db):
    spec = write_spec(tmp_path, """
        space:
          defense.lr: {loguniform: [0.005, 0.05]}
          defense.eps: {uniform: [0.0, 0.3]}
        metric: der
        mode: max
        num_samples: 4
        scheduler: {name: none}
        """)
    df = run_plan(load_plan(spec, "sweep"))
    assert len(df) == 4 and not df["error"].any()
    runs, parents, steps = mlflow_runs(mlflow_db)
    assert len(runs) == 5
    parent_ids = set(parents.values())
    assert len(parent_ids) == 1 and len(parents) == 4
    assert all(steps[child] == 4 for child in parents)  # per-epoch metrics, one per epoch
    # four defense trials on one attack: the backdoored model was trained once
    assert int(df["cache_builds"].sum()) == 1
    assert len(list((tmp_path / "cache").rglob("model.safetensors"))) == 1
    assert (tmp_path / "tune" / "spec.d3tune" / "optuna.journal").exists()  # the study
    assert not (tmp_path / "tune" / "spec.d3tune" / "optuna.db").exists()
    # 4 tiny epochs take far less than the default 30 s between defense checkpoints, and the
    # last epoch never checkpoints (the ledger replays ended trials): no trial saved one
    assert not list((tmp_path / "tune" / "spec").glob("*/checkpoint_*"))


def test_multi_objective_sweep_reports_a_pareto_front(local_ray, tmp_path, mlflow_db):
    spec = write_spec(tmp_path, """
        space:
          defense.lr: {loguniform: [0.0005, 0.05]}
          defense.radius: {uniform: [0.5, 2.0]}
        metric: [acc, asr]
        mode: [max, min]
        num_samples: 4
        scheduler: {name: asha, grace_period: 2, metric: der, mode: max}
        """, name="multi")
    plan = load_plan(spec, "sweep")
    df = run_plan(plan)
    assert {"acc", "asr"} <= set(df.columns) and len(df) == 4
    front = pareto_front(df, plan.metric, plan.mode)
    assert len(front) >= 1
    for _, a in front.iterrows():  # nothing in the sweep dominates a front member
        better = df[(df.acc >= a.acc) & (df.asr <= a.asr) & ((df.acc > a.acc) | (df.asr < a.asr))]
        assert better.empty
    import optuna

    study = optuna.load_study(study_name="multi",
                              storage=study_storage(tmp_path / "tune" / "multi.d3tune"))
    assert len(study.directions) == 2 and len(study.best_trials) >= 1


def test_asha_stops_weak_trials_early(local_ray, tmp_path, mlflow_db):
    spec = write_spec(tmp_path, """
        space:
          defense.lr: {choice: [0.00001, 0.02]}
        metric: der
        mode: max
        num_samples: 6
        scheduler: {name: asha, grace_period: 1, reduction_factor: 2, metric: der, mode: max}
        """, name="asha", concurrent=1)
    # One trial at a time: ASHA never stops the first trial to reach a rung, so with two running
    # side by side the outcome would hang on which reported first. Sequentially, and with the
    # seeded sampler drawing both learning rates (they give different DERs), the first trial
    # whose DER falls below an earlier one's at a rung is stopped there.
    df = run_plan(load_plan(spec, "sweep"))
    assert len(df) == 6
    assert (df["epoch"] < 4).any()  # stopped before the last of 4 epochs


def test_checkpoints_are_throttled_by_defense_time():
    from d3tune.search.engine import checkpoint_due

    assert checkpoint_due(None, 5.0, 0.0) and checkpoint_due(100.0, 100.0, 0.0)  # 0: every epoch
    assert not checkpoint_due(None, 5.0, 30.0)  # the defense has not started its clock
    assert not checkpoint_due(100.0, 129.9, 30.0) and checkpoint_due(100.0, 130.0, 30.0)


def test_checkpoint_interval_is_a_validated_spec_field(tmp_path):
    from d3tune.errors import UsageError

    assert load_plan(write_spec(tmp_path, SPACE_ONLY), "sweep").checkpoint_every_s == 30.0
    plan = load_plan(write_spec(tmp_path, SPACE_ONLY + "checkpoint_every_s: 0\n", "zero"), "sweep")
    assert plan.checkpoint_every_s == 0.0
    for bad in ("-1", "nan", "soon", "true"):
        with pytest.raises(UsageError, match="checkpoint_every_s"):
            load_plan(write_spec(tmp_path, SPACE_ONLY + f"checkpoint_every_s: {bad}\n", "b"),
                      "sweep")


SPACE_ONLY = """
space:
  defense.lr: {loguniform: [0.005, 0.05]}
"""


def test_pareto_front_on_hand_made_rows():
    import pandas as pd

    df = pd.DataFrame({"acc": [0.9, 0.8, 0.95, 0.7], "asr": [0.1, 0.05, 0.5, 0.6]})
    front = pareto_front(df, ("acc", "asr"), ("max", "min"))
    assert sorted(front.index) == [0, 1, 2]


def _wait_for(predicate, timeout: float) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_sigkilled_sweep_resumes_without_losing_or_duplicating_trials(tmp_path):
    """Kill the driver (and the local Ray it started) after a trial finished; --resume ends the
    sweep with every trial once in Tune, MLflow and the Optuna study."""
    import os
    import signal
    import subprocess
    import sys

    import optuna

    spec = write_spec(tmp_path, """
        space:
          defense.lr: {loguniform: [0.005, 0.05]}
        metric: der
        mode: max
        num_samples: 4
        scheduler: {name: none}
        """, name="resume", concurrent=1)
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    state = tmp_path / "tune" / "resume.d3tune" / "mlflow_state.json"
    cmd = [sys.executable, "-m", "d3tune", "sweep", str(spec)]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                                 stdout=out, stderr=subprocess.STDOUT)
    try:
        finished = _wait_for(lambda: first.poll() is not None or (
            state.exists() and len(load_ledger(state.parent)["done"]) >= 1), 600)
        assert finished and first.poll() is None, log.read_text()[-3000:]
        done_before = load_ledger(state.parent)["done"]
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.wait(30)
    assert first.returncode == -signal.SIGKILL

    proc = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs, parents, steps = mlflow_runs(db)
    assert len(set(parents.values())) == 1 and len(runs) == 1 + len(parents)
    final = load_ledger(state.parent)
    assert len(final["done"]) == 4 and len(set(final["done"])) == 4, proc.stderr[-4000:]
    assert set(done_before) <= set(final["done"])
    import sqlite3

    with sqlite3.connect(db) as con:
        status = dict(con.execute("select run_uuid, status from runs"))
    finished = [c for c in parents if status[c] == "FINISHED"]
    # one finished child per finished trial (none lost, none duplicated); a trial that was in
    # flight at the kill and not continued is closed as KILLED, not left RUNNING
    assert sorted(finished) == sorted(final["children"][t] for t in final["done"])
    assert all(status[c] == "KILLED" for c in parents if c not in finished)
    assert all(steps[c] == 4 for c in finished)
    study = optuna.load_study(study_name="resume",
                              storage=study_storage(tmp_path / "tune" / "resume.d3tune"))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 4 and len(complete) >= len(done_before)


def test_ablation_report_numbers_equal_mlflow_metrics(local_ray, tmp_path, mlflow_db):
    from mlflow.tracking import MlflowClient

    from d3tune.reports.sweep_report import make_report

    spec = tmp_path / "abl.yaml"
    spec.write_text(textwrap.dedent(f"""
        name: abl
        storage: {tmp_path / 'tune'}
        cache_dir: {tmp_path / 'cache'}
        experiment: abl-exp
        """) + TINY_BASE + textwrap.dedent("""
        axes:
          defense.radius: [0.5, 1.5]
        seeds: [0]
        """))
    df = run_plan(load_plan(spec, "ablation"))
    assert len(df) == 2
    out = make_report("abl-exp", tmp_path / "report")
    for name in ("report.md", "report.html", "summary.csv", "trials.csv", "acc_vs_asr.png",
                 "heatmaps.png"):
        assert (out / name).stat().st_size > 0
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv")
    client = MlflowClient(f"sqlite:///{mlflow_db}")
    exp = client.get_experiment_by_name("abl-exp")
    children = [r for r in client.search_runs([exp.experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    parent = next(r for r in client.search_runs([exp.experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/heatmaps.png", "report/report.md"} <= logged
    for r in children:
        radius = float(r.data.params["defense.radius"])
        row = summary[summary["defense.radius"] == radius].iloc[0]
        assert row["der_mean"] == pytest.approx(r.data.metrics["der"])
        assert row["asr_after_mean"] == pytest.approx(r.data.metrics["asr_after"])
    # the spec's name finds the same parent run as its experiment does; a name that is
    # neither is one line naming RUN
    from d3tune.errors import UsageError
    from d3tune.reports.sweep_report import find_parent

    assert find_parent(client, "abl").info.run_id == parent.info.run_id
    with pytest.raises(UsageError, match="RUN 'nope': neither an MLflow run id, an experiment"):
        find_parent(client, "nope")

