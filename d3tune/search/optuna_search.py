"""Ray's OptunaSearch, made the sweep's record of truth and safe across a killed driver.

The Optuna study (SQLite, written synchronously on the driver) records each trial's end the
moment Tune reports it: its state (COMPLETE when it ran its planned epochs, PRUNED when ASHA
stopped it, FAIL on error), its final result (user attr ``d3tune.result``), and its constraint
values. Tune's experiment state is only a snapshot taken every few seconds, so after
``--resume`` Tune may:

- restart a trial that had already ended: the trainable replays its recorded result
  (``engine.replay_table``) and the reports of the repeat are ignored here (Ray's searcher would
  raise ``UpdateFinishedTrialError`` and end the sweep);
- not know trials created after its snapshot, and create as many new ones: ``restore`` finds
  them in the study and ``suggest`` hands them, oldest first, to those new Tune trials. An ended
  one is replayed, an in-flight one runs again under its own Optuna trial (and MLflow child), so
  the study never gains a second trial for one setting nor keeps one RUNNING. The sampler is then
  reseeded, or it would draw the same parameters again.

Kept in its own module: the searcher is pickled into Tune's snapshots.
"""
from __future__ import annotations

import logging
import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict

from d3tune.runstate import FINAL, TRIAL_KEY, kill_point, recorded_result
from d3tune.search.robust_rules import incumbent, member_order
from d3tune.search.robust_trainable import ORDER_KEY, complete
from d3tune.specs.sweep_spec import constraint_values

log = logging.getLogger(__name__)

RESULT_ATTR = "d3tune.result"  # the final result Tune reported (what a replay reports)
TRIAL_ID_ATTR = "d3tune.trial_id"  # the Tune trial id running it (dashboards, MLflow lookups)
NOTE_ATTR = "d3tune.note"  # why a trial ended the way it did, in words


def ended_results(storage: Any, study_name: str) -> dict[str, dict[str, Any]]:
    """``runstate.trial_key`` -> recorded final result, for every trial the study says ended."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # killed before the study was created
        return {}
    return {f"optuna:{t.number}": t.user_attrs[RESULT_ATTR]
            for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and t.state != TrialState.FAIL
            and RESULT_ATTR in t.user_attrs}


def _running(storage: Any, study_name: str) -> tuple[Any, list[Any]]:
    """(study, its trials still RUNNING); (None, []) when the study was never created."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None, []
    return study, study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def fail_running(storage: Any, study_name: str) -> int:
    """Safety net after a sweep: a trial still RUNNING in the study (none is expected: in-flight
    trials are continued or adopted) is failed, saying why, rather than left running."""
    study, running = _running(storage, study_name)
    for t in running:
        study._storage.set_trial_user_attr(
            t._trial_id, NOTE_ATTR, "in flight when the driver was killed; not continued")
        study.tell(t.number, state=TrialState.FAIL)
    return len(running)


