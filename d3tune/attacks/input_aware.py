"""Input-Aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack",
NeurIPS 2020).

Why a generator: a fixed trigger is one pattern a defense can reverse-engineer; here a small
encoder-decoder G maps each image to its own trigger (a pattern and a blending mask,
x' = x + (pattern - x) * mask), trained jointly with the classifier:

- backdoor samples (``ratio`` of each batch): x with its own trigger -> target label;
- cross samples (``cross_ratio`` x ``ratio`` of each batch): x with *another* image's trigger ->
  its true label, so a trigger only works on the image it was made for;
- diversity loss ``lambda_div * mean(|x1 - x2| / |G(x1) - G(x2)|)`` keeps triggers of different
  images different (no collapse to one fixed pattern);
- mask-size loss ``lambda_norm * mean(relu(mask - mask_density))`` keeps the masks sparse.

Simplification: the paper pre-trains the mask generator alone first; here pattern and mask are
two heads of one generator trained in the single joint phase (fewer epochs on small data).
Defaults follow BackdoorBench's ``inputaware`` config (lr_G 0.01 with Adam(0.5, 0.9),
lambda_div 1, lambda_norm 100, mask_density 0.032, p_cross = p_attack).

Stateful: ``train_backdoor`` runs the trial's own training loop (``loss_fn``/``after_step``
hooks of ``d3tune.train.fit``) and returns the trained generator as the trigger; its weights are
cached with the model (``attack.*`` tensors) and ``restore`` rebuilds it on a cache hit.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d3tune.attacks import (AttackConfig, AttackContext, StatefulTrigger, Trigger, TrainFn,
                            backdoor_labels, register, seed_from, to_uint8)

EPS = 1e-7
CHUNK = 1024  # images per generator call when applying the trigger


@dataclass(frozen=True)
class Params:
    cross_ratio: float = field(default=1.0, metadata={"ge": 0.0})  # cross samples per backdoor one
    lambda_div: float = field(default=1.0, metadata={"ge": 0.0})
    lambda_norm: float = field(default=100.0, metadata={"ge": 0.0})
    mask_density: float = field(default=0.032, metadata={"ge": 0.0, "le": 1.0})
    lr_generator: float = field(default=0.01, metadata={"gt": 0.0})
    width: int = field(default=16, metadata={"ge": 1})  # generator channels


class Generator(nn.Module):
    """A small conv encoder-decoder: image in [0, 1] -> (pattern in [0, 1], mask in [0, 1])."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        act = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), act(),
            nn.Conv2d(width, width, 3, padding=1), act(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), act())
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, width, 3, padding=1), act(),
            nn.Conv2d(width, channels + 1, 3, padding=1))
        self.channels = channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.decoder(self.encoder(x))
        if out.shape[-2:] != x.shape[-2:]:  # odd sizes: the pooling dropped a row/column
            out = F.interpolate(out, size=x.shape[-2:], mode="nearest")
        c = self.channels
        return (torch.tanh(out[:, :c]) + 1) / 2, torch.sigmoid(out[:, c:])


def apply(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x + (pattern - x) * mask


def _trigger(gen: Generator) -> Trigger:
    gen.eval().requires_grad_(False)

    @torch.no_grad()
    def trigger(x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), CHUNK):
            xf = x[i:i + CHUNK].float() / 255
            out.append(to_uint8(apply(xf, *gen(xf)) * 255))
        return torch.cat(out) if out else x.clone()

    return StatefulTrigger(trigger, dict(gen.state_dict()))


def _generator(ctx: AttackContext) -> Generator:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed_from(ctx.generator))
        gen = Generator(ctx.dataset.shape[0], ctx.params.width)
    return gen.to(ctx.device)


def train_backdoor(ctx: AttackContext, cfg: AttackConfig,
                   train: TrainFn) -> tuple[nn.Module, Trigger]:
    """Train the classifier and the trigger generator together in the trial's loop."""
    p = ctx.params
    num_classes = ctx.dataset.num_classes
    gen = _generator(ctx).train()
    opt = torch.optim.Adam(gen.parameters(), lr=p.lr_generator, betas=(0.5, 0.9))

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
        x = xb.float() / 255
        n = len(x)
        n_bd = int(n * cfg.ratio)
        n_cross = min(int(n * cfg.ratio * p.cross_ratio), n - n_bd)
        pattern, mask = gen(x)
        other = torch.roll(torch.arange(n, device=x.device), 1)  # another image of the batch
        x_bd = apply(x[:n_bd], pattern[:n_bd], mask[:n_bd])
        cross = slice(n_bd, n_bd + n_cross)
        x_cross = apply(x[cross], pattern[other[cross]], mask[other[cross]])
        inputs = torch.cat([x_bd, x_cross, x[n_bd + n_cross:]])
        labels = torch.cat([backdoor_labels(yb[:n_bd], cfg, num_classes), yb[n_bd:]])
        ce = F.cross_entropy(model(inputs), labels)
        d_img = (x - x[other]).pow(2).mean(dim=(1, 2, 3)).sqrt()
        d_pat = (pattern - pattern[other]).pow(2).mean(dim=(1, 2, 3)).sqrt()
        div = (d_img / (d_pat + EPS)).mean()
        norm = F.relu(mask - p.mask_density).mean()
        loss = ce + p.lambda_div * div + p.lambda_norm * norm
        return loss, {"loss": ce.item(), "div": div.item(), "mask": mask.mean().item()}

    def after_step() -> None:  # the loop stepped the classifier; now the generator
        opt.step()
        opt.zero_grad(set_to_none=True)

    model = train(ctx.dataset.x_train, ctx.dataset.y_train, loss_fn=loss_fn, after_step=after_step)
    return model, _trigger(gen)


def restore(ctx: AttackContext, state: Mapping[str, torch.Tensor]) -> Trigger:
    gen = _generator(ctx)
    gen.load_state_dict(state)
    return _trigger(gen)


@register("input_aware", Params, train_backdoor=train_backdoor, restore=restore)
def make(ctx: AttackContext) -> Trigger:
    """The untrained generator: only meaningful after ``train_backdoor``."""
    return _trigger(_generator(ctx))
