"""Where a run's Optuna study lives: a journal file for a new run, the SQLite file of a run an
older d3tune started (kept, so it resumes), and the recorded location read back for reports."""
from __future__ import annotations

import optuna
import pytest

from d3tune.runstate import OPTUNA_DB, OPTUNA_JOURNAL, RunPaths, storage_at, study_storage


def _one_trial(storage) -> None:
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)


def test_a_new_run_keeps_its_study_in_a_journal_that_survives_the_process(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    paths = RunPaths("s", str(tmp_path))
    paths.state_dir.mkdir(parents=True)
    assert not paths.has_study
    _one_trial(paths.optuna_storage)
    assert (paths.state_dir / OPTUNA_JOURNAL).is_file() and paths.has_study
    assert not (paths.state_dir / OPTUNA_DB).exists()
    _one_trial(study_storage(paths.state_dir))  # a fresh storage object: a resumed driver
    again = optuna.load_study(study_name="s", storage=storage_at(paths.optuna_url))
    assert len(again.trials) == 2 and paths.optuna_url == str(paths.state_dir / OPTUNA_JOURNAL)


def test_a_run_an_older_version_started_keeps_its_sqlite_study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    paths = RunPaths("s", str(tmp_path))
    paths.state_dir.mkdir(parents=True)
    _one_trial(f"sqlite:///{paths.state_dir / OPTUNA_DB}")
    assert paths.has_study and paths.optuna_url.startswith("sqlite:///")
    _one_trial(paths.optuna_storage)  # resumed by this version: the same study, no journal
    assert not (paths.state_dir / OPTUNA_JOURNAL).exists()
    assert len(optuna.load_study(study_name="s", storage=storage_at(paths.optuna_url)).trials) == 2


def test_a_recorded_journal_that_is_gone_is_a_key_error(tmp_path):
    with pytest.raises(KeyError, match="no Optuna journal"):
        storage_at(str(tmp_path / "moved" / OPTUNA_JOURNAL))
