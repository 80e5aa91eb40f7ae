"""A finished trial's last checkpoint is deleted from Tune's storage once its end is recorded.

Why: nothing reads it again. A resumed run replays an ended trial from the ledger
(``engine.replay_if_ended``) before it looks for a checkpoint, and reports do not read
checkpoints. Kept, they add a model-sized folder per trial (1.1 MB on digits, tens of MB for
PreActResNet-18 with D3's state): 2 GB in a 2,000-trial digits sweep (benchmarks/README.md,
sweep_scale). Errored trials keep theirs: ``--resume`` retries them from it. Only sweeps and
ablations drop them (``build_tuner(drop_ended_checkpoints=True)``): a robust search's trial
does not replay from the ledger, it resumes from its checkpoint of member rows (a few kB), and
a driver killed before Tune's next snapshot would otherwise evaluate a finished setting again.
"""
from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)


def drop_ended_checkpoint(trial: Any) -> bool:
    """Delete ``trial``'s last checkpoint from storage (any filesystem Tune writes to); True when
    there was one and it went."""
    checkpoint = trial.checkpoint
    if checkpoint is None:
        return False
    try:
        checkpoint.filesystem.delete_dir(checkpoint.path)
    except OSError as exc:  # gone already, or the storage refused: harmless either way
        log.debug("trial %s: checkpoint %s not deleted (%s)", trial.trial_id, checkpoint.path, exc)
        return False
    return True


class DropEndedCheckpoints(Callback):
    """``build_tuner`` puts it after every other callback, so the run ledger (in the MLflow
    callback) has recorded a trial's end before its checkpoint goes."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        drop_ended_checkpoint(trial)
