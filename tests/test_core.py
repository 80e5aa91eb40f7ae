"""Attacks' shared mechanics, metrics, augmentation, config validation and trial determinism."""
from __future__ import annotations

import pytest
import torch

from d3tune.attacks import AttackConfig, poison
from d3tune.attacks import badnets, blended
from d3tune.config import flatten, resolve, to_dict, trial_config, unflatten
from d3tune.data import load_dataset
from d3tune.errors import UsageError
from d3tune.metrics import accuracy, der
from d3tune.train import random_crop, random_hflip
from d3tune.trial import run_trial


def test_badnets_patch_is_where_expected_and_count_exact():
    d = load_dataset("digits")
    p = poison(d, AttackConfig("badnets", ratio=0.1, params=badnets.Params()),
               torch.Generator().manual_seed(0))
    assert int(p.poison_mask.sum()) == round(0.1 * len(d.y_train))
    side = 2  # 3 px at 32 scaled to 16 px
    xs = p.x_train[p.poison_mask]
    assert (xs[..., -side:, -side:] == 255).all()
    assert torch.equal(p.x_train[~p.poison_mask], d.x_train[~p.poison_mask])  # others untouched
    assert torch.equal(xs[..., :-side, :], d.x_train[p.poison_mask][..., :-side, :])
    assert (p.y_train[p.poison_mask] == 0).all()
    assert torch.equal(p.y_train[~p.poison_mask], d.y_train[~p.poison_mask])
    # ASR/RA test set: non-target test images only, all triggered
    assert len(p.y_bd_true) == int((d.y_test != 0).sum())
    assert (p.y_bd_true != 0).all() and (p.y_bd_target == 0).all()
    assert (p.x_bd_test[..., -side:, -side:] == 255).all()


def test_blended_is_deterministic_uint8_and_all2all_relabels():
    d = load_dataset("digits")
    cfg = AttackConfig("blended", ratio=0.2, mode="all2all", params=blended.Params(alpha=0.2))
    a = poison(d, cfg, torch.Generator().manual_seed(1))
    b = poison(d, cfg, torch.Generator().manual_seed(1))
    assert a.x_train.dtype == torch.uint8 and torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.poison_mask, b.poison_mask)
    m = a.poison_mask
    assert torch.equal(a.y_train[m], (d.y_train[m] + 1) % 10)
    assert len(a.y_bd_true) == len(d.y_test)  # all-to-all keeps every test image
    diff = (a.x_train[m].float() - d.x_train[m].float()).abs()
    assert diff.max() <= 0.2 * 255 + 1 and diff.mean() > 5


def test_target_out_of_range_is_a_usage_error():
    d = load_dataset("digits")
    with pytest.raises(UsageError, match="attack.target"):
        poison(d, AttackConfig("badnets", target=10), torch.Generator())


def test_metrics_on_hand_made_predictions():
    assert accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 0.5
    assert der(0.9, 1.0, 0.9, 0.0) == 1.0
    assert der(0.9, 1.0, 0.9, 1.0) == 0.5
    assert der(0.9, 0.9, 0.8, 0.1) == pytest.approx((0.8 - 0.1 + 1) / 2)
    assert der(0.9, 0.1, 0.95, 0.5) == 0.5  # gains in ACC and losses in ASR are clipped at 0
    assert der(1.0, 1.0, 0.0, 1.0) == 0.0


def test_batched_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(2):  # each sample is a window of its own zero-padded image
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, r:r + 4, c:c + 4] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = random_hflip(x, torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))


def test_config_round_trips_and_rejects_bad_values():
    cfg = resolve(trial_config({"defense": {"name": "d3", "eps": 0.3}, "seed": 4}))
    again = resolve(trial_config(unflatten(flatten(to_dict(cfg)))))
    assert again == cfg
    for bad, field in [({"attack": {"ratio": 1.5}}, "attack.ratio"),
                       ({"defense": {"lr": 0}}, "defense.lr"),
                       ({"defense": {"eps": -1}}, "defense.eps"),
                       ({"defense": {"init": "nowhere"}}, "defense.init"),
                       ({"attack": {"name": "nope"}}, "attack.name"),
                       ({"data": {"name": "mnist"}}, "data.name"),
                       ({"model": {"arch": "resnet50"}}, "model.arch"),
                       ({"defense": {"epochs": 2.5}}, "defense.epochs"),
                       ({"sed": 1}, "sed")]:
        with pytest.raises(UsageError, match=field.replace(".", r"\.")):
            trial_config(bad)


def _small(seed: int = 0, **defense):
    return resolve(trial_config({
        "seed": seed, "train": {"epochs": 3}, "eval": {"subset": 100},
        "defense": {"name": "d3", "epochs": 3, **defense}}))


def test_same_config_and_seed_give_identical_metrics(tiny_digits):
    a = run_trial(_small(), data=tiny_digits)
    b = run_trial(_small(), data=tiny_digits)
    assert a.metrics == b.metrics and a.history == b.history
    c = run_trial(_small(seed=1), data=tiny_digits)
    assert c.metrics != a.metrics


def test_cache_hit_gives_the_same_trial(tmp_path, tiny_digits):
    from d3tune.cache import ModelCache

    cache = ModelCache(tmp_path)
    first = run_trial(_small(), data=tiny_digits, cache=cache)
    second = run_trial(_small(), data=tiny_digits, cache=cache)
    assert (first.cache_hit, second.cache_hit) == (False, True) and cache.builds == 1
    assert first.metrics == second.metrics
    other = run_trial(_small(eps=0.3), data=tiny_digits, cache=cache)  # defense-only change
    assert other.cache_hit and other.cache_key == first.cache_key


def test_report_can_stop_the_defense_early(tiny_digits):
    rows = []
    r = run_trial(_small(), data=tiny_digits, report=lambda row: rows.append(row) or True)
    assert r.stopped_early and [row["epoch"] for row in rows] == [1]
    assert set(rows[0]) >= {"epoch", "acc", "asr", "ra", "der", "loss_clean", "loss_dist"}
