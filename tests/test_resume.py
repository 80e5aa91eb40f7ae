"""Issue 22: the driver is SIGKILLed at a named moment (``runstate.kill_point``, through
``$D3TUNE_TEST_KILL_AT``: no sleeping and hoping), then ``--resume`` finishes the run. After each
kill, for sweeps (Optuna + ASHA) and ablations alike:

- MLflow holds exactly the planned number of child runs, all FINISHED, no setting twice;
- the Optuna study holds only COMPLETE/PRUNED/FAIL trials, exactly the planned number ended
  (COMPLETE + PRUNED), no parameter set twice;
- ``d3tune report`` and the resumed driver's own summary count each trial once.

Each case runs the CLI twice in subprocesses (a local Ray each): the broad matrix is slow; one
sweep and one ablation kill point stay in the default suite.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("ray")

from d3tune.runstate import KILL_ENV, study_storage  # noqa: E402

BASE = """
base:
  data: {name: digits}
  attack: {name: badnets}
  train: {epochs: 3}
  defense: {name: d3, epochs: 4}
  eval: {subset: 100, every: 1}  # every epoch: the tests count per-epoch steps
"""
# One trial at a time and two learning rates far apart: the seeded sampler draws both and ASHA
# (first rung at epoch 1) stops the weak ones, in the same order every run.
SWEEP = """
space:
  defense.lr: {choice: [0.00001, 0.02]}
  defense.eps: {uniform: [0.0, 0.3]}
metric: der
mode: max
num_samples: 5
max_concurrent: 1
scheduler: {name: asha, grace_period: 1, reduction_factor: 2, metric: der, mode: max}
"""
ABLATION = """
axes:
  defense.radius: [0.5, 1.0, 1.5]
seeds: [0]
max_concurrent: 1
"""
PLANNED = {"sweep": 5, "ablate": 3}

# Where the driver dies: right after an ASHA stop (before and after the run ledger and MLflow
# hear of it), right after a normal finish (Optuna told / ledger written / MLflow closed),
# mid-trial (the driver took epoch 2 while the worker computes epoch 3), at a trial's start,
# and during the final report (before it, and after the parent's artifacts).
# "saved:2": Tune has registered epoch 2's checkpoint and deleted epoch 1's, and not yet written
# the experiment snapshot (which still names epoch 1's): the moment a SLURM requeue once hit.
SWEEP_POINTS = ["told:pruned", "done:stopped", "told:finished", "ledger:finished",
                "done:finished", "result:2", "started", "report", "report:artifacts", "saved:2"]
ABLATION_POINTS = ["result:2", "ledger:finished", "done:finished", "report", "saved:2"]
DEFAULT = {("sweep", "told:pruned"), ("ablate", "done:finished"), ("ablate", "saved:2")}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One backdoored model for every case (it is the same attack): built by the first run."""
    return tmp_path_factory.mktemp("cache")


def _spec(tmp_path: Path, kind: str, cache: Path, checkpoint_every_s: float = 30) -> Path:
    p = tmp_path / f"{kind}.yaml"
    p.write_text(textwrap.dedent(f"""
        name: k{kind}
        storage: {tmp_path / 'tune'}
        cache_dir: {cache}
        experiment: resume
        checkpoint_every_s: {checkpoint_every_s}
        """) + BASE + textwrap.dedent(SWEEP if kind == "sweep" else ABLATION))
    return p


