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
        """A fixed class-stratified subset of at most n images of each set (cheap per-epoch
        evaluation): clean images stratified by label, poisoned ones by true label, so every
        class keeps its share and a few classes cannot swing the per-epoch ACC/ASR."""
        if n >= len(self.y_clean) and n >= len(self.y_bd_true):
            return self
        c = stratified_indices(self.y_clean, n, generator).to(self.x_clean.device)
        b = stratified_indices(self.y_bd_true, n, generator).to(self.x_bd.device)
        return EvalSets(self.x_clean[c], self.y_clean[c], self.x_bd[b], self.y_bd_target[b],
                        self.y_bd_true[b])


def stratified_indices(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``n`` indices into ``labels`` (sorted), each class getting its proportional share
    (largest remainder, so the total is exactly min(n, len)); which images of a class are taken
    is random under ``generator``. A uniform sample of 256 can miss a tenth of a 10-class set's
    share of one class by chance; this cannot."""
    size = len(labels)
    if n >= size:
        return torch.arange(size)
    y = labels.cpu()
    order = torch.randperm(size, generator=generator)
    order = order[torch.sort(y[order], stable=True).indices]  # by class, random within a class
    classes, counts = torch.unique(y, return_counts=True)
    quota = counts.double() * n / size
    take = quota.floor().long()
    short = n - int(take.sum())
    if short:  # largest remainders first; ties broken by class order (deterministic)
        rem = quota - take.double()
        take[torch.sort(rem, descending=True, stable=True).indices[:short]] += 1
    starts = torch.cumsum(counts, 0) - counts
    picked = [order[s:s + k] for s, k in zip(starts.tolist(), take.tolist())]
    return torch.sort(torch.cat(picked)).values


def evaluate(model: nn.Module, sets: EvalSets) -> dict[str, float]:
    """ACC on clean images; ASR (target label) and RA (true label) on triggered images."""
    bd = predict(model, sets.x_bd)
    return {"acc": accuracy(predict(model, sets.x_clean), sets.y_clean),
            "asr": accuracy(bd, sets.y_bd_target),
            "ra": accuracy(bd, sets.y_bd_true)}
