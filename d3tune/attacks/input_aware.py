"""Input-Aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack",
NeurIPS 2020).

Why generators: a fixed trigger is one pattern a defense can reverse-engineer; here small
encoder-decoders map each image to its own trigger, a pattern G(x) blended in through a mask
M(x): x' = x + (G(x) - x) * M(x). As in the authors' code, in two phases:

1. the mask generator alone, ``mask_epochs`` epochs: mask-size loss
   ``lambda_norm * mean(relu(M(x) - mask_density))`` keeps masks sparse, diversity loss
   ``lambda_div * mean(|x1 - x2| / |M(x1) - M(x2)|)`` keeps them image-specific (without it the
   size loss alone drives every mask to zero);
2. the classifier and the pattern generator jointly, the mask generator frozen:
   backdoor samples (``ratio`` of each batch, own trigger -> target label), cross samples
   (``cross_ratio`` x ``ratio`` of each batch, *another* image's trigger -> true label, so a
   trigger only works on the image it was made for) and the same diversity loss on patterns.

Defaults follow BackdoorBench's ``inputaware`` config (Adam(0.5, 0.9) at lr 0.01 for the
generators, lambda_div 1, lambda_norm 100, mask_density 0.032, p_cross = p_attack, masks
sharpened by tanh(20 m - 10)); the generators are smaller than the paper's.

Stateful: ``train_backdoor`` runs phase 2 in the trial's own training loop (``loss_fn`` and
``after_step`` hooks of ``d3tune.train.fit``) and returns both generators as the trigger; their
weights are cached with the model (``attack.pattern.*``, ``attack.mask.*``) and ``restore``
rebuilds the trigger on a cache hit.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d3tune.attacks import (
    AttackConfig,
    AttackContext,
    StatefulTrigger,
    Trainer,
    Trigger,
    backdoor_labels,
    register,
    seed_from,
    to_uint8,
)
from d3tune.train import batches

EPS = 1e-7
CHUNK = 1024  # images per generator call when applying the trigger


@dataclass(frozen=True)
class Params:
    cross_ratio: float = field(default=1.0, metadata={"ge": 0.0})  # cross samples per backdoor one
    lambda_div: float = field(default=1.0, metadata={"ge": 0.0})
    lambda_norm: float = field(default=100.0, metadata={"ge": 0.0})
    mask_density: float = field(default=0.032, metadata={"ge": 0.0, "le": 1.0})
    mask_epochs: int = field(default=25, metadata={"ge": 0})  # phase 1
    lr_generator: float = field(default=0.01, metadata={"gt": 0.0})
    batch_size: int = field(default=128, metadata={"ge": 2})  # phase 1
    width: int = field(default=16, metadata={"ge": 1})  # generator channels


class Generator(nn.Module):
    """A small conv encoder-decoder: image in [0, 1] -> ``out`` maps in [0, 1] ((tanh + 1) / 2).
    The mask generator then sharpens m with the authors' tanh(20 m - 10) / 2 + 1/2, so masks
    are nearly binary (and start at 1/2, where the gradient is largest)."""

    def __init__(self, channels: int, out: int, width: int, sharp: bool) -> None:
        super().__init__()
        act = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), act(),
            nn.Conv2d(width, width, 3, padding=1), act(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), act())
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, width, 3, padding=1), act(),
            nn.Conv2d(width, out, 3, padding=1))
        self.sharp = sharp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(x))
        if out.shape[-2:] != x.shape[-2:]:  # odd sizes: the pooling dropped a row/column
            out = F.interpolate(out, size=x.shape[-2:], mode="nearest")
        out = (torch.tanh(out) + 1) / 2
        return torch.tanh(20 * out - 10) / (2 + EPS) + 0.5 if self.sharp else out


def apply(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x + (pattern - x) * mask


def quantised(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to the uint8 grid, with a straight-through gradient. Why: evaluation
    applies the trigger to uint8 images and gets uint8 back, so the classifier trains on exactly
    those images (it must not learn sub-level detail that rounding erases) while the generators
    still get gradients."""
    return x + ((x * 255).round() / 255 - x).detach()


