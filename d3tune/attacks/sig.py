"""SIG (Barni, Kallas, Tondi, "A new backdoor attack in CNNs by training set corruption without
label poisoning", ICIP 2019): a clean-label attack with a horizontal sinusoidal signal.

Only target-class training images get the signal and they keep their labels, so the training
labels are all correct; the model learns "sinusoid => target" because the signal is the easiest
feature shared by those images. At test time every non-target image gets the signal.
The signal is ``delta * sin(2 pi j f / W)`` over column j, the same for every row and channel
(BackdoorBench: delta 20 on the 0..255 scale, f = 6), added and clipped to 0..255.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from d3tune.attacks import AttackContext, Trigger, register, to_uint8


@dataclass(frozen=True)
class Params:
    delta: float = field(default=20.0, metadata={"gt": 0.0, "le": 255.0})  # amplitude, 0..255
    frequency: float = field(default=6.0, metadata={"gt": 0.0})  # periods across the width


@register("sig", Params, clean_label=True, all2all=False)
def make(ctx: AttackContext) -> Trigger:
    _, _, w = ctx.dataset.shape
    cols = torch.arange(w, dtype=torch.float32)
    signal = ctx.params.delta * torch.sin(2 * math.pi * cols * ctx.params.frequency / w)

    def trigger(x: torch.Tensor) -> torch.Tensor:
        return to_uint8(x.float() + signal.to(x.device))  # broadcasts over N, C, H

    return trigger
