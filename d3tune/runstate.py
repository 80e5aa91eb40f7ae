"""Names and folders every Tune run shares (sweep, ablation, robust search): where a run's state
lives, how a trial is known across a resume, what a reported result keeps.

Why one low module: the engine, the searchers and the MLflow callbacks all read and write the
same run state (the Optuna study, the run ledger, the per-epoch checkpoint, the ``final`` flag);
when these names lived in the engine, the modules the engine drives had to import it back.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OPTUNA_DB = "optuna.db"  # the study of a run an older d3tune started (SQLite)
OPTUNA_JOURNAL = "optuna.journal"  # the study: Optuna's append-only journal file
CHECKPOINT_FILE = "defense_state.pt"
TRIAL_KEY = "d3tune.trial"  # a sweep trial's Optuna number, carried in its Tune config
FINAL = "final"  # reported with every epoch: True at the trial's last planned epoch
KILL_ENV = "D3TUNE_TEST_KILL_AT"  # tests: SIGKILL the driver at this named point
# Tune fills these in every result; they say nothing about the trial's outcome. Tune's
# "node_ip" (the node the trial ran on) is not among them: the trial's MLflow run records it.
TUNE_KEYS = {"trial_id", "timestamp", "time_this_iter_s", "done", "training_iteration", "date",
             "time_total_s", "pid", "hostname", "time_since_restore",
             "iterations_since_restore", "checkpoint_dir_name", "should_checkpoint",
             "experiment_tag", "replayed"}


@dataclass(frozen=True)
class RunPaths:
    """Where one named run keeps Tune's experiment and d3tune's own state."""

    name: str
    storage: str

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage).expanduser().resolve() / self.name

    @property
    def state_dir(self) -> Path:
        """d3tune's own state (Optuna study, MLflow run map) beside Tune's experiment folder,
        not inside it: a restored Tune run syncs a copy of its folder taken at restore time
        back over it when it ends, which would roll these files back."""
        return self.experiment_dir.parent / f"{self.name}.d3tune"

    @property
    def optuna_storage(self) -> Any:
        """The run's Optuna study storage (``study_storage``)."""
        return study_storage(self.state_dir)

    @property
    def has_study(self) -> bool:
        """Whether the run's study has been created (in either form)."""
        return has_study(self.state_dir)

    @property
    def optuna_url(self) -> str:
        """Where the study is, as ``optuna-dashboard`` takes it: the journal file's path, or
        the SQLite URL of a run an older d3tune started."""
        db = self.state_dir / OPTUNA_DB
        return f"sqlite:///{db}" if db.exists() else str(self.state_dir / OPTUNA_JOURNAL)


def study_storage(state_dir: Path) -> Any:
    """A run's Optuna study storage: a journal file (Optuna's ``JournalStorage``), one appended
    record per change, persistent and resumable like SQLite. Why not SQLite: its transaction
    per ask and tell cost the driver about 26 ms of CPU per trial at 100 trials and 41 ms at
    2,000, against 3.5 ms for the journal (benchmarks/sweep_scale.py), and on a small machine
    that CPU comes out of the trials'. A run an older d3tune started keeps its SQLite file."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    db = state_dir / OPTUNA_DB
    if db.exists():
        return optuna.storages.RDBStorage(f"sqlite:///{db}")
    return optuna.storages.JournalStorage(JournalFileBackend(str(state_dir / OPTUNA_JOURNAL)))


def storage_at(location: str) -> Any:
    """The study storage a recorded location names (``RunPaths.optuna_url``, e.g. the
    ``d3tune.optuna_storage`` tag of a run's MLflow parent): a database URL as is, a journal
    file's path as a ``JournalStorage``."""
    if "://" in location:
        return location
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if not Path(location).is_file():
        raise KeyError(f"no Optuna journal at {location}")
    return optuna.storages.JournalStorage(JournalFileBackend(location))


def has_study(state_dir: Path) -> bool:
    """Whether a run's study has been created, in either form."""
    return any((state_dir / f).exists() for f in (OPTUNA_JOURNAL, OPTUNA_DB))


def recorded_result(result: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a Tune result worth keeping: the trial's own plain scalars."""
    out = {}
    for k, v in (result or {}).items():
        if k in TUNE_KEYS or "/" in k or not isinstance(v, (int, float, str, bool)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return out


def kill_point(name: str) -> None:
    """Test hook: when ``$D3TUNE_TEST_KILL_AT`` names this point, SIGKILL the driver here (with
    its process group, i.e. the local Ray it started, when it leads one). Lets tests kill the
    driver at an exact moment (right after an ASHA stop, between the Optuna tell and the
    ledger, ...) instead of sleeping and hoping."""
    if os.environ.get(KILL_ENV) != name:
        return
    import logging
    import signal

    logging.getLogger(__name__).warning("test hook %s=%s: killing the driver", KILL_ENV, name)
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def read_restored(checkpoint: Any, name: str, read: Callable[[Path], Any]) -> Any | None:
    """The file ``name`` of the Tune checkpoint a retried or resumed trial got, read by ``read``;
    None when it is missing or unreadable, and the trial starts over (same config and seed, same
    result; the epochs MLflow already holds are not logged twice). Why not fail: after a driver
    died mid-checkpoint the folder Tune restores from can be an empty stand-in
    (``tuner.repair_checkpoints``), and failing there would fail the whole resumed run."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        try:
            return read(Path(d) / name)
        except Exception as exc:  # missing, truncated or foreign: start the trial over
            log.warning("checkpoint %s unreadable (%s): the trial starts over", Path(d) / name,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None


def trial_key(config: dict[str, Any]) -> str:
    """What a trial *is*, independent of Tune's trial id (which a resumed Tune may change):
    a sweep trial's Optuna number, an ablation cell's content."""
    if TRIAL_KEY in config:
        return f"optuna:{int(config[TRIAL_KEY])}"
    return "cell:" + json.dumps(config.get("cell") or {k: v for k, v in config.items()
                                                         if not k.startswith("d3tune.")},
                                sort_keys=True, default=str)


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Tune's config -> flat dotted trial overrides (grid cells arrive under 'cell'; per-defense
    knobs as 'field@defense')."""
    out = {k.split("@", 1)[0]: v for k, v in config.items()
           if k != "cell" and not k.startswith("d3tune.")}
    out.update(config.get("cell") or {})
    return out


def trial_from_tune(base: dict[str, Any], config: dict[str, Any]):
    """The validated trial config a Tune config stands for (``base`` plus its overrides)."""
    from d3tune.config import flatten, resolve, trial_config, unflatten

    return resolve(trial_config(unflatten({**flatten(base), **trial_overrides(config)})))


def now_ms() -> int:
    """MLflow's timestamps: milliseconds since the epoch."""
    return int(time.time() * 1000)


def write_json(path: Path, data: Any, **dump: Any) -> None:
    """Write JSON atomically (temp file + rename): a driver killed mid-write leaves the old
    file, never half of a new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, **dump))
    os.replace(tmp, path)


def check_resume(exists: bool, resume: bool, where: Path, what: str, name: str) -> None:
    """``--resume`` needs an interrupted run of this name at ``where``; a new run must not
    overwrite one (UsageError, one line, either way)."""
    from d3tune.errors import UsageError

    if resume and not exists:
        raise UsageError(f"--resume: no interrupted {what} at {where} (spec name {name!r})")
    if not resume and exists:
        raise UsageError(f"{where} already holds a {what} named {name!r}: pass --resume to "
                         "continue it, or change the spec's name/storage")

