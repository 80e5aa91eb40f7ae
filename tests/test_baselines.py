"""Baseline defenses (issue #5): each runs, keeps the architecture, is deterministic, reports
every epoch and stops on request; and each one's key mechanism is checked directly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from d3tune.defenses import DEFENSES, DefenseConfig, DefenseContext
from d3tune.defenses import anp, fp, fst, ft_sam, ibau, nad, sau
from d3tune.models import ModelSpec, build_model
from d3tune.models.cnn import SmallCNN
from d3tune.train import Augment, make_sgd

TINY = ModelSpec(num_classes=3, in_channels=1, image_size=8, mean=(0.5,), std=(0.25,))

# Small settings per defense so the whole file stays fast; the mechanisms are the real ones.
# Each defense registers its own (``register(..., fast=...)``): a new defense joins these tests
# with no edit here. D3 and plain FT have their own tests (test_d3.py, test_core.py).
FAST = {name: DEFENSES[name].params(**DEFENSES[name].fast) for name in DEFENSES.names()
        if name not in ("d3", "ft")}
BASELINES = sorted(FAST)


def tiny_model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(TINY, width=4)


def tiny_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = (torch.arange(n) % 3)[torch.randperm(n, generator=g)]
    return x, y


def run_defense(name: str, model, x, y, *, epochs: int = 3, on_epoch=None, seed: int = 1,
                params=None, **context) -> None:
    cfg = DefenseConfig(name=name, epochs=epochs, lr=0.01, batch_size=8,
                        params=params if params is not None else FAST[name])
    ctx = DefenseContext(num_classes=3, head="linear", aug=Augment(pad=1),
                         generator=torch.Generator().manual_seed(seed),
                         device=torch.device("cpu"),
                         on_epoch=on_epoch if on_epoch is not None else (lambda e, logs: None),
                         **context)
    DEFENSES[name].run(model, x, y, cfg, ctx)


def reported_epochs(name: str) -> int:
    return FAST[name].n_rounds if name == "ibau" else 3


def test_all_baselines_are_registered():
    assert set(BASELINES) | {"d3", "ft"} <= set(DEFENSES)


@pytest.mark.parametrize("name", BASELINES)
def test_runs_keeps_architecture_and_is_deterministic(name: str):
    x, y = tiny_data()
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[tuple[int, dict]] = []
    run_defense(name, model, x, y, on_epoch=lambda e, logs: calls.append((e, logs)))

    after = model.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    out = model.eval()(x)
    assert out.shape == (len(x), 3) and torch.isfinite(out).all()
    assert [e for e, _ in calls] == list(range(1, reported_epochs(name) + 1))
    assert all(isinstance(v, float) for _, logs in calls for v in logs.values())
    if name != "anp":  # ANP only zeroes the gammas of pruned neurons, possibly none here
        assert any(not torch.equal(before[k], after[k]) for k in before)

    again = tiny_model()
    run_defense(name, again, x, y)
    for k, v in again.state_dict().items():
        assert torch.equal(v, after[k]), f"{name}: {k} differs between two runs with one seed"


@pytest.mark.parametrize("name", BASELINES)
def test_stops_when_on_epoch_says_so(name: str):
    x, y = tiny_data()
    calls: list[int] = []
    run_defense(name, tiny_model(), x, y, on_epoch=lambda e, logs: calls.append(e) or e == 2)
    assert calls == [1, 2]


@pytest.mark.parametrize("name", ["fp", "nad", "fst"])  # the ones built on train.fit
def test_resume_from_a_saved_epoch_is_bit_identical(name: str):
    x, y = tiny_data()
    states: list[dict] = []
    full = tiny_model()
    run_defense(name, full, x, y, save=lambda state: states.append(copy.deepcopy(state)))
    assert [s["epoch"] for s in states] == [1, 2, 3]
    resumed = tiny_model()
    run_defense(name, resumed, x, y, resume=states[0])
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k


# --- FP ----------------------------------------------------------------------------------------


def test_fp_prunes_exactly_the_dormant_channels_it_reports():
    x, y = tiny_data()
    model = tiny_model()
    point = fp.prune_point(model, "linear")
    assert point.module is model.linear and point.on_input  # the pooled last-conv channels
    act = fp.channel_activations(model, point, x)
    logs: list[dict] = []
    run_defense("fp", model, x, y, params=fp.Params(acc_ratio=1.0, prune_step=0.25),
                on_epoch=lambda e, entry: logs.append(entry))
    pruned = fp.pruned_channels(model)
    kept = [c for c in range(point.channels) if c not in pruned]
    assert pruned and kept
    assert all(entry["pruned"] == len(pruned) for entry in logs)
    assert act[pruned].max() <= act[kept].min()  # lowest mean activation first

    seen = []
    model.linear.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model.eval()(x)
    assert torch.all(seen[0][:, pruned] == 0)
    assert torch.all(model.linear.weight[:, pruned] == 0)  # folded into the weights too


def test_fp_stops_pruning_before_the_accuracy_threshold():
    x, y = tiny_data()
    model = tiny_model()
    point = fp.prune_point(model, "linear")
    order = torch.argsort(fp.channel_activations(model, point, x), stable=True)
    mask = fp.attach_mask(point, x.device)
    acc0 = fp._accuracy(model, x, y)
    n = fp.choose_pruning(model, mask, order, x, y, fp.Params(acc_ratio=0.2, prune_step=0.1))
    assert int((mask == 0).sum()) == n
    assert (acc0 - fp._accuracy(model, x, y)) / acc0 < 0.2


# --- ANP ---------------------------------------------------------------------------------------


def test_anp_masks_stay_in_unit_interval():
    x, y = tiny_data()
    model = tiny_model().train().requires_grad_(False)
    masks = anp.NeuronMasks(model)
    prm = anp.Params(mask_lr=50.0)  # huge steps, so the clipping is exercised
    opt = torch.optim.SGD(masks.masks, lr=prm.mask_lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        anp.mask_step(model, masks, opt, x, y, prm, g)
        values = torch.cat([m.detach() for m in masks.masks])
        assert values.min() >= 0.0 and values.max() <= 1.0
        # U(-eps, eps) plus one signed step of eps, unprojected as in the authors' code
        assert all(n.detach().abs().max() <= 2 * prm.eps + 1e-6 for n in masks.noises)
    assert (values == 0).any() or (values == 1).any()
    masks.remove()


def test_anp_pruning_zeroes_gamma_below_threshold():
    model = tiny_model()
    original = copy.deepcopy(model.state_dict())
    masks = anp.NeuronMasks(model)
    with torch.no_grad():
        masks.masks[0][:2] = 0.1
    masks.active = False
    n = anp.apply_pruning(model, original, masks, threshold=0.2)
    assert n == 2
    assert torch.all(masks.layers[0].weight[:2] == 0)
    assert torch.equal(masks.layers[0].weight[2:], original["features.0.1.weight"][2:])
    masks.remove()


# --- FT-SAM ------------------------------------------------------------------------------------


def test_ft_sam_step_differs_from_sgd_and_reduces_to_it_at_rho_zero():
    x, y = tiny_data()

    def one_step(rho: float | None):
        model = tiny_model().train()
        opt, _ = make_sgd(model.parameters(), 0.1, 0.9, 0.0, 1)
        prm = ft_sam.Params(rho=rho or 0.0)
        if rho is None:  # plain SGD on the same smoothed loss
            loss = ft_sam.smooth_cross_entropy(model(x), y, prm.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            ft_sam.sam_step(model, opt, x, y, prm)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    sgd = one_step(None)
    torch.testing.assert_close(one_step(0.0), sgd)
    assert not torch.allclose(one_step(2.0), sgd)


# --- NAD ---------------------------------------------------------------------------------------


def test_nad_attention_loss_is_zero_for_identical_models():
    x, _ = tiny_data()
    model = tiny_model().eval()
    twin = copy.deepcopy(model)
    other = tiny_model(seed=5).eval()
    layers = nad.default_layers(model, x[:2])
    with nad.tapped(model, layers) as s, nad.tapped(twin, layers) as t, \
            nad.tapped(other, layers) as o:
        model(x), twin(x), other(x)
        assert nad.attention_loss(s, t, (500.0, 1000.0, 1000.0), 2.0).item() == 0.0
        assert nad.attention_loss(s, o, (500.0, 1000.0, 1000.0), 2.0).item() > 0.0


def test_nad_default_layers_are_the_last_conv_stages():
    probe = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    cnn = SmallCNN(ModelSpec(10, 1, 16, (0.5,), (0.25,)), width=4)
    assert nad.default_layers(cnn, probe) == ["features.3", "features.4", "features.6"]
    resnet = build_model("preactresnet18", ModelSpec(10, 1, 16, (0.5,), (0.25,)))
    assert nad.default_layers(resnet, probe) == ["layer2", "layer3", "layer4"]


# --- FST ---------------------------------------------------------------------------------------


def test_fst_reinitialises_the_head_with_its_norm():
    x, y = tiny_data()
    model = tiny_model()
    w0 = model.linear.weight.detach().clone()
    old, norm = fst.reinitialise(model.linear, torch.Generator().manual_seed(0))
    torch.testing.assert_close(old, w0)
    w = model.linear.weight.detach()
    torch.testing.assert_close(w.norm(), w0.norm())
    assert F.cosine_similarity(w.flatten(), w0.flatten(), dim=0).abs() < 0.5

    model = tiny_model()
    run_defense("fst", model, x, y)
    torch.testing.assert_close(model.linear.weight.norm(), w0.norm())  # projected each step


# --- i-BAU -------------------------------------------------------------------------------------


def test_ibau_perturbation_stays_in_its_ball():
    x, y = tiny_data()
    model = tiny_model().eval()
    xs = [x[:12].float() / 255, x[12:].float() / 255]
    scale = ibau.input_scale(model, 1, x.device)
    assert scale.flatten().tolist() == [0.25]  # the model's own Normalize std
    for radius in (0.05, 10.0):
        delta = ibau.universal_perturbation(model, xs, scale, ibau.Params(radius=radius))
        assert delta.shape == (1, 1, 8, 8)
        assert float(delta.norm()) <= radius * (1 + 1e-5)
    params = list(model.parameters())
    grads, loss = ibau.hypergradient(model, params, delta, scale, (xs[0], y[:12]),
                                     (xs[1], y[12:]), ibau.Params(), torch.Generator())
    assert [g.shape for g in grads] == [p.shape for p in params]
    assert all(torch.isfinite(g).all() for g in grads) and loss > 0


# --- SAU ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", sau.PGD_INITS)
def test_sau_adversarial_examples_stay_within_eps(init: str):
    x, y = tiny_data()
    model = tiny_model().eval()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        model.linear.weight.mul_(-1)  # two different models, as after a few unlearning steps
    prm = sau.Params(eps=0.1, pgd_init=init)
    x01 = x.float() / 255
    delta = sau.shared_pgd(model, ref, x01, y, prm, torch.Generator().manual_seed(0))
    assert delta.shape == x01.shape
    assert float(delta.abs().max()) <= prm.eps + 1e-7
    loss, logs = sau.sau_loss(model, ref, x01, x01 + delta, y, prm)
    assert torch.isfinite(loss) and set(logs) >= {"loss_clean", "loss_shared"}


def test_a_builtin_defense_is_one_file(tmp_path, monkeypatch):
    """A module dropped into the defenses package registers itself on import: no import list
    to edit, and its registered fast settings and space reach the tests and leaderboards."""
    import sys

    import d3tune.defenses as package
    from d3tune.registry import import_builtins
    from d3tune.specs.leaderboard_spec import leaderboard_plan

    (tmp_path / "zz_throwaway.py").write_text(
        "from d3tune.defenses import register\n"
        "from dataclasses import dataclass\n"
        "@dataclass(frozen=True)\n"
        "class Params:\n"
        "    rounds: int = 50\n"
        "@register('throwaway', Params, space={'defense.lr': {'loguniform': [0.001, 0.1]}},\n"
        "          fast={'rounds': 1}, citation='nobody, 2026')\n"
        "def run(model, x, y, cfg, ctx):\n"
        "    pass\n")
    (tmp_path / "_helper.py").write_text("raise RuntimeError('private modules are not imported')\n")
    monkeypatch.setattr(DEFENSES, "_items", dict(DEFENSES._items))
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "d3tune.defenses.zz_throwaway", raising=False)
    assert "zz_throwaway" in import_builtins(package.__name__, package.__path__)
    entry = DEFENSES["throwaway"]
    assert entry.params(**entry.fast).rounds == 1 and entry.citation == "nobody, 2026"
    spec = leaderboard_plan({"name": "lb", "defenses": ["throwaway"], "budget": 1,
                             "population": {"attacks": ["badnets"], "seeds": [0]},
                             "holdout_seeds": [1]}, "lb.yaml")
    assert [d.path for d in spec.searches[0].space] == ["defense.lr"]
    sys.modules.pop("d3tune.defenses.zz_throwaway", None)