def prune_cut(storage: Any, study_name: str, last_results: dict[str, dict[str, Any]],
              metric: str, step_key: str, note: str,
              attrs_of: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Trials still RUNNING in the study after the search ended were cut by its time or
    compute budget (Tune stops them without telling the searcher): tell each PRUNED, with
    ``attrs_of(last result)`` as user attributes and its last value as an intermediate value,
    so a cut trial never looks finished nor stays RUNNING. ``last_results``: Tune trial id ->
    last result. Returns how many were closed."""
    study, running = _running(storage, study_name)
    for t in running:
        result = last_results.get(t.user_attrs.get(TRIAL_ID_ATTR, ""), {}) or {}
        tid = t._trial_id
        for k, v in {**attrs_of(result), NOTE_ATTR: note}.items():
            study._storage.set_trial_user_attr(tid, k, v)
        step, value = result.get(step_key), result.get(metric)
        if isinstance(step, int) and isinstance(value, (int, float)) \
                and step not in t.intermediate_values:
            study._storage.set_trial_intermediate_value(tid, step, float(value))
        study.tell(t.number, state=TrialState.PRUNED)
    return len(running)


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch with the same arguments, plus ``constraints`` (``spec.CONSTRAINTS`` name ->
    limit): their values are set on each trial before it is told (``Trial.set_constraint``),
    so samplers and ``study.best_trials`` treat a trial outside them as infeasible."""

    # The result field that numbers a trial's intermediate values (a sweep's epochs; a robust
    # search reports once per member and overrides it with its members done).
    step_key = "training_iteration"

    def __init__(self, *args: Any, constraints: tuple[tuple[str, float], ...] = (),
                 **kwargs: Any) -> None:
        self._constraints = tuple(constraints)
        # (number, storage id) of study trials Tune's snapshot does not know, oldest first
        self._orphans: list[tuple[int, int]] = []
        super().__init__(*args, **kwargs)

    # -- study set-up ------------------------------------------------------------------------

    def _metrics(self) -> list[str]:
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]

    def _setup_study(self, mode: Any) -> None:
        # Ray enqueues points_to_evaluate every time it sets the study up; on a study loaded
        # from storage (a resumed or restarted search) they were enqueued already, and enqueuing
        # again would run them twice. So they go in only while the study is empty.
        # (With evaluated_rewards Ray adds finished trials instead: left to Ray.)
        points = [] if self._evaluated_rewards else self._points_to_evaluate
        if points:
            self._points_to_evaluate = []
        super()._setup_study(mode)
        if points:
            self._points_to_evaluate = points
            if self._ot_study.get_trials(deepcopy=False):
                log.info("study %s: start points already enqueued", self._study_name)
            else:
                for point in points:
                    self._ot_study.enqueue_trial(point)
        # optuna-dashboard shows "0", "1" for unnamed objectives.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(self._metrics())

    def _finished(self, ot_trial: Any) -> bool:
        return self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()

    # -- suggestions -------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict | None:
        while self._orphans and trial_id not in self._ot_trials:
            number, study_trial_id = self._orphans.pop(0)
            frozen = self._ot_study._storage.get_trial(study_trial_id)
            if frozen.state == TrialState.FAIL:
                continue  # failed before the kill: nothing to continue
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, frozen._trial_id)
            if frozen.state == TrialState.RUNNING:
                self._ot_study._storage.set_trial_user_attr(frozen._trial_id, TRIAL_ID_ATTR,
                                                            trial_id)
                self._ot_study._storage.set_trial_user_attr(
                    frozen._trial_id, NOTE_ATTR, "in flight when the driver was killed; "
                    f"run again from its start as Tune trial {trial_id} after --resume")
            log.info("Tune trial %s takes Optuna trial %d (%s when the driver was killed)",
                     trial_id, number, frozen.state.name)
            return {**unflatten_dict(dict(frozen.params)), TRIAL_KEY: number}
        config = super().suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
        return {**config, TRIAL_KEY: ot_trial.number}

    # -- results -----------------------------------------------------------------------------

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Intermediate values (one objective only: Optuna keeps none for several). Ignored for
        a trial that already ended (a repeat after --resume) and for a step already reported
        (a trial Tune restarted from its start): Optuna would warn or raise."""
        ot_trial = self._ot_trials.get(trial_id)
        if isinstance(self.metric, list) or ot_trial is None or result.get("replayed"):
            return
        frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
        step = result.get(self.step_key)
        if frozen.state.is_finished() or step in frozen.intermediate_values:
            log.debug("trial %s: result for an ended trial or a reported step ignored", trial_id)
            return
        value = result.get(self.metric)
        if not (isinstance(step, int) and isinstance(value, (int, float))):
            return
        try:
            ot_trial.report(float(value), step)
        except optuna.exceptions.UpdateFinishedTrialError:  # pragma: no cover - raced
            log.debug("trial %s: result for a finished Optuna trial ignored", trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        """COMPLETE only for a trial that ran its planned epochs (``runstate.FINAL``); one ASHA
        stopped is PRUNED, its last values kept as user attrs (and as intermediate values
        for one objective), so it never sits on a front; an error is FAIL. Constraint values
        are set on COMPLETE trials only: a stopped trial's figures are partial, so they say
        nothing about whether the setting keeps a constraint (TPE ranks pruned trials by how
        far they got and their last value instead)."""
        ot_trial = self._ot_trials.get(trial_id)
        if trial_id in self._completed_trials or ot_trial is None:
            return
        self._completed_trials.add(trial_id)
        if self._finished(ot_trial):  # a repeat after --resume: the study keeps its first end
            log.debug("trial %s: its Optuna trial already ended; completion ignored", trial_id)
            return
        values = [(result or {}).get(m) for m in self._metrics()]
        known = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        if error:
            state = TrialState.FAIL
        elif not known:  # stopped before its first result
            state = TrialState.PRUNED
        else:
            state = TrialState.COMPLETE if result.get(FINAL, True) else TrialState.PRUNED
        storage, tid = self._ot_study._storage, ot_trial._trial_id
        if result:
            storage.set_trial_user_attr(tid, RESULT_ATTR, recorded_result(result))
        if state == TrialState.PRUNED and known:
            step = result.get(self.step_key)
            if (not isinstance(self.metric, list) and isinstance(step, int)
                    and step not in storage.get_trial(tid).intermediate_values):
                # Tune does not pass the result that stopped a trial to the searcher
                ot_trial.report(float(values[0]), step)
            storage.set_trial_user_attr(tid, "d3tune.last_values",
                                        dict(zip(self._metrics(), map(float, values))))
            storage.set_trial_user_attr(tid, NOTE_ATTR, self.stop_note(result))
        if state == TrialState.COMPLETE and self._constraints:
            for name, value in self.constraint_values(result).items():
                ot_trial.set_constraint(name, value)
        try:
            self._ot_study.tell(ot_trial, values if state == TrialState.COMPLETE else None,
                                state=state)
        except (ValueError, RuntimeError) as exc:  # e.g. NaN: say it in our words
            log.warning("trial %s: Optuna could not record its result (%s)", trial_id, exc)
        kill_point(f"told:{'finished' if state == TrialState.COMPLETE else state.name.lower()}")

    def constraint_values(self, result: dict) -> dict[str, float]:
        """The trial's constraint values (<= 0: within), from its final result."""
        return constraint_values(self._constraints, result)

    def stop_note(self, result: dict) -> str:
        """Why a trial stopped early, for its Optuna user attributes."""
        return f"stopped early by the scheduler at epoch {result.get('epoch')}"

    # -- resume ------------------------------------------------------------------------------

    def restore(self, checkpoint_path: str) -> None:
        """Tune's snapshot may predate trials the study already holds: queue them (oldest
        first) for the new Tune trials the resumed sweep will create, and reseed the sampler
        so it does not draw their parameters again."""
        super().restore(checkpoint_path)
        self.__dict__.setdefault("_constraints", ())
        known = {t.number for t in self._ot_trials.values()}
        trials = self._ot_study.get_trials(deepcopy=False)
        self._orphans = [(t.number, t._trial_id) for t in trials if t.number not in known]
        for t in self._ot_trials.values():  # in flight at the kill and restarted by Tune
            if self._ot_study._storage.get_trial(t._trial_id).state == TrialState.RUNNING:
                t.set_user_attr(NOTE_ATTR, "in flight when the driver was killed; continued by "
                                "Tune after --resume (from its last checkpoint, if it had one)")
        if self._orphans:
            log.info("resume: %d Optuna trials were created after Tune's last snapshot: they "
                     "are continued, not drawn again", len(self._orphans))
            self._reseed(len(trials))

    def _reseed(self, salt: int) -> None:
        """Deterministically (same study, same draw), where the sampler allows it."""
        sampler = self._ot_study.sampler
        seeded = False
        for obj in (sampler, getattr(sampler, "_random_sampler", None)):
            rng = getattr(getattr(obj, "_rng", None), "rng", None)
            if rng is not None:
                rng.seed((zlib.crc32(str(self._study_name).encode()) + 7919 * salt) % 2**32)
                seeded = True
        if not seeded:
            sampler.reseed_rng()


