"""FP, Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018), with BackdoorBench's defaults.

Why it can work: a backdoor often lives in channels that clean inputs barely use, so pruning the
channels that are dormant on clean data (lowest mean activation first) removes it at little cost
to clean accuracy; fine-tuning afterwards recovers the accuracy that pruning did cost.

What this does, step by step:
1. The pruned layer is the last ``nn.Conv2d`` of the model (found by scanning modules). Its
   channels are masked where they are consumed: at the input of the classifier head when the
   head reads them directly after global pooling (our CNN, PreActResNet-18, where the mask then
   also covers the residual sum), otherwise at the conv's own output (after its BatchNorm when
   one follows, so a pruned channel is exactly zero). BackdoorBench masks the same place: the
   input of the network's last module.
2. Rank channels by mean activation over the clean set (ascending, stable).
3. Prune in steps of ``ceil(prune_step * C)`` channels until clean accuracy **on the defender's
   clean set** (BackdoorBench peeks at the test set; we may not) would drop by ``acc_ratio`` or
   more relative to the unpruned model; keep the last step that did not.
4. Fine-tune all parameters with the mask kept in place (a forward hook reading a non-persistent
   buffer, so the state_dict keys and the architecture stay as they were), SGD + cosine, the
   common ``epochs``/``lr``/``batch_size`` (BackdoorBench: 100 epochs, lr 0.01, like FT).
5. Fold the mask into the weights at the end as well, so the state_dict alone is the pruned model.

``pruned_channels(model)`` lists the pruned channels; every epoch log carries their count.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from d3tune.defenses import (
    FINETUNE_SPACE,
    DefenseConfig,
    DefenseContext,
    params_of,
    register,
)
from d3tune.errors import UsageError
from d3tune.train import fit, make_sgd, predict

log = logging.getLogger(__name__)

MASK = "fp_channel_mask"  # non-persistent buffer on the masked module: 1 keep, 0 pruned


@dataclass(frozen=True)
class Params:
    # tolerated relative drop of clean-set accuracy
    acc_ratio: float = field(default=0.1, metadata={"gt": 0.0, "le": 1.0})
    # share of the channels added per pruning step (BackdoorBench once_prune_ratio)
    prune_step: float = field(default=0.01, metadata={"gt": 0.0, "le": 1.0})


@dataclass(frozen=True)
class PrunePoint:
    """Where the mask multiplies: the module's input (the head) or its output."""

    module: nn.Module
    on_input: bool
    channels: int


def prune_point(model: nn.Module, head: str) -> PrunePoint:
    """Step 1: locate the last conv layer's channels as the rest of the network sees them."""
    modules = list(model.modules())
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UsageError("defense fp: the model has no Conv2d layer to prune")
    last = modules[convs[-1]]
    channels = last.out_channels
    linears = [m for m in model.get_submodule(head).modules() if isinstance(m, nn.Linear)]
    if linears and linears[0].in_features == channels:
        return PrunePoint(linears[0], True, channels)
    following = modules[convs[-1] + 1] if convs[-1] + 1 < len(modules) else None
    if isinstance(following, nn.BatchNorm2d) and following.num_features == channels:
        return PrunePoint(following, False, channels)
    return PrunePoint(last, False, channels)


def _broadcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(1, -1, *([1] * (like.dim() - 2)))


def attach_mask(point: PrunePoint, device: torch.device) -> torch.Tensor:
    """Register the all-ones mask buffer and the hook that applies it; returns the buffer."""
    mod = point.module
    if MASK not in mod._buffers:
        mod.register_buffer(MASK, torch.ones(point.channels, device=device), persistent=False)
        if point.on_input:
            mod.register_forward_pre_hook(
                lambda m, args: (args[0] * _broadcast(getattr(m, MASK), args[0]), *args[1:]))
        else:
            mod.register_forward_hook(lambda m, inp, out: out * _broadcast(getattr(m, MASK), out))
    return mod._buffers[MASK]


