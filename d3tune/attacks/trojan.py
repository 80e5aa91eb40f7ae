"""TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang, Zhang, "Trojaning Attack on Neural Networks",
NDSS 2018), as a data-poisoning attack the way BackdoorBench runs it (``trojannn``).

Why optimise the patch: a trigger that already excites a few internal neurons strongly gives
the model a ready-made, high-gain feature to tie to the target label, so the backdoor is
learned from few poisoned samples. The attacker briefly trains a clean surrogate
(``surrogate.py``), selects the ``neurons`` penultimate-layer neurons (inputs of the last linear
layer of the classifier head) with the largest outgoing weights, and optimises the pixels of a
bottom-right square patch (Adam on logits, so pixels stay in 0..255) so that patched clean
images drive those neurons towards ``target_value``. The quantised patch is then stamped
like BadNets' square: all-to-one, target label.

The optimised patch is the trigger's state: the cache keeps it, so a cache hit skips the
surrogate and the optimisation (``restore``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from d3tune.attacks import (
    AttackContext,
    StatefulTrigger,
    Trigger,
    register,
    scaled,
    seed_from,
    to_uint8,
)
from d3tune.attacks.surrogate import last_linear, train_surrogate
from d3tune.models import MODELS


@dataclass(frozen=True)
class Params:
    patch: int = field(default=6, metadata={"ge": 1})  # side at 32x32, scaled (3 px at 16)
    neurons: int = field(default=2, metadata={"ge": 1})
    target_value: float = field(default=100.0, metadata={"gt": 0.0})
    steps: int = field(default=100, metadata={"ge": 1})
    lr: float = field(default=0.1, metadata={"gt": 0.0})
    batch_size: int = field(default=256, metadata={"ge": 1})  # clean images the patch is fit on
    surrogate: str = field(default="cnn", metadata={"choices": tuple(MODELS.names())})
    surrogate_epochs: int = field(default=3, metadata={"ge": 1})


def stamp(x: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Paste a (C, s, s) patch into the bottom-right corner of a batch (any dtype)."""
    s = patch.shape[-1]
    out = x.clone()
    out[..., -s:, -s:] = patch.to(device=x.device, dtype=x.dtype)
    return out


def _trigger(patch: torch.Tensor) -> Trigger:
    return StatefulTrigger(lambda x: stamp(x, patch), {"patch": patch})


def optimise_patch(ctx: AttackContext) -> torch.Tensor:
    """The uint8 (C, s, s) patch that excites the selected surrogate neurons."""
    p, d = ctx.params, ctx.dataset
    c, h, w = d.shape
    side = min(scaled(min(h, w), p.patch), h, w)
    model = train_surrogate(ctx, p.surrogate, p.surrogate_epochs)
    head = last_linear(model, p.surrogate)
    chosen = head.weight.abs().sum(0).topk(min(p.neurons, head.in_features)).indices
    g = torch.Generator().manual_seed(seed_from(ctx.generator))
    idx = torch.randperm(len(d.y_train), generator=g)[: p.batch_size].to(d.x_train.device)
    images = d.x_train[idx].float() / 255
    logits = (torch.randn(c, side, side, generator=g) * 0.1).to(ctx.device).requires_grad_(True)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    opt = torch.optim.Adam([logits], lr=p.lr)
    try:
        for _ in range(p.steps):
            captured.clear()
            model(stamp(images, torch.sigmoid(logits)))
            act = captured[0][:, chosen]
            loss = ((act - p.target_value) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        hook.remove()
    return to_uint8(torch.sigmoid(logits.detach()) * 255)


def restore(ctx: AttackContext, state: Mapping[str, torch.Tensor]) -> Trigger:
    return _trigger(state["patch"])


@register("trojan", Params, all2all=False, restore=restore)
def make(ctx: AttackContext) -> Trigger:
    return _trigger(optimise_patch(ctx))
