"""Blended (Chen et al., 2017): the image is alpha-blended with a fixed pattern.

BackdoorBench blends a Hello-Kitty photo at alpha 0.2; we cannot ship that image, so the
pattern is fixed uniform noise drawn from ``pattern_seed`` (the original paper's other variant),
identical for every sample and for train and test.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from d3tune.attacks import AttackContext, Trigger, register


@dataclass(frozen=True)
class Params:
    alpha: float = field(default=0.2, metadata={"gt": 0.0, "le": 1.0})
    pattern_seed: int = 0


@register("blended", Params)
def make(ctx: AttackContext) -> Trigger:
    c, h, w = ctx.dataset.shape
    g = torch.Generator().manual_seed(ctx.params.pattern_seed)
    pattern = torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8).float()
    alpha = ctx.params.alpha

    def trigger(x: torch.Tensor) -> torch.Tensor:
        p = pattern.to(x.device)
        return (x.float() * (1 - alpha) + p * alpha).round_().clamp_(0, 255).to(torch.uint8)

    return trigger
