"""Cheap per-epoch evaluation by default (issue 17): epochs before the last are scored on a fixed,
class-stratified subset of the test sets; "before", the last epoch, a scheduler's decision epochs
and an early-stopped trial's final metrics always use the full sets, so final metrics do not
depend on the subset. channels_last is the CPU default and leaves the metrics unchanged."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from d3tune.cache import ModelCache
from d3tune.cli import build_parser, trial_dict_from_args
from d3tune.config import DEFAULT_EVAL_SUBSET, EvalConfig, resolve, trial_config
from d3tune.data import load_dataset
from d3tune.errors import UsageError
from d3tune.metrics import EvalSets, evaluate, stratified_indices
from d3tune.train import CHANNELS_LAST_ENV, prepare_model
from d3tune.trial import asha_rungs, eval_subset_sets, run_trial

FINAL = ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after", "der")


def cfg_with(subset: int, epochs: int = 3, every: int | None = 1, **extra):
    """Every epoch evaluated unless ``every`` says otherwise (None: the timing-based default)."""
    return resolve(trial_config({"device": "cpu", "train": {"epochs": 1},
                                 "defense": {"epochs": epochs},
                                 "eval": {"subset": subset, "every": every}, **extra}))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> ModelCache:
    return ModelCache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def data():
    from d3tune.data import Dataset

    d = load_dataset("digits")
    return Dataset(d.name, d.x_train[:400], d.y_train[:400], d.x_test[:150], d.y_test[:150],
                   d.num_classes, d.mean, d.std, d.hflip)


# --------------------------------------------------------------------------------------------
# The subset


def test_stratified_indices_give_each_class_its_share():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    for n, shares in ((10, [5, 3, 2]), (7, [4, 2, 1]), (33, [16, 10, 7])):
        idx = stratified_indices(y, n, torch.Generator().manual_seed(0))
        assert len(idx) == n == len(idx.unique())
        assert y[idx].bincount().tolist() == shares
    assert stratified_indices(y, 500, torch.Generator()).tolist() == list(range(100))


def test_subset_is_stratified_and_fixed_per_seed():
    d = load_dataset("digits")
    sets = EvalSets(d.x_test, d.y_test, d.x_test, torch.zeros_like(d.y_test), d.y_test)
    cfg = cfg_with(64)
    a, b = eval_subset_sets(cfg, sets), eval_subset_sets(cfg, sets)
    assert len(a.y_clean) == 64 and len(a.y_bd_true) == 64
    assert torch.equal(a.x_clean, b.x_clean) and torch.equal(a.x_bd, b.x_bd)  # fixed per seed
    other = eval_subset_sets(replace(cfg, seed=1), sets)
    assert not torch.equal(a.y_clean, other.y_clean) or not torch.equal(a.x_clean, other.x_clean)
    full = d.y_test.bincount().double() / len(d.y_test) * 64
    got = a.y_clean.bincount(minlength=10).double()
    assert ((got - full).abs() < 1).all()  # every class within one image of its share
    assert eval_subset_sets(replace(cfg, eval=EvalConfig(subset=0)), sets) is sets


# --------------------------------------------------------------------------------------------
# Final metrics never depend on it


def test_final_metrics_identical_with_and_without_the_subset(data, cache):
    sub = run_trial(cfg_with(16), cache=cache, data=data)
    full = run_trial(cfg_with(0), cache=cache, data=data)
    assert {k: sub.metrics[k] for k in FINAL} == {k: full.metrics[k] for k in FINAL}
    assert [r["eval_full"] for r in sub.history] == [0.0, 0.0, 1.0]
    assert [r["eval_full"] for r in full.history] == [1.0, 1.0, 1.0]
    # Same training either way; only what earlier epochs were scored on differs.
    for a, b in zip(sub.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(a, b)
    assert sub.history[-1]["acc"] == full.history[-1]["acc"] == sub.metrics["acc_after"]
    # The subset rows are the subset's metrics (16 images a set: multiples of 1/16).
    assert all((r["acc"] * 16).is_integer() and (r["asr"] * 16).is_integer()
               for r in sub.history[:-1])


def test_early_stopped_trial_ends_on_full_set_metrics(data, cache):
    stop_at_2 = lambda row: row["epoch"] == 2  # noqa: E731
    sub = run_trial(cfg_with(16), report=stop_at_2, cache=cache, data=data)
    full = run_trial(cfg_with(0), report=stop_at_2, cache=cache, data=data)
    assert sub.stopped_early and full.stopped_early and len(sub.history) == 2
    assert sub.history[-1]["eval_full"] == 0.0
    assert {k: sub.metrics[k] for k in FINAL} == {k: full.metrics[k] for k in FINAL}
    assert sub.metrics["acc_after"] == full.history[-1]["acc"]


def test_scheduler_decision_epochs_are_scored_on_the_full_sets(data, cache):
    sub = run_trial(cfg_with(16, epochs=4, eval={"subset": 16, "every": 1}), cache=cache,
                    data=data, full_eval_at=(1.5, 3.0))
    full = run_trial(cfg_with(0, epochs=4), cache=cache, data=data)
    assert [r["eval_full"] for r in sub.history] == [0.0, 1.0, 1.0, 1.0]
    for e in (1, 2):  # epochs 2 and 3: the first epochs at or past 1.5 and 3
        assert {k: sub.history[e][k] for k in ("acc", "asr", "ra", "der")} == \
            {k: full.history[e][k] for k in ("acc", "asr", "ra", "der")}


def test_asha_rungs_are_rays():
    from ray.tune.schedulers.async_hyperband import _Bracket

    for grace, rf, max_t in ((5, 2.0, 40), (5, 2.0, 100), (5, 3.0, 40), (1, 2.0, 8),
                             (3, 1.5, 50), (5, 2.0, 4)):
        ray_rungs = sorted(m for m, _ in _Bracket(grace, max_t, rf, 0)._rungs)
        assert list(asha_rungs(grace, rf, max_t)) == ray_rungs


# --------------------------------------------------------------------------------------------
# The switch


def test_subset_is_the_default_and_zero_restores_full_eval():
    assert resolve(trial_config({})).eval.subset == DEFAULT_EVAL_SUBSET > 0
    assert trial_config({"eval": {"subset": 0}}).eval.subset == 0
    with pytest.raises(UsageError, match="eval.subset"):
        trial_config({"eval": {"subset": -1}})


@pytest.mark.parametrize("argv,subset,every", [([], DEFAULT_EVAL_SUBSET, None),
                                               (["--eval-full"], 0, 1),
                                               (["--set", "eval.subset=0"], 0, None),
                                               (["--set", "eval.every=1"], DEFAULT_EVAL_SUBSET, 1),
                                               (["--set", "eval.subset=64"], 64, None)])
def test_run_flags_choose_the_per_epoch_evaluation(argv, subset, every):
    args = build_parser().parse_args(["run", *argv])
    cfg = resolve(trial_config(trial_dict_from_args(args)))
    assert (cfg.eval.subset, cfg.eval.every) == (subset, every)


# --------------------------------------------------------------------------------------------
# channels_last on CPU by default


def test_channels_last_is_the_cpu_default_and_keeps_final_metrics(data, cache, monkeypatch):
    from d3tune.models import ModelSpec, build_model

    monkeypatch.delenv(CHANNELS_LAST_ENV, raising=False)
    model = prepare_model(build_model("cnn", ModelSpec(10, 1, 8, (0.3,), (0.3,))),
                          torch.device("cpu"))
    assert model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    default = run_trial(cfg_with(16), data=data)  # attack training in each layout too
    monkeypatch.setenv(CHANNELS_LAST_ENV, "0")
    model = prepare_model(build_model("cnn", ModelSpec(10, 1, 8, (0.3,), (0.3,))),
                          torch.device("cpu"))
    assert model.features[0][0].weight.is_contiguous()
    plain = run_trial(cfg_with(16), data=data)
    assert {k: default.metrics[k] for k in FINAL} == {k: plain.metrics[k] for k in FINAL}
    sets = EvalSets(data.x_test, data.y_test, data.x_test, torch.zeros_like(data.y_test),
                    data.y_test)
    assert evaluate(default.model, sets) == evaluate(plain.model, sets)
