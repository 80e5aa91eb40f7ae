"""D3, Distance-Driven Detoxification (Wei, Liu, Zha, ICCV 2025).

Plain fine-tuning stays in the poisoned model's basin, where clean and triggered inputs both
have low loss. D3 looks for the point farthest from the poisoned weights that still fits the
clean data: maximise ||W - W0||_p subject to clean loss <= eps, solved in penalised form with
SGD, projecting the selected weights back onto the sphere of their initial norm after each step.
Every step below is numbered as in ../shared/D3_SPEC.md (the authors' code).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d3tune.batched import fit_batched, member_norms, stack
from d3tune.defenses import DefenseConfig, DefenseContext, params_of, register
from d3tune.errors import UsageError
from d3tune.train import fit, make_sgd

INIT_MODES = ("random", "near", "middle", "far", "noise")


@dataclass(frozen=True)
class Params:
    eps: float = field(default=0.1, metadata={"ge": 0.0})  # clean-loss threshold (hinge)
    lmd: float = field(default=0.5, metadata={"gt": 0.0})  # weight of the clean loss
    p: float = field(default=2.0, metadata={"gt": 0.0})  # norm of the distance
    init: str = field(default="random", metadata={"choices": INIT_MODES})
    select_layer: str | None = None  # None: the architecture's classifier head
    radius: float = field(default=1.0, metadata={"gt": 0.0})  # extension: sphere = radius*||W0||


def selected_modules(model: nn.Module, name: str) -> list[nn.Module]:
    """Step 1: every nn.Linear and nn.Conv2d inside the module called ``name``."""
    try:
        root = model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise UsageError(f"defense.select_layer: the model has no module {name!r} "
                         f"(top-level modules: {', '.join(names)})") from None
    mods = [m for m in root.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not mods:
        raise UsageError(f"defense.select_layer: module {name!r} holds no Linear or Conv2d layer")
    return mods


@torch.no_grad()
def initialise(weights: list[torch.Tensor], w0: list[torch.Tensor], mode: str, p: float,
               generator: torch.Generator) -> None:
    """Step 2: the warm-up initialisation of each selected weight, in place."""
    for w, init in zip(weights, w0):
        if mode == "random":
            r = torch.rand(w.shape, generator=generator).to(w) - 0.5
            w.copy_(r * (init.norm(p) / r.norm(p)))
        elif mode == "near":
            w.copy_(init)
        elif mode == "middle":
            w.zero_()
        elif mode == "far":
            w.copy_(-init)
        elif mode == "noise":
            w.copy_(init + torch.randn(w.shape, generator=generator).to(w) * init.std())
        else:
            raise UsageError(f"defense.init: unknown mode {mode!r}; choose one of {INIT_MODES}")


def distance(weights: list[torch.Tensor], w0: list[torch.Tensor], p: float) -> torch.Tensor:
    """sum_i ||W_i - W0_i||_p, one term per selected module."""
    return torch.stack([(w - init).norm(p) for w, init in zip(weights, w0)]).sum()


def d3_loss(logits: torch.Tensor, y: torch.Tensor, l_dist: torch.Tensor, prm: Params):
    """Step 4: lmd * mean(relu(CE - eps)) - distance, divided by (lmd + 1) when lmd > 1.
    Stacked members (logits [M, B, K], y [M, B], l_dist [M]) give one loss per member."""
    ce = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)
    l_clean = F.relu(ce - prm.eps).mean(-1)
    loss = prm.lmd * l_clean - l_dist
    if prm.lmd > 1:
        loss = loss / (prm.lmd + 1)
    return loss, l_clean


@torch.no_grad()
def project(weights: list[torch.Tensor], norms: list[torch.Tensor], p: float) -> None:
    """Step 5: W <- W * target_norm / ||W||_p (the clamp only guards an all-zero weight)."""
    for w, target in zip(weights, norms):
        w.mul_(target / w.norm(p).clamp_min(1e-12))


# as search_spaces/robust_d3_digits.yaml
SPACE = {
    "defense.lr": {"loguniform": [0.003, 0.05]},
    "defense.epochs": {"int": [20, 60]},
    "defense.batch_size": {"choice": [16, 32, 64]},
    "defense.eps": {"uniform": [0.0, 0.5]},
    "defense.lmd": {"loguniform": [0.1, 10.0]},
    "defense.p": {"choice": [1, 1.5, 2]},
    "defense.radius": {"uniform": [0.5, 2.0]},
    "defense.init": {"choice": ["random", "near", "middle", "far", "noise"]},
}
CITATION = "Wei, Liu, Zha: Distance-Driven Detoxification (D3), ICCV 2025"


def run_batched(models: Sequence[nn.Module], xs: Sequence[torch.Tensor],
                ys: Sequence[torch.Tensor], cfg: DefenseConfig,
                ctxs: Sequence[DefenseContext]) -> None:
    """``run`` on several members as one batched computation (d3tune/batched.py). Steps 1-2
    run per member, each warm-up drawing from the member's own generator; steps 4-5 reduce
    over each member's own weights."""
    prm: Params = params_of(cfg)
    layer = prm.select_layer or ctxs[0].head
    by_id = {id(w): n for n, w in models[0].named_parameters()}
    names = [by_id[id(m.weight)] for m in selected_modules(models[0], layer)]
    per_member = []
    for model, ctx in zip(models, ctxs):
        weights = [m.weight for m in selected_modules(model, layer)]
        w0 = [w.detach().clone() for w in weights]
        initialise(weights, w0, prm.init, prm.p, ctx.generator)
        per_member.append(w0)
    w0 = [torch.stack(module) for module in zip(*per_member)]  # one [M, ...] per module
    norms = [prm.radius * member_norms(init, prm.p) for init in w0]
    net = stack(models)
    weights = [net.params[n] for n in names]

    def loss_fn(logits: torch.Tensor, yb: torch.Tensor):
        l_dist = torch.stack([member_norms(w - init, prm.p) for w, init in zip(weights, w0)]).sum(0)
        loss, l_clean = d3_loss(logits, yb, l_dist, prm)
        return loss, {"loss": loss.detach().mean(), "loss_clean": l_clean.detach().mean(),
                      "loss_dist": l_dist.detach().mean()}

    @torch.no_grad()
    def project_members() -> None:  # step 5, each member onto its own sphere
        for w, target in zip(weights, norms):
            scale = target / member_norms(w, prm.p).clamp_min(1e-12)
            w.mul_(scale.view(-1, *[1] * (w.dim() - 1)))

    opt, sched = make_sgd(list(net.params.values()), cfg.lr, cfg.momentum, cfg.weight_decay,
                          cfg.epochs)
    fit_batched(net, xs, ys, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=opt,
                scheduler=sched, aug=ctxs[0].aug, generators=[c.generator for c in ctxs],
                loss_fn=loss_fn, after_step=project_members)
    net.write_back(models)