def diversity(x: torch.Tensor, out: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """mean(|x - x'| / |G(x) - G(x')|) over pairs (i, other[i]): large when G collapses."""
    d_img = (x - x[other]).pow(2).mean(dim=(1, 2, 3)).sqrt()
    d_out = ((out - out[other]).pow(2).mean(dim=(1, 2, 3)) + EPS).sqrt()  # finite grad at 0
    return (d_img / (d_out + EPS)).mean()


def _trigger(pattern_gen: Generator, mask_gen: Generator) -> Trigger:
    for g in (pattern_gen, mask_gen):
        g.eval().requires_grad_(False)

    @torch.no_grad()
    def trigger(x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), CHUNK):
            xf = x[i:i + CHUNK].float() / 255
            out.append(to_uint8(apply(xf, pattern_gen(xf), mask_gen(xf)) * 255))
        return torch.cat(out) if out else x.clone()

    state = {**{f"pattern.{k}": v for k, v in pattern_gen.state_dict().items()},
             **{f"mask.{k}": v for k, v in mask_gen.state_dict().items()}}
    return StatefulTrigger(trigger, state)


def _generators(ctx: AttackContext) -> tuple[Generator, Generator]:
    c, width = ctx.dataset.shape[0], ctx.params.width
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed_from(ctx.generator))
        pattern_gen, mask_gen = Generator(c, c, width, False), Generator(c, 1, width, True)
    return pattern_gen.to(ctx.device), mask_gen.to(ctx.device)


def _adam(gen: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.9))


def train_mask(ctx: AttackContext, mask_gen: Generator) -> None:
    """Phase 1: sparse, image-specific masks, before any classifier exists."""
    p, x_all = ctx.params, ctx.dataset.x_train
    opt = _adam(mask_gen, p.lr_generator)
    g = torch.Generator().manual_seed(seed_from(ctx.generator))
    mask_gen.train()
    for _ in range(p.mask_epochs):
        for idx in batches(len(x_all), p.batch_size, g, x_all.device):
            x = x_all[idx].float() / 255
            other = torch.randperm(len(x), generator=g).to(x.device)
            mask = mask_gen(x)
            loss = (p.lambda_norm * F.relu(mask - p.mask_density).mean()
                    + p.lambda_div * diversity(x, mask, other))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def train_backdoor(ctx: AttackContext, cfg: AttackConfig,
                   train: Trainer) -> tuple[nn.Module, Trigger]:
    """Phase 1 (masks), then phase 2: classifier and pattern generator in the trial's loop."""
    p = ctx.params
    num_classes = ctx.dataset.num_classes
    pattern_gen, mask_gen = _generators(ctx)
    train_mask(ctx, mask_gen)
    mask_gen.eval().requires_grad_(False)
    pattern_gen.train()
    opt = _adam(pattern_gen, p.lr_generator)
    # Anneal the generator with the classifier (cosine over the same steps): at a constant rate
    # it keeps moving after the classifier's rate has reached zero, and the final pair no longer
    # agrees (ASR swung between 0.6 and 0.9 over the last epochs on the digits).
    steps = max(1, train.epochs * math.ceil(len(ctx.dataset.y_train) / train.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
        x = xb.float() / 255
        n = len(x)
        n_bd = int(n * cfg.ratio)
        n_cross = min(int(n * cfg.ratio * p.cross_ratio), n - n_bd)
        pattern, mask = pattern_gen(x), mask_gen(x)
        other = torch.roll(torch.arange(n, device=x.device), 1)  # another image of the batch
        x_bd = quantised(apply(x[:n_bd], pattern[:n_bd], mask[:n_bd]))
        cross = slice(n_bd, n_bd + n_cross)
        x_cross = quantised(apply(x[cross], pattern[other[cross]], mask[other[cross]]))
        inputs = torch.cat([x_bd, x_cross, x[n_bd + n_cross:]])
        labels = torch.cat([backdoor_labels(yb[:n_bd], cfg, num_classes), yb[n_bd:]])
        ce = F.cross_entropy(model(inputs), labels)
        div = diversity(x, pattern, other)
        return ce + p.lambda_div * div, {"loss": ce.item(), "div": div.item()}

    def after_step() -> None:  # the loop stepped the classifier; now the pattern generator
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    model = train(ctx.dataset.x_train, ctx.dataset.y_train, loss_fn=loss_fn, after_step=after_step)
    return model, _trigger(pattern_gen, mask_gen)


def restore(ctx: AttackContext, state: Mapping[str, torch.Tensor]) -> Trigger:
    pattern_gen, mask_gen = _generators(ctx)
    for prefix, gen in (("pattern.", pattern_gen), ("mask.", mask_gen)):
        gen.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return _trigger(pattern_gen, mask_gen)


@register("input_aware", Params, train_backdoor=train_backdoor, restore=restore)
def make(ctx: AttackContext) -> Trigger:
    """The untrained generators: only meaningful after ``train_backdoor``."""
    return _trigger(*_generators(ctx))
