"""Members of one setting trained side by side as one batched computation (torch.func).

A robust search evaluates one setting on many members (attack x seed). They share the
architecture, the shapes and the hyperparameters; only the weights, the clean subset and the
random draws differ. A small model on a small batch leaves most of the hardware idle, so the
members' steps are stacked: ``stack`` turns M models into one set of [M, ...] parameters
and buffers, and ``vmap`` over ``functional_call`` runs their forward passes as one
computation (a convolution becomes a grouped one), as HFTA (Wang et al., MLSys 2021) fuses models.

What keeps each member's training what it would be alone, step for step:
- every member keeps its own generator, drawn in the order ``train.fit`` draws (its shuffle,
  then each batch's augmentation), so it sees the batches it would have seen alone;
- BatchNorm running statistics are stacked buffers, updated per member inside ``vmap``;
- the loss is the *sum* of the members' losses, so each member's gradient is its own (a mean
  would scale it by 1/M);
- SGD, momentum, weight decay and the cosine schedule act element-wise, and nothing takes a
  norm across members (per-member norms, e.g. D3's projection, reduce over each member's own
  dimensions).
Figures agree with sequential training to float tolerance, not bit for bit: a grouped
convolution sums in another order (tests/test_batched.py checks weights and BatchNorm
statistics after a few steps).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from d3tune.train import Augment, augment, autocast, autocast_dtype, batches

# (logits [M, B, K], labels [M, B]) -> (per-member loss [M], logs as 0-dim tensors)
BatchedLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Stacked:
    """M models of one architecture as one: stacked parameters (leaves the optimiser steps) and
    buffers, and a parameter-free copy of the module that ``functional_call`` runs."""

    base: nn.Module
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, B, ...] -> logits [M, B, K]: member m's batch through member m's weights."""
        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor):
            return functional_call(self.base, (p, b), (xb,))
        return vmap(one)(self.params, self.buffers, x)

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Each member's trained weights and statistics into its own module."""
        with torch.no_grad():
            for m, model in enumerate(models):
                model.load_state_dict({**{k: v[m] for k, v in self.params.items()},
                                       **{k: v[m] for k, v in self.buffers.items()}})


def stack(models: Sequence[nn.Module]) -> Stacked:
    """Stack models that share an architecture (raises ValueError when they do not)."""
    if not models:
        raise ValueError("no models to stack")
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError("members differ in architecture or shapes: they cannot be stacked")
    # plain contiguous stacks: a channels_last member would hand vmap strided slices, which
    # some kernels (adaptive average pooling) only batch through a slow per-member fallback
    named = [dict(m.named_parameters()) for m in models]
    params = {k: torch.stack([p[k].detach() for p in named]).contiguous().requires_grad_()
              for k in named[0]}
    bufs = [dict(m.named_buffers()) for m in models]
    buffers = {k: torch.stack([b[k] for b in bufs]).contiguous() for k in bufs[0]}
    base = copy.deepcopy(models[0]).to("meta")
    return Stacked(base, params, buffers)


def member_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy over its batch: [M]."""
    m = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(m, -1).mean(1)


def plain_loss(logits: torch.Tensor, y: torch.Tensor):
    loss = member_cross_entropy(logits, y)
    return loss, {"loss": loss.detach().mean()}


def fit_batched(net: Stacked, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *,
                epochs: int, batch_size: int, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None, aug: Augment,
                generators: Sequence[torch.Generator], loss_fn: BatchedLoss = plain_loss,
                after_step: Callable[[], None] | None = None,
                on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> None:
    """``train.fit`` for M members at once (same epochs, batch size and schedule; each member
    its own data and generator). ``on_epoch(epoch, logs)`` sees the members' mean logs."""
    if not (len(xs) == len(ys) == len(generators) == net.size):
        raise ValueError(f"{net.size} stacked members, {len(xs)} clean sets, "
                         f"{len(generators)} generators")
    if len({len(x) for x in xs}) != 1:  # lockstep needs the same batches for every member
        raise ValueError("members' clean sets differ in size: they cannot train in lockstep")
    n, device, amp = len(xs[0]), xs[0].device, autocast_dtype()
    for epoch in range(1, epochs + 1):
        net.train()
        totals: dict[str, list[torch.Tensor]] = {}
        steps = 0
        # in train.fit's order per member: its shuffle now, then each batch's augmentation
        orders = [batches(n, batch_size, g, device) for g in generators]
        for idxs in zip(*orders):
            xb = torch.stack([augment(x[i], aug, g) for x, i, g in zip(xs, idxs, generators)])
            yb = torch.stack([y[i] for y, i in zip(ys, idxs)])
            with autocast(device, amp):
                per_member, logs = loss_fn(net.forward(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            per_member.sum().backward()  # a sum: each member's gradient stays its own
            optimizer.step()
            if after_step is not None:
                after_step()
            for k, v in logs.items():
                totals.setdefault(k, []).append(v)
            steps += 1
        if scheduler is not None:
            scheduler.step()
        if on_epoch is not None:
            on_epoch(epoch, {k: sum(float(v) for v in vs) / max(1, steps)
                             for k, vs in totals.items()})


def member_norms(ws: torch.Tensor, p: float) -> torch.Tensor:
    """||W_m||_p of each member's slice of a stacked [M, ...] tensor: [M]."""
    return torch.linalg.vector_norm(ws.flatten(1), ord=p, dim=1)
