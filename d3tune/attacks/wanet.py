"""WaNet (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021).

The trigger is a fixed, smooth, nearly invisible warp of the image: a random k x k field of 2-D
offsets, upsampled bicubically to the image size, scaled by ``s / H`` (in grid_sample's -1..1
coordinates) and applied with one batched ``F.grid_sample``. BackdoorBench defaults: k = 4,
s = 0.5, grid_rescale = 1, cross_ratio = 2.

"Noise mode": warps this small are easy to confuse with natural jitter, so WaNet also trains on
cross samples, images warped with the field plus per-pixel random noise *at their true labels*;
the model must then key on the exact field. Here they are ``cross_ratio`` x (number poisoned)
extra copies of non-poisoned training images appended to the training set (``extra_train``).
BackdoorBench draws both kinds per batch after augmentation; we poison once before training,
so the random-crop augmentation also shifts the warp (a harder task on small images).
The field is drawn from the trial's poisoning generator: one field per seed.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from d3tune.attacks import AttackContext, StatefulTrigger, Trigger, register, to_uint8


@dataclass(frozen=True)
class Params:
    k: int = field(default=4, metadata={"ge": 2})  # control points per side of the field
    s: float = field(default=0.5, metadata={"gt": 0.0})  # warp strength
    grid_rescale: float = field(default=1.0, metadata={"gt": 0.0})
    cross_ratio: float = field(default=2.0, metadata={"ge": 0.0})  # noise samples per poisoned one


def warp_grid(h: int, w: int, k: int, s: float, rescale: float,
              generator: torch.Generator) -> torch.Tensor:
    """The (1, H, W, 2) sampling grid of WaNet's warp, as in the authors' code."""
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows = torch.linspace(-1, 1, h)
    cols = torch.linspace(-1, 1, w)
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    identity = torch.stack((c, r), dim=2)[None]  # grid_sample wants (x = column, y = row)
    return ((identity + s * noise / h) * rescale).clamp(-1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Warp a uint8 batch with a (1 or N, H, W, 2) grid; uint8 out."""
    if len(x) == 0:
        return x.clone()
    g = grid.to(x.device).expand(len(x), -1, -1, -1)
    return to_uint8(F.grid_sample(x.float(), g, mode="bilinear", padding_mode="zeros",
                                  align_corners=True))


def _trigger(grid: torch.Tensor) -> Trigger:
    return StatefulTrigger(lambda x: warp(x, grid), {"grid": grid})


def extra_train(ctx: AttackContext, trigger: Trigger, x: torch.Tensor, y: torch.Tensor,
                mask: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the noise-mode cross samples: clean images warped with grid + noise, true labels."""
    n_cross = int(round(ctx.params.cross_ratio * int(mask.sum())))
    pool = (~mask).nonzero().flatten().cpu()
    if n_cross == 0 or len(pool) == 0:
        return x, y
    pick = pool[torch.randperm(len(pool), generator=generator)[: min(n_cross, len(pool))]]
    pick = pick.to(x.device)
    grid = trigger.state["grid"].cpu()
    _, h, w = ctx.dataset.shape
    noise = (torch.rand(len(pick), h, w, 2, generator=generator) * 2 - 1) / h
    return torch.cat([x, warp(x[pick], (grid + noise).clamp(-1, 1))]), torch.cat([y, y[pick]])


def restore(ctx: AttackContext, state: Mapping[str, torch.Tensor]) -> Trigger:
    return _trigger(state["grid"])


@register("wanet", Params, extra_train=extra_train, restore=restore)
def make(ctx: AttackContext) -> Trigger:
    _, h, w = ctx.dataset.shape
    p = ctx.params
    return _trigger(warp_grid(h, w, p.k, p.s, p.grid_rescale, ctx.generator))
