"""Label-consistent backdoor (Turner, Tsipras, Madry, "Label-Consistent Backdoor Attacks",
arXiv 1912.02771, 2019).

Why adversarial perturbations: a clean-label attack (training labels stay correct) only works
if the target-class images are hard to classify by their natural features, so that the model
leans on the trigger instead. Turner et al. make them hard with a PGD perturbation
(L_inf, eps 8/255 by default here) against a clean model, then stamp a small black-and-white
checkerboard in the corners (all four, their final version, which survives flips).
Training images: PGD + trigger (``poison_train``); test images: trigger only.

The clean model is a surrogate trained for a few epochs inside the attack (``surrogate.py``),
seeded from the trial's poisoning generator, so the poisoned set is reproducible. PGD starts
at the image (no random start) and maximises the cross-entropy of the true label.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from d3tune.attacks import AttackContext, Trigger, register, scaled, to_uint8
from d3tune.attacks.surrogate import train_surrogate
from d3tune.models import MODELS

CHUNK = 512  # images per PGD batch: bounds memory on large training sets


@dataclass(frozen=True)
class Params:
    eps: float = field(default=8.0, metadata={"ge": 0.0, "le": 255.0})  # L_inf, 0..255 scale
    step_size: float = field(default=2.0, metadata={"gt": 0.0})  # per PGD step, 0..255 scale
    steps: int = field(default=10, metadata={"ge": 0})
    patch: int = field(default=3, metadata={"ge": 1})  # checkerboard side at 32x32, scaled
    corners: str = field(default="all", metadata={"choices": ("all", "bottom_right")})
    surrogate: str = field(default="cnn", metadata={"choices": tuple(MODELS.names())})
    surrogate_epochs: int = field(default=3, metadata={"ge": 1})


def corner_trigger(shape: tuple[int, int, int], side: int, corners: str) -> Trigger:
    """Stamp a side x side checkerboard (white top-left) in the bottom-right corner, mirrored
    into the other three corners when ``corners`` is 'all'."""
    _, h, w = shape
    side = min(side, h, w)
    idx = torch.arange(side)
    board = (((idx[:, None] + idx[None, :]) % 2 == 0).to(torch.uint8) * 255)

    def trigger(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        b = board.to(x.device)
        out[..., h - side:, w - side:] = b
        if corners == "all":
            out[..., :side, :side] = b.flip(0, 1)
            out[..., :side, w - side:] = b.flip(0)
            out[..., h - side:, :side] = b.flip(1)
        return out

    return trigger


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
        steps: int) -> torch.Tensor:
    """Untargeted L_inf PGD on uint8 images (budgets on the 0..255 scale); uint8 out."""
    x0 = x.float() / 255
    adv = x0.clone()
    eps, step = eps / 255, step / 255
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + step * grad.sign()
            adv = (x0 + (adv - x0).clamp(-eps, eps)).clamp(0, 1)
    return to_uint8(adv.detach() * 255)


def poison_train(ctx: AttackContext, trigger: Trigger, x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """Target-class training images -> PGD-perturbed against a surrogate, then triggered."""
    p = ctx.params
    if len(x) == 0 or p.steps == 0 or p.eps == 0:
        return trigger(x)
    model = train_surrogate(ctx, p.surrogate, p.surrogate_epochs)
    adv = torch.cat([pgd(model, x[i:i + CHUNK], y[i:i + CHUNK], p.eps, p.step_size, p.steps)
                     for i in range(0, len(x), CHUNK)])
    return trigger(adv)


@register("lc", Params, clean_label=True, all2all=False, poison_train=poison_train)
def make(ctx: AttackContext) -> Trigger:
    c, h, w = ctx.dataset.shape
    return corner_trigger((c, h, w), scaled(min(h, w), ctx.params.patch), ctx.params.corners)