class RobustOptunaSearch(ResumableOptunaSearch):
    """Adds a member order to each suggested config (the incumbent's weakest members first) and
    stores each finished trial's figures as Optuna user attributes.

    What the study is told: a setting evaluated on every member is COMPLETE, with its worst case
    as the value and its mean ACC drop against the budget as a constraint. A setting stopped
    before its last member (exact pruning, or the search's time budget) is PRUNED: its running
    worst case is only an upper bound and its ACC drop covers some members, so neither may
    stand for a finished setting (TPE's good group, ``study.best_trials``, the constraint). Its
    running worst cases are the intermediate values, one per member done."""

    step_key = "members_done"

    def __init__(self, *args: Any, member_ids: Sequence[str], max_acc_drop: float,
                 **kwargs: Any) -> None:
        super().__init__(*args, constraints=(("max_acc_drop", max_acc_drop),), **kwargs)
        self._member_ids = list(member_ids)
        self._max_acc_drop = max_acc_drop
        self._settings_done: dict[str, dict[str, Any]] = {}

    def constraint_values(self, result: dict) -> dict[str, float]:
        """The ACC-budget constraint of a complete setting (<= 0: within); none for a pruned
        one."""
        return {"max_acc_drop": float(result["mean_acc_drop"]) - self._max_acc_drop}

    def stop_note(self, result: dict) -> str:
        """Why a setting stopped before its last member (pruned or cut), for Optuna."""
        return (f"stopped after {result.get('members_done')} of {result.get('members_total')} "
                "members (exact pruning or the search's time budget)")

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            best = incumbent(self._settings_done.values(), self._max_acc_drop)
            config = {**config, ORDER_KEY: member_order(
                self._member_ids, best["ders"] if best else None)}
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if result and "worst_der" in result and ot_trial is not None \
                and trial_id not in self._completed_trials:
            ders = {m: result[f"der.{m}"] for m in self._member_ids if f"der.{m}" in result}
            attrs = {"worst_der": result["worst_der"], "mean_der": result["mean_der"],
                     "mean_acc_drop": result["mean_acc_drop"],
                     "members_done": result["members_done"], "pruned": not complete(result),
                     "tune_trial_id": trial_id}
            try:
                for k, v in {**attrs, **{f"der.{m}": v for m, v in ders.items()}}.items():
                    ot_trial.set_user_attr(k, v)
            except Exception as exc:  # noqa: BLE001 - e.g. a trial finished before a resume
                log.debug("trial %s: user attributes not stored (%s)", trial_id, exc)
            self._settings_done[trial_id] = {**attrs, "complete": complete(result), "ders": ders}
        super().on_trial_complete(trial_id, result, error)
