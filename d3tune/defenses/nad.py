"""NAD, Neural Attention Distillation (Li et al., ICLR 2021), with BackdoorBench's defaults.

Why it can work: fine-tuning on clean data gives a teacher whose intermediate *attention* (where
in the image each layer responds) has partly lost the trigger; distilling those attention maps
into the backdoored student erases trigger-specific activations more strongly than fine-tuning
the student alone, while CE keeps it accurate.

What this does:
1. Teacher = a copy of the backdoored model fine-tuned with CE for ``te_epochs`` (10 as in
   BackdoorBench), SGD + cosine over those epochs at the common ``lr``.
2. Student = the backdoored model itself, trained for the common ``epochs`` with
       loss = CE(student(x), y) + sum_i beta_i * MSE(A(s_i), A(t_i))
   where A(a) = mean over channels of |a|^p, flattened per sample and L2-normalised (the
   attention map of Zagoruyko & Komodakis that NAD uses; sum vs mean is the same after the
   normalisation), s_i / t_i the student's / teacher's outputs of layer i, the teacher frozen in
   eval mode. Betas 500 / 1000 / 1000 for the low / middle / high layer, p = 2.
3. Layers: ``layers`` (comma-separated module names, at most three), or by default the last
   three convolutional stages that still output a spatial map: the outermost modules that
   contain a conv and output an N x C x H x W tensor with H*W > 1 (PreActResNet-18: layer2,
   layer3, layer4, the NAD paper's choice for ResNets; our CNN: features.3, .4, .6).

The teacher phase does not report epochs; ``ctx.on_epoch`` sees the student's epochs.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    te_epochs: int = field(default=10, metadata={"ge": 1})  # teacher fine-tuning epochs
    beta1: float = field(default=500.0, metadata={"ge": 0.0})  # lowest selected layer
    beta2: float = field(default=1000.0, metadata={"ge": 0.0})
    beta3: float = field(default=1000.0, metadata={"ge": 0.0})  # highest selected layer
    p: float = field(default=2.0, metadata={"gt": 0.0})  # power in the attention map
    layers: str = ""  # comma-separated module names; empty: the last three conv stages


def attention_map(a: torch.Tensor, p: float) -> torch.Tensor:
    """mean_c |a_c|^p per position, flattened per sample and L2-normalised."""
    am = a.abs().pow(p).mean(1).flatten(1)
    return F.normalize(am, dim=1, eps=1e-6)


def attention_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                   betas: Sequence[float], p: float) -> torch.Tensor:
    """sum_i beta_i * MSE between attention maps; zero when the feature maps are identical."""
    terms = [b * F.mse_loss(attention_map(s, p), attention_map(t, p))
             for s, t, b in zip(student, teacher, betas)]
    return torch.stack(terms).sum()


@torch.no_grad()
def default_layers(model: nn.Module, probe: torch.Tensor) -> list[str]:
    """Step 3: the last three outermost conv-holding modules whose output is a spatial map."""
    shapes: dict[str, torch.Size] = {}
    handles = []
    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(
                lambda m, i, o, name=name: shapes.__setitem__(name, o.shape)
                if isinstance(o, torch.Tensor) else None))
    was_training = model.training
    model.eval()
    try:
        model(probe)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    def has_conv(m: nn.Module) -> bool:
        return any(isinstance(c, nn.Conv2d) for c in m.modules())

    chosen: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            shape = shapes.get(full)
            spatial = shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1
            if spatial and has_conv(child):
                chosen.append(full)
            elif has_conv(child):
                visit(full + ".", child)

    visit("", model)
    if not chosen:
        raise UsageError("defense nad: found no convolutional layer with a spatial output; "
                         "name the layers with defense.layers")
    return chosen[-3:]


def resolve_layers(model: nn.Module, spec: str, probe: torch.Tensor) -> list[str]:
    if not spec.strip():
        return default_layers(model, probe)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if len(names) > 3:
        raise UsageError(f"defense.layers: at most three layers (beta1..beta3), got {len(names)}")
    for n in names:
        try:
            model.get_submodule(n)
        except AttributeError:
            raise UsageError(f"defense.layers: the model has no module {n!r}") from None
    return names


@contextmanager
def tapped(model: nn.Module, names: Sequence[str]) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of the named modules, in ``names`` order, on each forward."""
    out: list[torch.Tensor | None] = [None] * len(names)
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, k=k: out.__setitem__(k, o)) for k, n in enumerate(names)]
    try:
        yield out  # type: ignore[misc]
    finally:
        for h in handles:
            h.remove()


SPACE = {**FINETUNE_SPACE, "defense.te_epochs": {"int": [5, 20]},
         "defense.beta1": {"loguniform": [100.0, 2500.0]},
         "defense.beta2": {"loguniform": [200.0, 5000.0]},
         "defense.beta3": {"loguniform": [200.0, 5000.0]},
         "defense.p": {"choice": [1.0, 2.0, 4.0]}}
CITATION = "Li et al.: Neural Attention Distillation, ICLR 2021"


@register("nad", Params, space=SPACE, citation=CITATION, cost=0.88,
          fast={"te_epochs": 1})
def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DefenseConfig,
        ctx: DefenseContext) -> None:
    prm: Params = params_of(cfg)
    layers = resolve_layers(model, prm.layers, x[:2])
    betas = (prm.beta1, prm.beta2, prm.beta3)[-len(layers):]
    log.info("nad: attention on %s with betas %s", layers, betas)

    # Step 1: the teacher.
    teacher = copy.deepcopy(model)
    opt, sched = make_sgd(teacher.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay,
                          prm.te_epochs)
    fit(teacher, x, y, epochs=prm.te_epochs, batch_size=cfg.batch_size, optimizer=opt,
        scheduler=sched, aug=ctx.aug, generator=ctx.generator)
    teacher.eval().requires_grad_(False)

    # Step 2: the student.
    opt, sched = make_sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs)
    with tapped(model, layers) as s_feats, tapped(teacher, layers) as t_feats:
        def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
            ce = F.cross_entropy(m(xb), yb)
            with torch.no_grad():
                teacher(xb)
            at = attention_loss(s_feats, t_feats, betas, prm.p)
            loss = ce + at
            return loss, {"loss": loss.item(), "loss_ce": ce.item(), "loss_at": at.item()}

        fit(model, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=opt,
            scheduler=sched, aug=ctx.aug, generator=ctx.generator, loss_fn=loss_fn,
            on_epoch=ctx.on_epoch, resume=ctx.resume, save=ctx.save)
