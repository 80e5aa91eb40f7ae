"""BadNets (Gu, Dolan-Gavitt, Garg, 2017): a white square stamped in the bottom-right corner.

BackdoorBench uses a 3x3 white patch on 32x32 images; we scale the patch to the image size
(3 px at 32, 2 px at 16, 6 px at 64) so the trigger covers the same fraction of the image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from d3tune.attacks import AttackContext, Trigger, register, scaled


@dataclass(frozen=True)
class Params:
    patch: int = field(default=3, metadata={"ge": 1})  # side in pixels at 32x32, scaled otherwise
    value: int = field(default=255, metadata={"ge": 0, "le": 255})


@register("badnets", Params)
def make(ctx: AttackContext) -> Trigger:
    _, h, w = ctx.dataset.shape
    side = min(scaled(min(h, w), ctx.params.patch), h, w)
    value = ctx.params.value

    def trigger(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., h - side:, w - side:] = value
        return out

    return trigger
