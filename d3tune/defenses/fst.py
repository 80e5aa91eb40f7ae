"""FST, Feature Shift Tuning (Min et al., NeurIPS 2023), as BackdoorBench runs it.

Why it can work: fine-tuning fails when the backdoored and clean features stay entangled, because
the old classifier head keeps rewarding the old (poisoned) features. FST re-initialises the head
and penalises its alignment with the original head, which forces the feature extractor to shift
away from the backdoored representation while CE keeps the clean task.

What this does:
1. Head = the last ``nn.Linear`` inside the architecture's head module. W0 = its weight. The new
   weight is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) rescaled to ||W0|| (bias kept).
2. Fine-tune all parameters with  loss = CE + alpha * <W, W0>  (alpha = 0.2), SGD with the
   common lr / momentum / weight decay, cosine over the common epochs, train mode.
3. After every step, project W back onto the sphere of radius ||W0||.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d3tune.defenses import (
    FINETUNE_SPACE,
    DefenseConfig,
    DefenseContext,
    params_of,
    register,
)
from d3tune.errors import UsageError
from d3tune.train import fit, make_sgd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    alpha: float = field(default=0.2, metadata={"ge": 0.0})  # weight of <W, W0>


def head_linear(model: nn.Module, head: str) -> nn.Linear:
    linears = [m for m in model.get_submodule(head).modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"defense fst: the head module {head!r} holds no nn.Linear")
    return linears[-1]


@torch.no_grad()
def reinitialise(linear: nn.Linear,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: returns (W0, ||W0||) and leaves a fresh weight of the same norm in ``linear``."""
    w0 = linear.weight.detach().clone()
    norm = w0.norm()
    bound = 1.0 / math.sqrt(linear.weight.shape[1])
    fresh = (torch.rand(linear.weight.shape, generator=generator) * 2 - 1) * bound
    fresh = fresh.to(linear.weight)
    linear.weight.copy_(fresh * norm / fresh.norm().clamp_min(1e-12))
    return w0, norm


SPACE = {**FINETUNE_SPACE, "defense.alpha": {"uniform": [0.05, 0.5]}}
CITATION = ("Min et al.: Towards Stable Backdoor Purification through Feature"
            " Shift Tuning, NeurIPS 2023")


@register("fst", Params, space=SPACE, uses_head=True, citation=CITATION, cost=0.77)
def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DefenseConfig,
        ctx: DefenseContext) -> None:
    prm: Params = params_of(cfg)
    linear = head_linear(model, ctx.head)
    w0, norm = reinitialise(linear, ctx.generator)
    log.info("fst: re-initialised the head %s at norm %.3f", tuple(w0.shape), float(norm))
    opt, sched = make_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs)

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
        ce = F.cross_entropy(m(xb), yb)
        align = (linear.weight * w0).sum()
        loss = ce + prm.alpha * align
        return loss, {"loss": loss.item(), "loss_ce": ce.item(), "align": align.item()}

    @torch.no_grad()
    def after_step() -> None:  # Step 3
        linear.weight.mul_(norm / linear.weight.norm().clamp_min(1e-12))

    fit(model, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=opt,
        scheduler=sched, aug=ctx.aug, generator=ctx.generator, loss_fn=loss_fn,
        after_step=after_step, on_epoch=ctx.on_epoch, resume=ctx.resume, save=ctx.save)
