"""FT: plain fine-tuning on the clean set, the baseline D3 is measured against.

It shows the paper's point: fine-tuning from the poisoned weights stays in their basin, so the
backdoor usually survives.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from d3tune.batched import fit_batched, stack
from d3tune.defenses import FINETUNE_SPACE, DefenseConfig, DefenseContext, register
from d3tune.train import fit, make_sgd

SPACE = {**FINETUNE_SPACE, "defense.weight_decay": {"choice": [0.0, 0.0001, 0.0005, 0.001]}}
CITATION = "plain fine-tuning on the clean set (the baseline of every paper here)"


def run_batched(models: Sequence[nn.Module], xs: Sequence[torch.Tensor],
                ys: Sequence[torch.Tensor], cfg: DefenseConfig,
                ctxs: Sequence[DefenseContext]) -> None:
    """``run`` on several members as one batched computation (d3tune/batched.py)."""
    net = stack(models)
    opt, sched = make_sgd(list(net.params.values()), cfg.lr, cfg.momentum, cfg.weight_decay,
                          cfg.epochs)
    fit_batched(net, xs, ys, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=opt,
                scheduler=sched, aug=ctxs[0].aug, generators=[c.generator for c in ctxs])
    net.write_back(models)


@register("ft", space=SPACE, citation=CITATION, cost=0.53, batched=run_batched)
def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DefenseConfig,
        ctx: DefenseContext) -> None:
    opt, sched = make_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs)
    fit(model, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=opt,
        scheduler=sched, aug=ctx.aug, generator=ctx.generator, on_epoch=ctx.on_epoch,
        resume=ctx.resume, save=ctx.save)
