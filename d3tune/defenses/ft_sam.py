"""FT-SAM, fine-tuning with sharpness-aware minimisation (Zhu et al., ICCV 2023).

Why it can work: plain fine-tuning barely moves the backdoored weights (the clean loss is already
low there). Minimising the *worst-case* loss in a neighbourhood of the weights pushes them
towards flatter regions, and the paper shows the backdoor-related neurons (large weight norms)
are moved most, so the backdoor is forgotten while the clean task is kept.

What this does (BackdoorBench's ``ft-sam``): every step is SAM's two passes,
1. g = grad of the loss at w; e = rho * g / ||g|| (adaptive ASAM, the default:
   e = rho * w^2 * g / || |w| * g ||, so the neighbourhood scales with each weight);
2. w + e: second forward/backward with BatchNorm running statistics frozen; restore w; the base
   optimiser (SGD with the common lr, momentum, weight decay; cosine over the common epochs)
   steps with the gradient taken at w + e.
Loss: cross-entropy with BackdoorBench's label smoothing (0.1: the true class gets 0.9, the other
classes share 0.1). rho = 2.0 (rho_max = rho_min), adaptive, as in BackdoorBench's config.
BackdoorBench steps its cosine schedule per batch with T_max = epochs; we step it per epoch like
every other defense here.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from d3tune.defenses import (
    FINETUNE_SPACE,
    DefenseConfig,
    DefenseContext,
    params_of,
    register,
)
from d3tune.train import augment, batches, make_sgd


@dataclass(frozen=True)
class Params:
    rho: float = field(default=2.0, metadata={"ge": 0.0})  # neighbourhood radius
    adaptive: bool = True  # ASAM: radius relative to |w|
    label_smoothing: float = field(default=0.1, metadata={"ge": 0.0, "lt": 1.0})


def smooth_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """BackdoorBench's ``smooth_crossentropy``: 1 - s on the label, s / (C - 1) elsewhere."""
    n_classes = logits.shape[1]
    target = torch.full_like(logits, smoothing / max(1, n_classes - 1))
    target.scatter_(1, y[:, None], 1.0 - smoothing)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Momentum 0: the second SAM pass must not count the batch twice in the running stats."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def sam_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
             prm: Params) -> float:
    """One SAM update of ``opt``'s parameters; returns the loss at the unperturbed weights."""
    params = [p for group in opt.param_groups for p in group["params"]]
    loss = smooth_cross_entropy(model(xb), yb, prm.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        live = [p for p in params if p.grad is not None]
        norm = torch.stack([((p.abs() if prm.adaptive else 1.0) * p.grad).norm()
                            for p in live]).norm()
        scale = prm.rho / (norm + 1e-12)
        steps = []
        for p in live:
            e = p.grad * scale
            if prm.adaptive:
                e = e * p.pow(2)
            p.add_(e)
            steps.append(e)
    with frozen_bn_stats(model):
        loss_adv = smooth_cross_entropy(model(xb), yb, prm.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss_adv.backward()
    with torch.no_grad():
        for p, e in zip(live, steps):
            p.sub_(e)
    opt.step()
    return loss.item()


SPACE = {**FINETUNE_SPACE, "defense.rho": {"loguniform": [0.1, 5.0]},
         "defense.label_smoothing": {"uniform": [0.0, 0.2]}}
CITATION = ("Zhu et al.: Enhancing Fine-Tuning Based Backdoor Defense with"
            " Sharpness-Aware Minimization, ICCV 2023")


@register("ft_sam", Params, space=SPACE, citation=CITATION, cost=0.94)
def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DefenseConfig,
        ctx: DefenseContext) -> None:
    prm: Params = params_of(cfg)
    opt, sched = make_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, steps = 0.0, 0
        for idx in batches(len(x), cfg.batch_size, ctx.generator, x.device):
            total += sam_step(model, opt, augment(x[idx], ctx.aug, ctx.generator), y[idx], prm)
            steps += 1
        sched.step()
        if ctx.on_epoch(epoch, {"loss": total / max(1, steps)}):
            return