def _kill_then_resume(tmp_path: Path, kind: str, point: str, cache: Path) -> tuple[Path, str]:
    # "saved:N" needs a checkpoint every epoch; the other points keep the default (30 s).
    spec = _spec(tmp_path, kind, cache, 0 if point.startswith("saved:") else 30)
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    env.pop(KILL_ENV, None)
    cmd = [sys.executable, "-m", "d3tune", kind, str(spec)]
    log = tmp_path / "first.log"
    with open(log, "w") as out:  # its own process group: the kill takes its local Ray along
        first = subprocess.Popen(cmd, cwd=tmp_path, env={**env, KILL_ENV: point},
                                 start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = first.wait(900)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    assert rc == -signal.SIGKILL, f"kill point {point} never reached:\n{log.read_text()[-3000:]}"
    proc = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900, start_new_session=True)
    (tmp_path / "resumed.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return db, proc.stdout


def _assert_invariants(tmp_path: Path, kind: str, db: Path, stdout: str, monkeypatch) -> None:
    import optuna
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from d3tune.reports.sweep_report import make_report

    planned = PLANNED[kind]
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert Counter(r.info.status for r in children) == {"FINISHED": planned}
    settings = {tuple(sorted(r.data.params.items())) for r in children}
    assert len(settings) == planned  # no setting finished twice
    assert all("der" in r.data.metrics and r.data.tags.get("d3tune.stopped_early") in
               ("true", "false") for r in children)
    if kind == "sweep":
        study = optuna.load_study(study_name=f"k{kind}", storage=study_storage(
            tmp_path / "tune" / f"k{kind}.d3tune"))
        states = Counter(t.state.name for t in study.trials)
        assert set(states) <= {"COMPLETE", "PRUNED", "FAIL"}, states
        ended = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(ended) == planned, states
        assert len({tuple(sorted(t.params.items())) for t in ended}) == planned
        # the MLflow children and the study agree on which trials stopped early
        stopped = sum(r.data.tags["d3tune.stopped_early"] == "true" for r in children)
        assert stopped == states["PRUNED"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    out = make_report(parents[0].info.run_id, tmp_path / "report")
    assert len(pd.read_csv(out / "trials.csv")) == planned
    assert f"k{kind}: {planned} trials" in stdout  # the resumed driver's summary


CASES = [pytest.param(kind, point, id=f"{kind}-{point}",
                      marks=() if (kind, point) in DEFAULT else pytest.mark.slow)
         for kind, points in (("sweep", SWEEP_POINTS), ("ablate", ABLATION_POINTS))
         for point in points]


@pytest.mark.parametrize("kind,point", CASES)
def test_driver_killed_at_a_named_point_then_resumed_keeps_every_invariant(
        tmp_path, kind, point, shared_cache, monkeypatch):
    db, stdout = _kill_then_resume(tmp_path, kind, point, shared_cache)
    _assert_invariants(tmp_path, kind, db, stdout, monkeypatch)
    if point.startswith("saved:"):  # the snapshot named a deleted checkpoint; it was replaced
        log = " ".join((tmp_path / "resumed.log").read_text().split())  # rich wraps lines
        assert "deleted when the trial wrote a newer checkpoint" in log


@pytest.mark.parametrize("content", [None, b"", b"PK\x03\x04 truncated zip"])
def test_an_unreadable_restored_checkpoint_starts_the_trial_over(tmp_path, content, caplog):
    """What a trial gets from ``tuner.repair_checkpoints``' empty stand-in (no file) or from a
    checkpoint cut short: None (start over, same config and seed) and one warning, never a
    failed trial."""
    import torch
    from ray import tune

    from d3tune.runstate import CHECKPOINT_FILE, read_restored

    if content is not None:
        (tmp_path / CHECKPOINT_FILE).write_bytes(content)
    checkpoint = tune.Checkpoint.from_directory(str(tmp_path))
    with caplog.at_level("WARNING"):
        got = read_restored(checkpoint, CHECKPOINT_FILE,
                            lambda p: torch.load(p, weights_only=True))
    assert got is None and "the trial starts over" in caplog.text
    torch.save({"epoch": 3}, tmp_path / CHECKPOINT_FILE)  # a good one is read as it is
    assert read_restored(checkpoint, CHECKPOINT_FILE,
                         lambda p: torch.load(p, weights_only=True)) == {"epoch": 3}
    assert read_restored(None, CHECKPOINT_FILE, lambda p: 1 / 0) is None  # a fresh trial
