"""A briefly trained clean model that some attacks optimise their trigger against (LC, TrojanNN).

Why a surrogate and not the victim: in BackdoorBench these attacks use a pre-trained clean
model of the attacker's; here the attacker trains one in a few epochs, on the clean training set,
with a seed drawn from the trial's poisoning generator, so the trigger is reproducible and the
backdoored model is still trained from scratch on the poisoned data afterwards. The default
architecture is the small ``cnn`` whatever the victim is: the trigger only has to carry a
learnable signal, and a PreActResNet surrogate on a CPU would cost minutes per trial.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from d3tune.attacks import AttackContext, seed_from
from d3tune.models import MODELS, ModelSpec, build_model
from d3tune.train import Augment, fit, make_sgd

log = logging.getLogger(__name__)


def train_surrogate(ctx: AttackContext, arch: str, epochs: int, lr: float = 0.05,
                    batch_size: int = 64) -> nn.Module:
    """A clean ``arch`` model trained for ``epochs`` on ``ctx.dataset``; returned in eval mode
    with gradients off for its parameters (callers differentiate w.r.t. inputs only)."""
    d = ctx.dataset
    c, h, w = d.shape
    seed = seed_from(ctx.generator)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = build_model(arch, ModelSpec(d.num_classes, c, min(h, w), d.mean, d.std))
    model = model.to(ctx.device)
    opt, sched = make_sgd(model.parameters(), lr, 0.9, 5e-4, epochs)
    fit(model, d.x_train, d.y_train, epochs=epochs, batch_size=batch_size, optimizer=opt,
        scheduler=sched, aug=Augment(hflip=d.hflip),
        generator=torch.Generator().manual_seed(seed))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.debug("surrogate %s trained for %d epochs (seed %d)", arch, epochs, seed)
    return model


def last_linear(model: nn.Module, arch: str) -> nn.Linear:
    """The last ``nn.Linear`` of the registry's classifier head: its input is the penultimate
    layer whose neurons TrojanNN excites (the head itself for cnn/PreActResNet/ViT; VGG's
    head is an MLP)."""
    head = model.get_submodule(MODELS[arch].head)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"architecture {arch!r}: its head {MODELS[arch].head!r} has no nn.Linear")
    return linears[-1]
