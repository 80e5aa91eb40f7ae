"""The attack zoo: exact poisoning, deterministic triggers, valid pixels, validated parameters,
stateful triggers surviving the model cache, and backdoors that actually get planted."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from d3tune.attacks import (ATTACKS, AttackConfig, Backdoor, Poisoned, Trainer, poison,
                            split_state)
from d3tune.attacks.bpp import floyd_steinberg, quantise
from d3tune.cache import ModelCache
from d3tune.config import resolve, trial_config
from d3tune.data import Dataset, load_dataset
from d3tune.data.synthetic import make as make_synthetic
from d3tune.errors import UsageError
from d3tune.metrics import accuracy
from d3tune.train import Augment, fit, make_sgd, predict
from d3tune.trial import run_trial, train_backdoored

ALL = ["badnets", "blended", "bpp", "input_aware", "lc", "lf", "sig", "trojan", "wanet"]
# Cheap settings for attacks that train something of their own (a surrogate, the mask generator).
log = logging.getLogger(__name__)
FAST = {"lc": {"surrogate_epochs": 1, "steps": 3},
        "trojan": {"surrogate_epochs": 1, "steps": 5, "batch_size": 64},
        "input_aware": {"mask_epochs": 2}}
STATIC = [a for a in ALL if a != "input_aware"]  # poison() gives their real training set


def attack_cfg(name: str, **common) -> AttackConfig:
    """A validated AttackConfig, as a spec would give it."""
    return trial_config({"attack": {"name": name, **FAST.get(name, {}), **common}}).attack


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def small(digits) -> Dataset:
    """300 training images: enough for every class, cheap for surrogate-based attacks."""
    d = digits
    return Dataset(d.name, d.x_train[:300], d.y_train[:300], d.x_test[:120], d.y_test[:120],
                   d.num_classes, d.mean, d.std, d.hflip)


@pytest.fixture(scope="module")
def synthetic_small() -> Dataset:
    return make_synthetic(n_train=200, n_test=60)


def test_every_attack_is_registered_and_configurable():
    assert set(ALL) <= set(ATTACKS.names())
    for name in ALL:
        cfg = resolve(trial_config({"attack": {"name": name}}))
        assert isinstance(cfg.attack.params, ATTACKS[name].params)
    assert ATTACKS["sig"].clean_label and ATTACKS["lc"].clean_label
    assert not ATTACKS["sig"].all2all and not ATTACKS["trojan"].all2all


def test_dataset_profile_gives_slow_attacks_a_longer_schedule():
    """On digits WaNet and Input-Aware need 60 training epochs to reach ASR 0.85 (README
    "Attacks"); the rest keep 30; an explicit value always wins; other datasets are unchanged."""
    epochs = lambda spec: resolve(trial_config(spec)).train.epochs  # noqa: E731
    assert epochs({"attack": {"name": "wanet"}}) == 60
    assert epochs({"attack": {"name": "input_aware"}}) == 60
    assert epochs({"attack": {"name": "badnets"}}) == 30
    assert epochs({"attack": {"name": "wanet"}, "train": {"epochs": 5}}) == 5
    assert epochs({"data": {"name": "synthetic"}, "attack": {"name": "wanet"}}) == \
        epochs({"data": {"name": "synthetic"}, "attack": {"name": "badnets"}})


@pytest.fixture(scope="module")
def poisoned(small):
    """poison(small, attack, seed 7) per attack, computed once per module (surrogates cost)."""
    done: dict[str, Poisoned] = {}

    def get(name: str) -> Poisoned:
        if name not in done:
            done[name] = poison(small, attack_cfg(name, target=3), torch.Generator().manual_seed(7))
        return done[name]

    return get


@pytest.mark.parametrize("name", STATIC)
def test_poisoning_is_exact_deterministic_and_uint8(name, small, poisoned):
    d, a = small, poisoned(name)
    b = poison(d, attack_cfg(name, target=3), torch.Generator().manual_seed(7))
    for field in ("x_train", "y_train", "poison_mask", "x_bd_test", "y_bd_target", "y_bd_true"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field  # same seed, same data
    n = len(d.y_train)
    mask = a.poison_mask[:n]
    assert a.x_train.dtype == torch.uint8 and a.x_bd_test.dtype == torch.uint8
    assert a.x_train.shape[1:] == d.x_train.shape[1:]
    if ATTACKS[name].clean_label:
        assert int(mask.sum()) == min(round(0.1 * n), int((d.y_train == 3).sum()))
        assert (d.y_train[mask] == 3).all()  # only target-class images are touched
        assert torch.equal(a.y_train[:n], d.y_train)  # and no label changes
    else:
        assert int(mask.sum()) == round(0.1 * n)
        assert (a.y_train[:n][mask] == 3).all()
        assert torch.equal(a.y_train[:n][~mask], d.y_train[~mask])
    assert torch.equal(a.x_train[:n][~mask], d.x_train[~mask])  # the rest is untouched
    changed = (a.x_train[:n][mask] != d.x_train[mask]).flatten(1).any(1).float().mean()
    assert changed > 0.5
    keep = d.y_test != 3
    assert torch.equal(a.y_bd_true, d.y_test[keep]) and (a.y_bd_target == 3).all()
    assert (a.x_bd_test != d.x_test[keep]).flatten(1).any(1).float().mean() > 0.5


@pytest.mark.parametrize("name", ["badnets", "sig", "wanet"])
def test_another_seed_poisons_other_samples(name, small, poisoned):
    other = poison(small, attack_cfg(name, target=3), torch.Generator().manual_seed(8))
    assert not torch.equal(other.poison_mask, poisoned(name).poison_mask)


@pytest.mark.parametrize("name", STATIC)
def test_attacks_work_on_three_channel_32px(name, synthetic_small):
    p = poison(synthetic_small, attack_cfg(name), torch.Generator().manual_seed(0))
    assert p.x_bd_test.dtype == torch.uint8 and p.x_bd_test.shape[1:] == (3, 32, 32)
    assert int(p.poison_mask.sum()) > 0


@pytest.mark.parametrize("name", [a for a in ALL if ATTACKS[a].all2all])
def test_all_to_all_labels(name, small):
    d = small
    cfg = attack_cfg(name, mode="all2all")
    b = Backdoor(d, cfg, torch.Generator().manual_seed(0))
    x, y, mask = b.training_set()
    n = len(d.y_train)
    if name != "input_aware":  # it relabels on the fly in its training loop
        assert torch.equal(y[:n][mask[:n]], (d.y_train[mask[:n]] + 1) % 10)
    _, y_target, y_true = b.test_set()
    assert torch.equal(y_true, d.y_test)  # every test image, the target's too
    assert torch.equal(y_target, (d.y_test + 1) % 10)


@pytest.mark.parametrize("name", [a for a in ALL if not ATTACKS[a].all2all])
def test_all_to_all_refused_where_meaningless(name, small):
    with pytest.raises(UsageError, match="all2one"):
        poison(small, attack_cfg(name, mode="all2all"), torch.Generator())


@pytest.mark.parametrize("spec, field", [
    ({"name": "sig", "ratio": 1.5}, "attack.ratio"),
    ({"name": "wanet", "ratio": -0.1}, "attack.ratio"),
    ({"name": "lf", "mode": "some2one"}, "attack.mode"),
    ({"name": "badnets", "target": -1}, "attack.target"),
    ({"name": "sig", "delta": 0}, "attack.delta"),
    ({"name": "sig", "delta": 300}, "attack.delta"),
    ({"name": "wanet", "k": 1}, "attack.k"),
    ({"name": "wanet", "s": 0}, "attack.s"),
    ({"name": "bpp", "bits": 0}, "attack.bits"),
    ({"name": "bpp", "bits": 8}, "attack.bits"),
    ({"name": "lf", "eps": 0}, "attack.eps"),
    ({"name": "lc", "corners": "three"}, "attack.corners"),
    ({"name": "lc", "surrogate": "resnet9000"}, "attack.surrogate"),
    ({"name": "trojan", "steps": 0}, "attack.steps"),
    ({"name": "input_aware", "mask_density": 2}, "attack.mask_density"),
    ({"name": "input_aware", "lambda_dvi": 1}, "attack.lambda_dvi"),
    ({"name": "sigg"}, "attack.name"),
])
def test_bad_parameters_are_usage_errors(spec, field):
    with pytest.raises(UsageError, match=field.replace(".", r"\.")):
        trial_config({"attack": spec})


@pytest.mark.parametrize("name", ALL)
def test_target_must_be_a_class(name, small):
    with pytest.raises(UsageError, match="attack.target"):
        Backdoor(small, attack_cfg(name, target=10), torch.Generator())


def test_sig_is_the_sinusoid(small, poisoned):
    p = poisoned("sig")
    w = small.shape[2]
    signal = 20 * torch.sin(2 * math.pi * torch.arange(w) * 6 / w)
    want = (small.x_test[small.y_test != 3].float() + signal).round().clamp(0, 255)
    assert torch.equal(p.x_bd_test, want.to(torch.uint8))


def test_wanet_adds_noise_mode_samples_at_true_labels(small, poisoned):
    d, p = small, poisoned("wanet")
    n, n_bd = len(d.y_train), round(0.1 * len(d.y_train))
    assert len(p.y_train) == len(p.x_train) == len(p.poison_mask) == n + 2 * n_bd
    assert not p.poison_mask[n:].any()
    extra_x, extra_y = p.x_train[n:], p.y_train[n:]
    # Each cross sample is some clean image warped (grid + noise), kept at that image's label:
    # find its source as the clean image it is closest to.
    dist = (extra_x.flatten(1).float()[:, None] - d.x_train.flatten(1).float()[None]).abs().sum(2)
    src = dist.argmin(1)
    assert torch.equal(extra_y, d.y_train[src])
    assert not p.poison_mask[:n][src].any()  # drawn from the non-poisoned samples
    assert not torch.equal(extra_x, d.x_train[src])  # and actually warped


def test_floyd_steinberg_is_the_sequential_algorithm():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 2, 7, 9), generator=g).float()
    ref = x.clone()
    for i in range(7):  # the textbook raster loop
        for j in range(9):
            old = ref[:, :, i, j].clone()
            new = quantise(old, 32)
            ref[:, :, i, j] = new
            err = old - new
            if j + 1 < 9:
                ref[:, :, i, j + 1] += err * 7 / 16
            if i + 1 < 7:
                if j > 0:
                    ref[:, :, i + 1, j - 1] += err * 3 / 16
                ref[:, :, i + 1, j] += err * 5 / 16
                if j + 1 < 9:
                    ref[:, :, i + 1, j + 1] += err * 1 / 16
    assert torch.equal(floyd_steinberg(x, 32), ref)


def test_bpp_output_has_five_bit_levels(poisoned):
    p = poisoned("bpp")
    levels = set((torch.arange(32) * 255 / 31).round().to(torch.uint8).tolist())
    assert set(p.x_bd_test.unique().tolist()) <= levels


def test_lc_perturbs_training_images_within_budget_and_not_test_images(small, poisoned):
    d, p = small, poisoned("lc")  # eps 8 (on 0..255) by default
    mask = p.poison_mask
    trigger = p.trigger
    assert torch.equal(p.x_bd_test, trigger(d.x_test[d.y_test != 3]))  # test: trigger only
    stamped = trigger(d.x_train[mask])
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from the corners
    delta = (p.x_train[mask].float() - stamped.float())[inner]
    assert delta.abs().max() <= 8 and delta.abs().max() > 0  # PGD moved pixels, within eps


def test_trojan_patch_is_cached_state(small, poisoned):
    d, cfg = small, attack_cfg("trojan", target=3)
    x_bd, state = poisoned("trojan").x_bd_test, dict(poisoned("trojan").trigger.state)
    assert state["patch"].dtype == torch.uint8 and state["patch"].shape == (1, 3, 3)
    fresh = Backdoor(d, cfg, torch.Generator().manual_seed(123))  # no optimisation on restore
    fresh.restore(state)
    assert torch.equal(fresh.test_set()[0], x_bd)
    clean = d.x_test[d.y_test != 3]
    assert torch.equal(x_bd[..., :-3, :], clean[..., :-3, :])  # only the bottom-right patch


def _quick_train(d: Dataset, epochs: int = 1):
    def train(x, y, loss_fn=None, after_step=None):
        from d3tune.models import ModelSpec, build_model
        torch.manual_seed(0)
        c, h, w = d.shape
        model = build_model("cnn", ModelSpec(d.num_classes, c, h, d.mean, d.std))
        opt, sched = make_sgd(model.parameters(), 0.05, epochs=epochs)
        kwargs = {"loss_fn": loss_fn} if loss_fn else {}
        fit(model, x, y, epochs=epochs, batch_size=64, optimizer=opt, scheduler=sched,
            aug=Augment(), generator=torch.Generator().manual_seed(0), after_step=after_step,
            **kwargs)
        return model
    return Trainer(train, epochs, 64)


def test_input_aware_trains_a_generator_whose_state_rebuilds_the_trigger(small):
    d = small
    cfg = attack_cfg("input_aware")
    b = Backdoor(d, cfg, torch.Generator().manual_seed(0))
    untrained = {k: v.clone() for k, v in b.trigger.state.items()}
    b = Backdoor(d, cfg, torch.Generator().manual_seed(0))
    model, state = b.train(_quick_train(d))
    assert state and any(not torch.equal(state[k], untrained[k]) for k in state)  # it learned
    x_bd, _, _ = b.test_set()
    assert x_bd.dtype == torch.uint8
    again = Backdoor(d, cfg, torch.Generator().manual_seed(99))
    again.restore(state)
    assert torch.equal(again.test_set()[0], x_bd)
    # Input-specific: the per-image change is not one fixed pattern.
    delta = x_bd.float() - d.x_test[d.y_test != 0].float()
    assert (delta - delta[:1]).abs().amax(dim=(1, 2, 3)).max() > 0


def test_stateful_trigger_survives_the_model_cache(small, tmp_path):
    spec = {"device": "cpu", "attack": {"name": "input_aware", **FAST["input_aware"]},
            "train": {"epochs": 1}, "defense": {"epochs": 1}}
    cfg = resolve(trial_config(spec))
    cache = ModelCache(tmp_path)
    first = run_trial(cfg, cache=cache, data=small)
    second = run_trial(cfg, cache=cache, data=small)
    assert not first.cache_hit and second.cache_hit
    assert first.metrics["asr_before"] == second.metrics["asr_before"]
    assert first.metrics["acc_before"] == second.metrics["acc_before"]
    model, state = split_state(cache.load(first.cache_key).tensors)
    assert state and not any(k.startswith("attack.") for k in model)


PLANTED = [[("badnets", 0, {})], [("blended", 1, {}), ("bpp", 2, {"bits": 3})]]


def test_backdoors_are_planted(digits):
    """Five epochs of the small CNN on the digits plant BadNets, Blended and BppAttack (at 3
    bits: at its default 5 bits the digits CNN does not learn it even in 30 epochs, see
    benchmarks/attack_table.py, which checks every attack at the full schedule): ASR far above
    a clean model's. To keep this fast, Blended and BppAttack share one model, each poisoning
    its own 10 % with its own target label. Five epochs, not three: at three BadNets reached ASR
    0.576 on 2026-12-05's packages, a hair under the bar; at five 0.94 / 0.99 / 1.00."""
    d = digits
    cfg = resolve(trial_config({"device": "cpu", "train": {"epochs": 5}}))
    cpu = torch.device("cpu")
    clean = train_backdoored(cfg, d, d.x_train, d.y_train, cpu)
    for group in PLANTED:
        x, y = d.x_train, d.y_train
        backdoors = []
        for i, (name, target, params) in enumerate(group):
            poisoned_so_far = Dataset(d.name, x, y, d.x_test, d.y_test, d.num_classes, d.mean,
                                      d.std, d.hflip)
            b = Backdoor(poisoned_so_far, attack_cfg(name, target=target, **params),
                         torch.Generator().manual_seed(i))
            x, y, _ = b.training_set()
            backdoors.append((name, b))
        model = train_backdoored(cfg, d, x, y, cpu)
        assert accuracy(predict(model, d.x_test), d.y_test) > 0.8
        for name, b in backdoors:
            x_bd, y_target, _ = b.test_set()
            asr = accuracy(predict(model, x_bd), y_target)
            clean_asr = accuracy(predict(clean, x_bd), y_target)
            log.info("%s: ASR %.3f, clean model %.3f", name, asr, clean_asr)
            assert asr > 0.6 and asr > clean_asr + 0.5, (name, asr, clean_asr)


@pytest.mark.slow
def test_attack_table_prints_a_markdown_row_per_attack(capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "attack_table.py"
    main = runpy.run_path(str(script), run_name="attack_table")["main"]
    main(["--attacks", "badnets,sig", "--epochs", "1", "--device", "cpu",
          "--param", "sig.delta=30"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| attack | data | ACC | ASR |") and len(lines) == 5
    assert lines[2].startswith("| (clean, ratio 0) | digits (cnn, 1 ep, 1438 train) |")
    assert lines[3].startswith("| badnets |") and lines[4].startswith("| sig delta=30 |")
