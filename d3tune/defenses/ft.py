"""FT: plain fine-tuning on the clean set, the baseline D3 is measured against.

It shows the paper's point: fine-tuning from the poisoned weights stays in their basin, so the
backdoor usually survives.
"""
from __future__ import annotations

import torch
from torch import nn

from d3tune.defenses import FINETUNE_SPACE, DefenseConfig, DefenseContext, register
from d3tune.train import fit, make_sgd

SPACE = {**FINETUNE_SPACE, "defense.weight_decay": {"choice": [0.0, 0.0001, 0.0005, 0.001]}}
CITATION = "plain fine-tuning on the clean set (the baseline of every paper here)"


@register("ft", space=SPACE, citation=CITATION, cost=0.53)
def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DefenseConfig,
        ctx: DefenseContext) -> None:
    opt, sched = make_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs)
    fit(model, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=opt,
        scheduler=sched, aug=ctx.aug, generator=ctx.generator, on_epoch=ctx.on_epoch,
        resume=ctx.resume, save=ctx.save)
