"""SAU, Shared Adversarial Unlearning (Wei et al., NeurIPS 2023), BackdoorBench's defaults.

Why it can work: triggered inputs are adversarial examples that the backdoored model and the
purified model would *share* (same wrong label). SAU bounds the backdoor risk by the shared
adversarial risk, so it crafts shared adversarial examples against the model being purified and
a frozen copy of the backdoored one, and unlearns them: the purified model must not agree with
the backdoored model's wrong label on them, while staying accurate on clean data.

What this does, per epoch (BackdoorBench's ``n_rounds`` = its ``epochs`` = 100), per batch:
1. Shared PGD in [0, 1] pixel space, L_inf ball ``eps`` = 0.2, ``adv_steps`` = 5 signed steps
   of ``adv_lr`` = 0.2 from ``pgd_init`` = "max" (every pixel +eps):
       beta_1 * L_adv + beta_2 * L_share  (0.01, 1)
   L_adv = -(CE of the samples not yet attacked, for each model) / 2n, L_share = Jensen-Shannon
   divergence between the two models' predictions on samples not yet shared-adversarial;
   stops early once all samples are shared. (x + delta is not clipped to [0, 1], as in the
   reference: "not necessary for backdoor defense".)
2. ``outer_steps`` (1) Adam steps (``adam_lr`` = 1e-4, the reference optimiser) on
       lmd_1 * CE(f(x), y) + lmd_2 * CE(f(x + delta), y) + lmd_3 * L_sar   (1, 0, 1)
   L_sar = on samples where the frozen model is fooled (wrong and changed), the pushed-apart
   log-probabilities  -(log(1 - p_adv) + log(1 - p_adv))/2  of the frozen model's adversarial
   label, computed the reference's two numerically different ways and averaged.
Both models stay in eval mode (BatchNorm statistics fixed), as the reference's default.
The common ``lr`` is not used (Adam at ``adam_lr``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d3tune.defenses import DefenseConfig, DefenseContext, params_of, register
from d3tune.train import augment, batches

PGD_INITS = ("zero", "random", "max", "min")


@dataclass(frozen=True)
class Params:
    adam_lr: float = field(default=1e-4, metadata={"gt": 0.0})
    eps: float = field(default=0.2, metadata={"gt": 0.0})  # L_inf bound (trigger_norm)
    adv_lr: float = field(default=0.2, metadata={"gt": 0.0})
    adv_steps: int = field(default=5, metadata={"ge": 1})
    pgd_init: str = field(default="max", metadata={"choices": PGD_INITS})
    beta_1: float = field(default=0.01, metadata={"ge": 0.0})  # adversarial loss in PGD
    beta_2: float = field(default=1.0, metadata={"ge": 0.0})  # shared loss in PGD
    lmd_1: float = field(default=1.0, metadata={"ge": 0.0})  # clean CE
    lmd_2: float = field(default=0.0, metadata={"ge": 0.0})  # adversarial CE (plain AT)
    lmd_3: float = field(default=1.0, metadata={"ge": 0.0})  # shared adversarial risk
    outer_steps: int = field(default=1, metadata={"ge": 1})


def _init(x: torch.Tensor, prm: Params, generator: torch.Generator) -> torch.Tensor:
    if prm.pgd_init == "zero":
        d = torch.zeros_like(x)
    elif prm.pgd_init == "random":
        d = torch.rand(x.shape, generator=generator).to(x)
    elif prm.pgd_init == "max":
        d = torch.full_like(x, prm.eps)
    else:
        d = torch.full_like(x, -prm.eps)
    return d.clamp(-prm.eps, prm.eps)


def shared_pgd(model: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor, prm: Params,
               generator: torch.Generator) -> torch.Tensor:
    """Step 1: the perturbation (|delta| <= eps) of x (floats in [0, 1])."""
    with torch.no_grad():
        own = model(x).argmax(1)
        own_ref = ref(x).argmax(1)
    delta = _init(x, prm, generator)
    n = len(x)
    for _ in range(prm.adv_steps):
        delta.requires_grad_(True)
        logits, logits_ref = model(x + delta), ref(x + delta)
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        hit, hit_ref = pred != own, pred_ref != own_ref
        shared = hit & hit_ref & (pred == pred_ref)
        ce = F.cross_entropy(logits, y, reduction="none")
        ce_ref = F.cross_entropy(logits_ref, y, reduction="none")
        loss_adv = -((ce * ~hit).sum() + (ce_ref * ~hit_ref).sum()) / 2 / n
        p = F.softmax(logits, 1).clamp(min=1e-8)
        p_ref = F.softmax(logits_ref, 1).clamp(min=1e-8)
        mix = 0.5 * (p + p_ref)
        js = 0.5 * (p * p.log() + p_ref * p_ref.log()) - 0.5 * (p * mix.log() + p_ref * mix.log())
        loss_share = (js.sum(1) * ~shared).sum() / n
        loss = prm.beta_1 * loss_adv + prm.beta_2 * loss_share
        grad = torch.autograd.grad(loss, delta)[0]
        with torch.no_grad():
            delta = (delta - prm.adv_lr * grad.sign()).clamp(-prm.eps, prm.eps)
        if bool(shared.all()):
            break
    return delta.detach()


def sau_loss(model: nn.Module, ref: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
             y: torch.Tensor, prm: Params):
    """Step 2's loss and its terms."""
    n = len(x)
    logits, logits_adv = model(torch.cat([x, x_adv])).split(n)
    with torch.no_grad():
        own_ref = ref(x).argmax(1)
        pred_ref = ref(x_adv).argmax(1)
    loss_cl = F.cross_entropy(logits, y)
    loss_at = F.cross_entropy(logits_adv, y)
    fooled = (pred_ref != y) & (pred_ref != own_ref)
    if bool(fooled.any()):
        one_hot = F.one_hot(pred_ref, logits.shape[1]).to(logits.dtype)
        p = F.softmax(logits_adv, 1)
        pos = (p * one_hot).sum(1)[fooled]
        neg = (p * (1 - one_hot)).sum(1)[fooled]
        loss_sar = (-torch.log(1e-6 + neg.clamp(max=0.999)).sum()
                    - torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()) / 2 / n
    else:
        loss_sar = torch.zeros((), device=x.device)
    loss = prm.lmd_1 * loss_cl + prm.lmd_2 * loss_at + prm.lmd_3 * loss_sar
    return loss, {"loss": loss.item(), "loss_clean": loss_cl.item(), "loss_adv": loss_at.item(),
                  "loss_shared": loss_sar.item(), "fooled": float(fooled.float().mean())}