def pruned_channels(model: nn.Module) -> list[int]:
    """The channels FP pruned in ``model`` (empty if FP never ran on it)."""
    for m in model.modules():
        if MASK in m._buffers:
            return (m._buffers[MASK] == 0).nonzero().flatten().tolist()
    return []


@torch.no_grad()
def channel_activations(model: nn.Module, point: PrunePoint, x: torch.Tensor,
                        batch_size: int = 256) -> torch.Tensor:
    """Step 2: mean activation of each channel over the clean set (eval mode, no augmentation)."""
    total = torch.zeros(point.channels, device=x.device)

    def grab(t: torch.Tensor) -> None:
        nonlocal total
        total = total + t.transpose(0, 1).reshape(point.channels, -1).mean(1) * len(t)

    if point.on_input:
        handle = point.module.register_forward_pre_hook(lambda m, args: grab(args[0]))
    else:
        handle = point.module.register_forward_hook(lambda m, inp, out: grab(out))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        handle.remove()
        model.train(was_training)
    return total / max(1, len(x))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).float().mean().item())


@torch.no_grad()
def choose_pruning(model: nn.Module, mask: torch.Tensor, order: torch.Tensor, x: torch.Tensor,
                   y: torch.Tensor, prm: Params) -> int:
    """Step 3: grow the pruned set along ``order`` while the clean-set accuracy holds; leaves
    ``mask`` at the last acceptable step and returns how many channels it prunes."""
    acc0 = _accuracy(model, x, y)
    step = max(1, math.ceil(prm.prune_step * len(order)))
    kept = 0
    for k in range(step, len(order), step):
        mask.fill_(1.0)
        mask[order[:k]] = 0.0
        acc = _accuracy(model, x, y)
        if (acc0 - acc) / max(acc0, 1e-12) >= prm.acc_ratio:
            break
        kept = k
    mask.fill_(1.0)
    mask[order[:kept]] = 0.0
    log.info("fp: pruned %d/%d channels (clean-set accuracy %.3f unpruned)", kept, len(order), acc0)
    return kept


@torch.no_grad()
def fold_mask(point: PrunePoint, mask: torch.Tensor) -> None:
    """Step 5: zero the weights the mask disconnects, so the state_dict holds the pruning."""
    mod = point.module
    if point.on_input:
        mod.weight.mul_(mask.view(1, -1))
        return
    weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
    if weight is not None:
        weight.mul_(mask.view((-1,) + (1,) * (weight.dim() - 1)))
    if bias is not None:
        bias.mul_(mask)


SPACE = {**FINETUNE_SPACE, "defense.acc_ratio": {"uniform": [0.02, 0.3]},
         "defense.prune_step": {"choice": [0.005, 0.01, 0.02, 0.05]}}
CITATION = "Liu, Dolan-Gavitt, Garg: Fine-Pruning, RAID 2018"


@register("fp", Params, space=SPACE, uses_head=True, citation=CITATION, cost=0.65,
          fast={"acc_ratio": 0.5, "prune_step": 0.1})
def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DefenseConfig,
        ctx: DefenseContext) -> None:
    prm: Params = params_of(cfg)
    point = prune_point(model, ctx.head)
    order = torch.argsort(channel_activations(model, point, x), stable=True)
    mask = attach_mask(point, x.device)
    n_pruned = choose_pruning(model, mask, order, x, y, prm)

    def on_epoch(epoch: int, logs: dict[str, float]) -> bool | None:
        return ctx.on_epoch(epoch, {**logs, "pruned": float(n_pruned)})

    opt, sched = make_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs)
    try:
        fit(model, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=opt,
            scheduler=sched, aug=ctx.aug, generator=ctx.generator, on_epoch=on_epoch,
            resume=ctx.resume, save=ctx.save)
    finally:
        fold_mask(point, mask)
