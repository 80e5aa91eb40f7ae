"""ACC, ASR, RA and DER as BackdoorBench and the D3 paper define them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from d3tune.train import predict


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean().item()) if len(labels) else float("nan")


def der(acc_before: float, asr_before: float, acc_after: float, asr_after: float) -> float:
    """Defense effectiveness rating in [0, 1]: ASR removed, minus accuracy lost, rescaled."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


@dataclass(frozen=True)
class EvalSets:
    """The clean test set and the poisoned test set (non-target images with the trigger)."""

    x_clean: torch.Tensor
    y_clean: torch.Tensor
    x_bd: torch.Tensor
    y_bd_target: torch.Tensor
    y_bd_true: torch.Tensor

    def subset(self, n: int, generator: torch.Generator) -> "EvalSets":
        """A fixed random subset of at most n images of each set (cheap per-epoch evaluation)."""
        def pick(size: int) -> torch.Tensor:
            return torch.randperm(size, generator=generator)[: min(n, size)].to(self.x_clean.device)
        c, b = pick(len(self.y_clean)), pick(len(self.y_bd_true))
        return EvalSets(self.x_clean[c], self.y_clean[c], self.x_bd[b], self.y_bd_target[b],
                        self.y_bd_true[b])


def evaluate(model: nn.Module, sets: EvalSets) -> dict[str, float]:
    """ACC on clean images; ASR (target label) and RA (true label) on triggered images."""
    bd = predict(model, sets.x_bd)
    return {"acc": accuracy(predict(model, sets.x_clean), sets.y_clean),
            "asr": accuracy(bd, sets.y_bd_target),
            "ra": accuracy(bd, sets.y_bd_true)}
