"""A search's compute budget: a Tune stopper counting member-seconds, not trials or wall time.
Kept in a module of its own: the stopper is pickled into Tune's snapshots.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ray.tune.stopper import Stopper

from d3tune.runstate import TRIAL_KEY

log = logging.getLogger(__name__)


class ComputeBudget(Stopper):
    """Ends a search once its settings have spent ``limit_s`` member-seconds: the sum, over
    every setting, of its members' own evaluation times (``seconds.<member>`` in its reports),
    so the budget means the same compute however many settings run side by side. Settings
    still running are cut (PRUNED in Optuna). A resumed search counts what the settings ended
    before the resume spent, read from the study (``optuna_search.RESULT_ATTR``)."""

    def __init__(self, limit_s: float, storage: Any = None,
                 study_name: str | None = None) -> None:
        self.limit_s = limit_s
        self.storage, self.study_name = storage, study_name
        self._spent: dict[str, float] = {}
        self._before: dict[str, float] | None = None

    @staticmethod
    def cost(result: Mapping[str, Any]) -> float:
        """A trial result's member-seconds so far (the sum of its members' own times)."""
        return float(sum(v for k, v in result.items()
                         if k.startswith("seconds.") and isinstance(v, (int, float))))

    def _ended_before(self) -> dict[str, float]:
        if self._before is None:
            from d3tune.search.optuna_search import ended_results

            self._before = {} if self.storage is None else {
                key: self.cost(r) for key, r in ended_results(self.storage,
                                                               self.study_name or "").items()}
        return self._before

    def __call__(self, trial_id: str, result: dict) -> bool:
        number = (result.get("config") or {}).get(TRIAL_KEY)
        self._spent[f"optuna:{number}" if number is not None else trial_id] = self.cost(result)
        return False

    def spent(self) -> float:
        """Member-seconds spent by every setting so far, this invocation and earlier ones."""
        return sum({**self._ended_before(), **self._spent}.values())

    def stop_all(self) -> bool:
        spent = self.spent()
        if spent >= self.limit_s:
            log.info("compute budget: %.0f of %.0f member-seconds spent; the search stops",
                     spent, self.limit_s)
        return spent >= self.limit_s
