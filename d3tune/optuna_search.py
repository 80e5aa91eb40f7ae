"""Ray's OptunaSearch, made safe for a trial that runs again after ``--resume``.

Tune snapshots its experiment every few seconds (and at every trial checkpoint); a driver killed
between a trial's end and the next snapshot comes back with that trial still marked running, and
Tune runs it again. Its Optuna trial is already finished in the persistent study, so Ray's
``on_trial_result`` would raise ``UpdateFinishedTrialError`` and end the whole sweep. The study
keeps the first, complete result; the repeat's reports are ignored (``on_trial_complete`` already
only warns in that case). Kept in its own module: the searcher is pickled into Tune's snapshots.
"""
from __future__ import annotations

import logging

import optuna
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.debug("trial %s: its Optuna trial finished before the resume; result ignored",
                      trial_id)
