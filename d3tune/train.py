"""The one supervised training loop, on device-resident uint8 tensors with batched augmentation.

Attack training, plain fine-tuning, D3 and the baselines all run through ``fit``: they differ only
in the loss (``loss_fn``), which parameters the optimiser sees, and what happens after a step
(``after_step``, e.g. D3's projection). Keeping one loop keeps shuffling, augmentation and the
LR schedule identical across methods, so comparisons measure the methods, not the plumbing.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Logs may be floats or 0-dim tensors (read once per epoch, so a GPU is not synced every step).
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor],
                  tuple[torch.Tensor, dict[str, float | torch.Tensor]]]


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding, and a horizontal flip where the dataset allows it."""

    pad: int = 4
    hflip: bool = False


# ---------------------------------------------------------------------------------------------
# Device and precision: environment variables because they are properties of the machine, not of
# the experiment. channels_last is on by default (CUDA, and CPU since issue 17: see prepare_model);
# bf16 and compile are opt-in.

AMP_ENV = "D3TUNE_AMP"  # "bf16": bfloat16 autocast of forward passes (default: off)
CHANNELS_LAST_ENV = "D3TUNE_CHANNELS_LAST"  # "auto" (default: on) | "1" | "0" (plain NCHW)
COMPILE_ENV = "D3TUNE_COMPILE"  # "1": torch.compile the model in place (default: off)


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip().lower()


def autocast_dtype() -> torch.dtype | None:
    value = _env(AMP_ENV)
    if value in ("", "0", "off", "none", "fp32", "float32"):
        return None
    if value in ("bf16", "bfloat16"):
        return torch.bfloat16
    raise ValueError(f"{AMP_ENV}={value!r}: expected bf16 or off")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; channels_last unless D3TUNE_CHANNELS_LAST=0 (on CPU too: the digits
    cnn's D3 runs 1.27-1.32x faster with unchanged final metrics; PreActResNet-18's CPU
    training step measured 0.88-0.96x under heavy load, still open: benchmarks/README.md);
    compile in place (state-dict keys unchanged) where D3TUNE_COMPILE=1."""
    model = model.to(device)
    cl = _env(CHANNELS_LAST_ENV, "auto")
    if cl in ("1", "on", "true", "auto"):
        model = model.to(memory_format=torch.channels_last)
    if _env(COMPILE_ENV) in ("1", "on", "true"):
        model.compile()
    return model


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Pad by ``pad`` and cut a random HxW window per sample: one gather, no Python loop."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device, non_blocking=True)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device, non_blocking=True)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device, non_blocking=True)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    x = random_crop(x, aug.pad, generator)
    return random_hflip(x, generator) if aug.hflip else x


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    loss = F.cross_entropy(model(x), y)
    return loss, {"loss": loss.detach()}  # a tensor: fit reads it once per epoch, not per step


def batches(n: int, batch_size: int, generator: torch.Generator | None,
            device: torch.device) -> Iterable[torch.Tensor]:
    """Index batches over n samples, shuffled when a generator is given; the last may be short
    (the reference keeps it: with tiny clean sets dropping it would drop the data)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    order = order.to(device, non_blocking=True)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def make_sgd(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
             epochs: int = 1) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int,
        optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        aug: Augment, generator: torch.Generator, loss_fn: LossFn = cross_entropy,
        after_step: Callable[[], None] | None = None,
        on_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
        resume: dict[str, Any] | None = None,
        save: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Train in place. ``on_epoch(epoch, mean_logs)`` runs after each epoch (1-based); returning
    True stops early (a scheduler such as ASHA said so).

    ``save`` receives the full training state after every epoch (model, optimiser, schedule,
    generator, epoch); passing such a state back as ``resume`` continues bit-identically, which
    is how a restarted Tune trial picks up where it died.
    """
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        start_epoch = int(resume["epoch"])
    amp = autocast_dtype()
    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        totals: dict[str, list[float | torch.Tensor]] = {}
        steps = 0
        for idx in batches(len(x), batch_size, generator, x.device):
            xb = augment(x[idx], aug, generator)
            with autocast(x.device, amp):
                loss, logs = loss_fn(model, xb, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            for k, v in logs.items():  # tensors stay on the device: no sync per step
                totals.setdefault(k, []).append(v)
            steps += 1
        if scheduler is not None:
            scheduler.step()
        if save is not None:
            save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict() if scheduler is not None else {},
                  "generator": generator.get_state()})
        means = {k: sum(float(v) for v in vs) / max(1, steps) for k, vs in totals.items()}
        if on_epoch is not None and on_epoch(epoch, means):
            return


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Predicted labels in eval mode (BatchNorm uses running statistics). Default batch: 1024 on
    a GPU; 128 on a CPU, where it stays in cache and is 10-40 % faster than 1024 with the same
    logits (benchmarks/README.md)."""
    batch_size = batch_size or (1024 if x.device.type == "cuda" else 128)
    was_training = model.training
    model.eval()
    with autocast(x.device, autocast_dtype()):
        out = torch.cat([model(x[i:i + batch_size]).argmax(1)
                         for i in range(0, len(x), batch_size)]) \
            if len(x) else torch.empty(0, dtype=torch.int64, device=x.device)
    model.train(was_training)
    return out
