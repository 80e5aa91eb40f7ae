"""The command line: the default run end to end, and bad input as one line with exit 2."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from d3tune.cli import main


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_LOGGING_LEVEL", None)  # as a user's shell has it (conftest sets it)
    env["D3TUNE_CACHE_DIR"] = str(tmp_path / "cache")
    return env


def _metrics(db: Path) -> dict[str, float]:
    with sqlite3.connect(db) as con:
        rows = con.execute("select key, value from latest_metrics").fetchall()
        steps = con.execute("select count(*) from metrics where key = 'asr'").fetchone()[0]
    return {**dict(rows), "_asr_steps": steps}


def test_default_run_end_to_end_logs_to_sqlite_mlflow(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "d3tune", "run", "--attack", "badnets",
                           "--defense", "d3"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    assert " INFO mlflow" not in proc.stderr, proc.stderr  # d3tune's words or nothing
    bars = [ln.split()[:2] for ln in proc.stderr.splitlines() if "━" in ln]
    assert bars == [["backdoored", "model"], ["defense", "d3"]], proc.stderr
    m = _metrics(tmp_path / "mlflow.db")
    for key in ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after", "der"):
        assert key in m
    assert m["asr_before"] >= 0.9 and m["asr_after"] <= 0.2
    assert m["acc_before"] - m["acc_after"] <= 0.08
    # one per evaluated defense epoch: 40 epochs on 143 clean images, 256 + 256 scored, so the
    # default schedule evaluates every 7th (d3tune/eval_schedule.py): 1, 7, 14, ..., 35, 40
    assert m["_asr_steps"] == 7
    result = next((tmp_path / "d3tune_results" / "runs").glob("*/result.json"))
    assert json.loads(result.read_text())["metrics"]["asr_after"] == pytest.approx(m["asr_after"])
    artifacts = list((tmp_path / "mlartifacts").rglob("defended.safetensors"))
    assert len(artifacts) == 1


@pytest.mark.parametrize("argv,needle", [
    (["run", "--attack", "badnet"], "badnet"),
    (["run", "--arch", "resnet9000"], "resnet9000"),
    (["run", "--dataset", "mnist"], "mnist"),
    (["run", "--clean-ratio", "1.5"], "data.clean_ratio"),
    (["run", "--set", "attack.ratio=-0.1"], "attack.ratio"),
    (["run", "--set", "defense.lr=0"], "defense.lr"),
    (["run", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["run", "--dataset", "gtsrb"], "data-dir"),
    (["run", "--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    (["run", "--set", "defense.epz=1"], "defense.epz"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "d3tune", "run", "--attack", "badnet"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "did you mean 'badnets'" in proc.stderr


def test_list_names_registries(capsys):
    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    assert "badnets" in out and "blended" in out
    assert main(["list", "defenses"]) == 0  # with each paper, from the registry entries
    out = capsys.readouterr().out
    assert "  d3: Wei, Liu, Zha: Distance-Driven Detoxification (D3), ICCV 2025" in out
    assert "  fst: Min et al." in out


def test_run_without_a_reachable_mlflow_store_keeps_its_results(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("D3TUNE_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        rc = main(["run", "--set", "train.epochs=2", "--epochs", "2", "--set", "eval.subset=50"])
    assert rc == 0
    result = next((tmp_path / "d3tune_results" / "runs").glob("*/result.json"))
    assert "der" in json.loads(result.read_text())["metrics"]
    assert any("MLflow unavailable" in r.getMessage() for r in caplog.records)


def test_bad_data_is_refused_before_any_output(tmp_path, capsys, monkeypatch):
    """A dataset folder that fails to load: the error line is all the user sees (no progress bars
    drawn at 0 first), and nothing is started (no results folder)."""
    from test_real_datasets import write_cifar

    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path / "cifar")
    (tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch").write_bytes(b"junk")
    rc = main(["run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"),
               "--no-mlflow", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.strip().startswith("d3tune: error: cifar10: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _bar_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "━" in ln]


def test_bars_show_only_the_work_that_happens(tmp_path, capsys, monkeypatch):
    """The first run trains the backdoored model (its bar ends full), the second loads it from the
    cache: no bar for training that does not happen; the defense bar each time."""
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--set", "train.epochs=1", "--epochs", "1", "--set", "eval.subset=50",
            "--no-mlflow", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    bars = _bar_lines(capsys.readouterr().err)
    assert [ln.split()[:2] for ln in bars] == [["backdoored", "model"], ["defense", "d3"]], bars
    assert all("1/1" in ln for ln in bars), bars
    assert main(argv) == 0
    bars = _bar_lines(capsys.readouterr().err)
    assert [ln.split()[:2] for ln in bars] == [["defense", "d3"]], bars
    assert "1/1" in bars[0]


def test_threads_pins_torch_and_is_recorded(tmp_path):
    """A result depends on torch's thread count (float sums in another order), so `run
    --threads N` pins it and records it: a run started with 2 threads in its environment but
    `--threads 1` gives exactly the metrics of the one-thread trial that robust searches,
    leaderboards and ablations run (``resources.cpu: 1``), and says it used 1 thread."""
    import torch

    from d3tune.config import resolve, trial_config
    from d3tune.trial import run_trial

    fields = {"train": {"epochs": 3}, "defense": {"epochs": 3}, "eval": {"subset": 50}}
    env = {**_env(tmp_path), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "d3tune", "run", "--threads", "1", "--no-cache",
                           "--set", "train.epochs=3", "--epochs", "3", "--set", "eval.subset=50"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(next((tmp_path / "d3tune_results" / "runs").glob("*/result.json"))
                        .read_text())
    assert record["threads"] == 1
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        (value,) = con.execute("select value from params where key = 'runtime.threads'").fetchone()
    assert value == "1"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = run_trial(resolve(trial_config(fields))).metrics
    finally:
        torch.set_num_threads(before)
    assert record["metrics"] == alone


def test_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--threads", "0"])
    assert exc.value.code == 2
    assert "argument --threads: expected an integer >= 1, got '0'" in capsys.readouterr().err
