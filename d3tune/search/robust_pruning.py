"""Exact pruning: a driver-side Tune scheduler that stops a setting once its running worst case
can no longer make it a finalist. It only applies ``robust_rules.should_prune`` (pure, tested
without Ray). Kept in a module of its own: the scheduler is pickled into Tune's snapshots.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from d3tune.search.robust_rules import Finished, prune_threshold, should_prune
from d3tune.search.robust_trainable import complete

log = logging.getLogger(__name__)


class ExactPruning(FIFOScheduler):
    """Stops a trial whose running worst case can no longer make it a finalist (see
    ``robust_rules``). Stateless: the finished settings are read from the controller's trials
    every time, so a resumed search prunes against the settings finished before the resume."""

    def __init__(self, top_k: int, max_acc_drop: float, record: str | None = None) -> None:
        super().__init__()
        self.top_k = top_k
        self.max_acc_drop = max_acc_drop
        self.record = record  # a JSON file listing the pruned trials (the report counts them)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if complete(result):
            return TrialScheduler.CONTINUE
        finished = [Finished(t.last_result["worst_der"], t.last_result["mean_acc_drop"])
                    for t in tune_controller.get_trials()
                    if t is not trial and t.status == "TERMINATED" and complete(t.last_result)]
        threshold = prune_threshold(finished, self.top_k, self.max_acc_drop)
        if should_prune(result["worst_der"], threshold):
            log.info("exact pruning: trial %s stopped after %d/%d members (running worst-case DER "
                     "%.4f < %.4f, the worst of the top_k=%d admissible)", trial.trial_id,
                     result["members_done"], result["members_total"], result["worst_der"],
                     threshold, self.top_k)
            if self.record:
                path = Path(self.record)
                pruned = json.loads(path.read_text()) if path.exists() else {}
                pruned[trial.trial_id] = {"members_done": result["members_done"],
                                          "members_total": result["members_total"],
                                          "worst_der": result["worst_der"], "threshold": threshold}
                path.write_text(json.dumps(pruned, indent=1))
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE
