"""D3 against a literal, slow transcription of ../shared/D3_SPEC.md steps 1-5."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d3tune.defenses import DefenseConfig, DefenseContext
from d3tune.defenses import d3
from d3tune.train import Augment


class Tiny(nn.Module):
    """Conv + BN features and two candidate selections: the head ``linear`` and ``block``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.linear = nn.Linear(16, 3)

    def forward(self, x):
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return self.linear(self.pool(F.relu(self.block(x))).flatten(1))


def make_data(n: int = 24):
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def reference(model, x, y, *, layer, init, p, lmd, eps, lr, epochs, gen):
    """The spec, step by step, one module at a time, full batch (so order cannot matter)."""
    sel = [m for m in model.get_submodule(layer).modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    w0s = [m.weight.detach().clone() for m in sel]
    with torch.no_grad():
        for m, w0 in zip(sel, w0s):
            if init == "random":
                w = torch.rand(m.weight.shape, generator=gen) - 0.5
                m.weight.copy_(w * torch.norm(w0, p=p) / torch.norm(w, p=p))
            elif init == "near":
                m.weight.copy_(w0)
            elif init == "middle":
                m.weight.zero_()
            elif init == "far":
                m.weight.copy_(-w0)
            elif init == "noise":
                m.weight.copy_(w0 + torch.randn(w0.shape, generator=gen) * torch.std(w0))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for _ in range(epochs):
        logits = model(x)
        ce = F.cross_entropy(logits, y, reduction="none")
        l_clean = torch.mean(torch.relu(ce - eps))
        l_dist = 0
        for m, w0 in zip(sel, w0s):
            l_dist = l_dist + torch.norm(m.weight - w0, p=p)
        loss = lmd * l_clean - l_dist
        if lmd > 1:
            loss = loss / (lmd + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for m, w0 in zip(sel, w0s):
                m.weight.mul_(torch.norm(w0, p=p) / torch.norm(m.weight, p=p))
        sched.step()
    return sel, w0s


def ours(model, x, y, *, layer, init, p, lmd, eps, lr, epochs, gen, radius=1.0, on_epoch=None):
    prm = d3.Params(eps=eps, lmd=lmd, p=p, init=init, select_layer=layer, radius=radius)
    cfg = DefenseConfig(name="d3", epochs=epochs, lr=lr, batch_size=len(x), params=prm)
    ctx = DefenseContext(num_classes=3, head="linear", aug=Augment(pad=0), generator=gen,
                         device=torch.device("cpu"), on_epoch=on_epoch or (lambda e, entry: None))
    d3.run(model, x, y, cfg, ctx)


@pytest.mark.parametrize("init", d3.INIT_MODES)
@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("layer,lmd", [("linear", 0.5), ("block", 2.0)])
def test_matches_literal_transcription(init, p, layer, lmd):
    x, y = make_data()
    torch.manual_seed(0)
    a = Tiny()
    b = Tiny()
    b.load_state_dict(a.state_dict())
    kw = dict(layer=layer, init=init, p=p, lmd=lmd, eps=0.1, lr=0.05, epochs=4)
    reference(a, x, y, gen=torch.Generator().manual_seed(3), **kw)
    ours(b, x, y, gen=torch.Generator().manual_seed(3), **kw)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(ta.float(), tb.float(), atol=1e-5, rtol=1e-4), name


def test_projection_keeps_every_selected_norm_and_radius_scales_it():
    x, y = make_data()
    for radius in (1.0, 1.5):
        torch.manual_seed(0)
        m = Tiny()
        norms0 = [w.weight.detach().norm(2) for w in (m.block[0], m.block[3])]
        ours(m, x, y, layer="block", init="random", p=2.0, lmd=0.5, eps=0.1, lr=0.1, epochs=3,
             gen=torch.Generator().manual_seed(0), radius=radius)
        for w, n0 in zip((m.block[0], m.block[3]), norms0):
            assert torch.isclose(w.weight.norm(2), radius * n0, rtol=1e-5)


def test_selecting_linear_touches_only_the_head():
    m = Tiny()
    assert d3.selected_modules(m, "linear") == [m.linear]
    assert d3.selected_modules(m, "block") == [m.block[0], m.block[3]]
    x, y = make_data()
    torch.manual_seed(0)
    m = Tiny()
    conv_before = m.block[0].weight.detach().clone()
    head_norm = m.linear.weight.detach().norm()
    ours(m, x, y, layer="linear", init="far", p=2.0, lmd=0.5, eps=0.1, lr=0.2, epochs=2,
         gen=torch.Generator().manual_seed(0))
    # the head stays on its sphere; the conv is trained freely (its norm is not pinned)
    assert torch.isclose(m.linear.weight.norm(), head_norm, rtol=1e-5)
    assert not torch.allclose(m.block[0].weight, conv_before)


def test_init_modes_do_what_the_spec_says():
    w0 = [torch.randn(5, 4)]
    for mode, check in {
        "near": lambda w: torch.equal(w, w0[0]),
        "middle": lambda w: torch.count_nonzero(w) == 0,
        "far": lambda w: torch.equal(w, -w0[0]),
        "random": lambda w: torch.isclose(w.norm(2), w0[0].norm(2)) and not torch.equal(w, w0[0]),
        "noise": lambda w: not torch.equal(w, w0[0]) and (w - w0[0]).std() > 0.5 * w0[0].std(),
    }.items():
        w = [torch.zeros(5, 4)]
        d3.initialise(w, w0, mode, 2.0, torch.Generator().manual_seed(0))
        assert check(w[0]), mode
    w = [torch.zeros(5, 4)]
    d3.initialise(w, w0, "random", 1.0, torch.Generator().manual_seed(0))
    assert torch.isclose(w[0].abs().sum(), w0[0].abs().sum())  # p = 1 rescales the L1 norm
    assert w[0].abs().max() <= w0[0].abs().sum()


def test_loss_lmd_rule():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([1, 1])
    dist = torch.tensor(3.0)
    ce = F.cross_entropy(logits, y, reduction="none")
    for lmd in (0.5, 1.0, 4.0):
        loss, l_clean = d3.d3_loss(logits, y, dist, d3.Params(lmd=lmd, eps=0.1))
        expect = lmd * torch.relu(ce - 0.1).mean() - 3.0
        if lmd > 1:
            expect = expect / (lmd + 1)
        assert torch.isclose(loss, expect)
        assert torch.isclose(l_clean, torch.relu(ce - 0.1).mean())


def test_distance_p1_and_p2():
    w, w0 = [torch.tensor([[3.0, -4.0]])], [torch.zeros(1, 2)]
    assert d3.distance(w, w0, 2.0).item() == pytest.approx(5.0)
    assert d3.distance(w, w0, 1.0).item() == pytest.approx(7.0)


def test_on_epoch_is_called_every_epoch_and_can_stop():
    x, y = make_data()
    seen = []
    ours(Tiny(), x, y, layer="linear", init="random", p=2.0, lmd=0.5, eps=0.1, lr=0.05, epochs=5,
         gen=torch.Generator().manual_seed(0), on_epoch=lambda e, logs: seen.append((e, logs)) or e == 2)
    assert [e for e, _ in seen] == [1, 2]
    assert {"loss", "loss_clean", "loss_dist"} <= set(seen[0][1])


def test_checkpoint_and_resume_continue_bit_identically():
    """A defense stopped after epoch 2 and resumed from its saved state ends where an
    uninterrupted run ends (how a retried Tune trial continues)."""
    x, y = make_data()
    torch.manual_seed(0)
    full, part = Tiny(), Tiny()
    part.load_state_dict(full.state_dict())
    start = {k: v.clone() for k, v in full.state_dict().items()}
    kw = dict(layer="linear", init="random", p=2.0, lmd=0.5, eps=0.1, lr=0.05, epochs=4)
    ours(full, x, y, gen=torch.Generator().manual_seed(3), **kw)

    states = []
    prm = d3.Params(eps=0.1, lmd=0.5, p=2.0, init="random", select_layer="linear")
    cfg = DefenseConfig(name="d3", epochs=4, lr=0.05, batch_size=len(x), params=prm)
    ctx = DefenseContext(num_classes=3, head="linear", aug=Augment(pad=0),
                         generator=torch.Generator().manual_seed(3), device=torch.device("cpu"),
                         on_epoch=lambda e, logs: e == 2, save=states.append)
    d3.run(part, x, y, cfg, ctx)
    assert [s["epoch"] for s in states] == [1, 2]
    import copy
    import io

    buf = io.BytesIO()
    torch.save(states[-1], buf)  # the checkpoint must load with weights_only=True
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = Tiny()
    resumed.load_state_dict(start)  # a fresh process: the poisoned weights again (W0)
    ctx2 = DefenseContext(num_classes=3, head="linear", aug=Augment(pad=0),
                          generator=torch.Generator().manual_seed(99), device=torch.device("cpu"),
                          on_epoch=lambda e, logs: None, resume=copy.deepcopy(saved))
    d3.run(resumed, x, y, cfg, ctx2)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
