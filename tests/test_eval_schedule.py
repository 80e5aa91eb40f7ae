"""The evaluation schedule (issue 31): by default a trial evaluates the first epoch, then as
often as keeps periodic evaluation within ``eval.share`` of training time (by a cost model, so
reproducibly), and always the scheduler's rung epochs and the last epoch on the full sets;
``eval.every`` fixes the interval. Final metrics and rung-epoch values never depend on it."""
from __future__ import annotations

import pytest

from d3tune import trial as trial_module
from d3tune.cache import ModelCache
from d3tune.config import resolve, trial_config
from d3tune.data import Dataset, load_dataset
from d3tune.errors import UsageError
from d3tune.eval_schedule import DEFAULT_EVAL_SHARE, auto_interval, due_epochs, interval_for

FINAL = ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after", "der")


def cfg(epochs: int, **eval_fields):
    return resolve(trial_config({"device": "cpu", "train": {"epochs": 1},
                                 "data": {"clean_count": 16}, "defense": {"epochs": epochs},
                                 "eval": {"subset": 16, **eval_fields}}))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> ModelCache:
    return ModelCache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def data() -> Dataset:
    d = load_dataset("digits")
    return Dataset(d.name, d.x_train[:400], d.y_train[:400], d.x_test[:150], d.y_test[:150],
                   d.num_classes, d.mean, d.std, d.hflip)


def test_interval_keeps_evaluation_within_its_share():
    # The PreActResNet-18 record of issue 31, measured: ~1.08 s training and ~2.8 s subset
    # evaluation per epoch; the cost model (67 clean images, 256 + 256 scored) agrees.
    k = auto_interval(1.08, 2.8, 0.15)
    assert k == 15 == interval_for(67, 512)
    assert 2.8 / (k * 1.08 + 2.8) <= 0.15 < 2.8 / ((k - 1) * 1.08 + 2.8)
    assert interval_for(1000, 512) == 1  # Fashion-MNIST's 1,000 clean images: a full curve
    assert auto_interval(1.0, 0.0, 0.15) == auto_interval(0.0, 1.0, 0.15) == 1
    assert auto_interval(1.0, 5.0, 1.0) == 1
    assert interval_for(67, 512, share=0.5) < k


def test_due_epochs_keep_the_first_rung_and_last_epochs():
    assert due_epochs(100, 15, (5.0, 10.0, 20.0, 40.0, 80.0), first=True) == {
        1, 5, 10, 15, 20, 30, 40, 45, 60, 75, 80, 90, 100}
    assert due_epochs(7, 3, (1.5,)) == {2, 3, 6, 7}  # a fixed interval: no extra first epoch
    assert due_epochs(4, 1) == {1, 2, 3, 4}
    assert due_epochs(40, 10**9) == {40}  # robust searches: the last epoch only


def test_eval_fields_are_validated():
    assert trial_config({}).eval.every is None
    assert trial_config({}).eval.share == DEFAULT_EVAL_SHARE
    for bad in ({"every": 0}, {"share": 0}, {"share": 1.5}, {"every": "often"}):
        with pytest.raises(UsageError, match="eval."):
            trial_config({"eval": bad})


def test_default_schedule_thins_the_curve_and_keeps_final_and_rung_metrics(data, cache):
    """Digits with 16 clean images against 16 + 16 scored: k = ceil(32 * 0.85 / (0.15 * 48)) = 4.
    The default evaluates epochs 1, 3 (a rung), 4, 8, 9 (the last) and ends on the same final
    metrics, on the same rung values, as evaluating every epoch; twice, the same rows."""
    every = trial_module.run_trial(cfg(9, every=1), cache=cache, data=data, full_eval_at=(3.0,))
    auto = trial_module.run_trial(cfg(9), cache=cache, data=data, full_eval_at=(3.0,))
    again = trial_module.run_trial(cfg(9), cache=cache, data=data, full_eval_at=(3.0,))
    assert [r["epoch"] for r in auto.history] == [1, 3, 4, 8, 9]
    assert [r["eval_full"] for r in auto.history] == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert auto.history == again.history  # reproducible, not timing-dependent
    assert {k: auto.metrics[k] for k in FINAL} == {k: every.metrics[k] for k in FINAL}
    for row in auto.history:  # the same values at the epochs both evaluated
        assert row == every.history[row["epoch"] - 1]


def test_stopping_at_a_rung_ends_on_the_rung_epoch(data, cache):
    stop_at_rung = lambda row: row["epoch"] == 6  # noqa: E731
    result = trial_module.run_trial(cfg(9), report=stop_at_rung, cache=cache, data=data,
                                    full_eval_at=(6.0,))
    assert result.stopped_early and [r["epoch"] for r in result.history] == [1, 4, 6]
    assert result.history[-1]["eval_full"] == 1.0
    assert result.metrics["acc_after"] == result.history[-1]["acc"]