@register("d3", Params, space=SPACE, head_knob="select_layer", citation=CITATION,
          cost=1.0, batched=run_batched)
def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DefenseConfig,
        ctx: DefenseContext) -> None:
    prm: Params = params_of(cfg)
    layer = prm.select_layer or ctx.head
    weights = [m.weight for m in selected_modules(model, layer)]
    w0 = [w.detach().clone() for w in weights]
    norms = [prm.radius * init.norm(prm.p) for init in w0]
    initialise(weights, w0, prm.init, prm.p, ctx.generator)

    # Step 3: SGD over all parameters, cosine annealing, train mode (inside fit).
    opt, sched = make_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs)

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
        l_dist = distance(weights, w0, prm.p)
        loss, l_clean = d3_loss(m(xb), yb, l_dist, prm)
        # Detached tensors, not floats: fit averages them on the device (no host sync per step).
        return loss, {"loss": loss.detach(), "loss_clean": l_clean.detach(),
                      "loss_dist": l_dist.detach()}

    fit(model, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=opt,
        scheduler=sched, aug=ctx.aug, generator=ctx.generator, loss_fn=loss_fn,
        after_step=lambda: project(weights, norms, prm.p), on_epoch=ctx.on_epoch,
        resume=ctx.resume, save=ctx.save)