# its own optimiser
SPACE = {"defense.adam_lr": {"loguniform": [0.00002, 0.001]},
         "defense.eps": {"uniform": [0.05, 0.4]},
         "defense.adv_steps": {"int": [3, 8]},
         "defense.lmd_3": {"uniform": [0.5, 2.0]},
         "defense.epochs": {"int": [20, 60]}}
CITATION = "Wei et al.: Shared Adversarial Unlearning, NeurIPS 2023"


@register("sau", Params, space=SPACE, citation=CITATION, cost=4.5,
          fast={"adv_steps": 2})
def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DefenseConfig,
        ctx: DefenseContext) -> None:
    prm: Params = params_of(cfg)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=prm.adam_lr)
    model.eval()
    for epoch in range(1, cfg.epochs + 1):
        totals: dict[str, float] = {}
        steps = 0
        for idx in batches(len(x), cfg.batch_size, ctx.generator, x.device):
            xb = augment(x[idx], ctx.aug, ctx.generator).float() / 255
            yb = y[idx]
            delta = shared_pgd(model, ref, xb, yb, prm, ctx.generator)
            for _ in range(prm.outer_steps):
                loss, logs = sau_loss(model, ref, xb, xb + delta, yb, prm)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + v
            steps += 1
        if ctx.on_epoch(epoch, {k: v / max(1, steps) for k, v in totals.items()}):
            return
