"""ANP, Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), with the reference defaults.

Why it can work: backdoor neurons are the ones whose small multiplicative perturbation makes the
clean loss jump (the network is "sensitive" along them). ANP learns a soft mask m in [0, 1] per
neuron that keeps the clean loss low even under a worst-case neuron perturbation; neurons whose
mask is driven towards 0 are the sensitive ones, and pruning them removes the backdoor.

What this does (the authors' ``optimize_mask_cifar.py`` / ``prune_neuron_cifar.py``, as in
BackdoorBench):
1. Neurons = the channels of every affine BatchNorm layer. Their output y = x_hat*gamma + beta
   is rewritten by a forward hook (the architecture and state_dict stay untouched) as
       (y - beta) * (m + d_w) + beta * (1 + d_b)   perturbed,   (y - beta) * m   otherwise,
   i.e. gamma * (m + d_w) and beta * (1 + d_b), exactly the reference's NoisyBatchNorm2d.
2. For ``nb_iter`` (2000) clean batches, model in train mode, weights frozen:
   a. d_w, d_b ~ U(-eps, eps); ``steps`` (1) signed-gradient ascent steps of size eps/steps on
      CE (eps = 0.4). As in the authors' code (not the paper's constraint), the ascent is not
      projected back, so the noise can reach 2 * eps;
   b. one SGD step (lr ``mask_lr`` 0.2, momentum 0.9) on m for
      alpha * CE(clean) + (1 - alpha) * CE(perturbed), alpha = 0.2; clip m to [0, 1].
3. Prune: restore the original weights and BatchNorm statistics, set gamma = 0 for every neuron
   with m < ``threshold`` (0.2; the reference's "pruning_by threshold"). BackdoorBench instead
   picks the threshold with the lowest *test-set* ASR, which a defender cannot do.

``nb_iter`` is spread evenly over the common ``epochs``; after each epoch the model is put in its
pruned state (step 3 with the current masks) and reported, so an early stop leaves a pruned
model. The common ``lr`` is not used (ANP trains no weights; ``mask_lr`` is its step size).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from d3tune.defenses import DefenseConfig, DefenseContext, params_of, register
from d3tune.errors import UsageError
from d3tune.train import augment, batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    eps: float = field(default=0.4, metadata={"ge": 0.0})  # neuron perturbation bound (anp_eps)
    steps: int = field(default=1, metadata={"ge": 1})  # perturbation ascent steps (anp_steps)
    alpha: float = field(default=0.2, metadata={"ge": 0.0, "le": 1.0})  # weight of the clean loss
    mask_lr: float = field(default=0.2, metadata={"gt": 0.0})
    nb_iter: int = field(default=2000, metadata={"ge": 1})  # mask optimisation steps in all
    threshold: float = field(default=0.2, metadata={"ge": 0.0, "le": 1.0})  # prune where m < it


class NeuronMasks:
    """Step 1: masks and perturbations on every affine BatchNorm, applied by forward hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.affine]
        if not self.layers:
            raise UsageError("defense anp: the model has no BatchNorm layer to put masks on")
        dev = self.layers[0].weight.device
        self.masks = [torch.ones(m.num_features, device=dev, requires_grad=True)
                      for m in self.layers]
        self.noise_w = [torch.zeros(m.num_features, device=dev, requires_grad=True)
                        for m in self.layers]
        self.noise_b = [torch.zeros(m.num_features, device=dev, requires_grad=True)
                        for m in self.layers]
        self.perturbed = False
        self.active = True
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module: nn.Module, inp, out: torch.Tensor) -> torch.Tensor | None:
            if not self.active:
                return None
            shape = (1, -1) + (1,) * (out.dim() - 2)
            beta = module.bias.view(shape)
            coeff_w = self.masks[i] + self.noise_w[i] if self.perturbed else self.masks[i]
            scaled = (out - beta) * coeff_w.view(shape)
            if self.perturbed:
                return scaled + beta * (1.0 + self.noise_b[i]).view(shape)
            return scaled + beta
        return hook

    @property
    def noises(self) -> list[torch.Tensor]:
        return self.noise_w + self.noise_b

    @torch.no_grad()
    def reset_noise(self, eps: float, generator: torch.Generator) -> None:
        for n in self.noises:
            n.copy_((torch.rand(n.shape, generator=generator) * 2 - 1).mul_(eps).to(n))

    def pruned(self, threshold: float) -> list[torch.Tensor]:
        """Boolean per layer: the neurons to prune."""
        return [m.detach() < threshold for m in self.masks]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def mask_step(model: nn.Module, masks: NeuronMasks, opt: torch.optim.Optimizer, xb: torch.Tensor,
              yb: torch.Tensor, prm: Params, generator: torch.Generator) -> dict[str, float]:
    """Step 2 for one batch: worst-case neuron noise, then one mask update, masks kept in [0, 1]."""
    loss_rob = torch.zeros((), device=xb.device)
    if prm.eps > 0:
        masks.reset_noise(prm.eps, generator)
        masks.perturbed = True
        for _ in range(prm.steps):
            grads = torch.autograd.grad(F.cross_entropy(model(xb), yb), masks.noises)
            with torch.no_grad():
                for n, g in zip(masks.noises, grads):
                    n.add_(g.sign(), alpha=prm.eps / prm.steps)
        loss_rob = F.cross_entropy(model(xb), yb)
    masks.perturbed = False
    loss_nat = F.cross_entropy(model(xb), yb)
    loss = prm.alpha * loss_nat + (1 - prm.alpha) * loss_rob
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=masks.masks)
    opt.step()
    with torch.no_grad():
        for m in masks.masks:
            m.clamp_(0.0, 1.0)
    return {"loss": loss.item(), "loss_nat": loss_nat.item(), "loss_rob": loss_rob.item()}


@torch.no_grad()
def apply_pruning(model: nn.Module, original: dict[str, torch.Tensor], masks: NeuronMasks,
                  threshold: float) -> int:
    """Step 3: original weights and statistics, gamma = 0 on the pruned neurons; returns count."""
    model.load_state_dict(original)
    count = 0
    for layer, prune in zip(masks.layers, masks.pruned(threshold)):
        layer.weight[prune] = 0.0
        count += int(prune.sum())
    return count


SPACE = {"defense.eps": {"uniform": [0.1, 0.6]},
         "defense.alpha": {"uniform": [0.0, 0.5]},
         "defense.mask_lr": {"loguniform": [0.05, 0.5]},
         "defense.threshold": {"uniform": [0.05, 0.5]}}
CITATION = "Wu, Wang: Adversarial Neuron Pruning Purifies Backdoored Deep Models, NeurIPS 2021"


@register("anp", Params, space=SPACE, citation=CITATION, cost=10.4,
          fast={"nb_iter": 6})
def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DefenseConfig,
        ctx: DefenseContext) -> None:
    prm: Params = params_of(cfg)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    masks = NeuronMasks(model)
    opt = torch.optim.SGD(masks.masks, lr=prm.mask_lr, momentum=0.9)
    total = sum(m.numel() for m in masks.masks)

    def stream():
        while True:
            for idx in batches(len(x), cfg.batch_size, ctx.generator, x.device):
                yield augment(x[idx], ctx.aug, ctx.generator), y[idx]

    data = stream()
    done = 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            target = prm.nb_iter * epoch // cfg.epochs
            model.load_state_dict(original)  # undo the previous report's pruning
            masks.active = True
            model.train()
            totals: dict[str, float] = {}
            steps = 0
            while done < target:
                xb, yb = next(data)
                for k, v in mask_step(model, masks, opt, xb, yb, prm, ctx.generator).items():
                    totals[k] = totals.get(k, 0.0) + v
                done += 1
                steps += 1
            masks.active = False
            n_pruned = apply_pruning(model, original, masks, prm.threshold)
            logs = {k: v / max(1, steps) for k, v in totals.items()}
            logs.update(pruned=float(n_pruned),
                        mask_mean=float(torch.cat([m.detach() for m in masks.masks]).mean()))
            if ctx.on_epoch(epoch, logs):
                break
        log.info("anp: pruned %d of %d BatchNorm neurons (threshold %.2f)", n_pruned, total,
                 prm.threshold)
    finally:
        masks.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
