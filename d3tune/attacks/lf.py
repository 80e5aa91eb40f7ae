"""LF, the low-frequency trigger (Zeng, Park, Mao, Jia, "Rethinking the Backdoor Attacks'
Triggers: A Frequency Perspective", ICCV 2021).

Why: high-frequency triggers (patches, noise) leave artefacts in the spectrum that detectors and
humans catch; a trigger restricted to low frequencies is smooth and hard to see. The paper (and
BackdoorBench's ``lf``) ship a universal adversarial perturbation passed through a low-pass
filter; we cannot ship that file, so the pattern is seeded Gaussian noise through an ideal
radial low-pass filter in the 2-D FFT (frequencies up to ``cutoff`` cycles per image), scaled so
its largest magnitude is ``eps`` on the 0..255 scale, added to the image and clipped to 0..255.
The same pattern poisons the training set and the test set.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from d3tune.attacks import AttackContext, Trigger, register, to_uint8


@dataclass(frozen=True)
class Params:
    # L_inf budget on 0..255. A seeded smooth pattern carries less signal than the paper's
    # adversarial one, so it needs more amplitude: at 24 a 30-epoch digits CNN reached only
    # ASR 0.83 (seed 0), at 32 (12.5 % of the range) it is learned reliably.
    eps: float = field(default=32.0, metadata={"gt": 0.0, "le": 255.0})
    cutoff: float = field(default=3.0, metadata={"gt": 0.0})  # kept frequencies, cycles/image
    pattern_seed: int = 0


def low_frequency_pattern(c: int, h: int, w: int, cutoff: float, eps: float,
                          seed: int) -> torch.Tensor:
    """(C, H, W) float pattern: low-pass filtered noise with max |value| == eps."""
    noise = torch.randn(c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fy = torch.fft.fftfreq(h, d=1.0 / h, dtype=torch.float64)[:, None]  # cycles per image
    fx = torch.fft.fftfreq(w, d=1.0 / w, dtype=torch.float64)[None, :]
    keep = (fy ** 2 + fx ** 2).sqrt() <= cutoff
    keep[0, 0] = False  # no DC term: a brightness shift is not a pattern
    smooth = torch.fft.ifft2(torch.fft.fft2(noise) * keep).real
    return (smooth * (eps / smooth.abs().max().clamp_min(1e-12))).float()


@register("lf", Params)
def make(ctx: AttackContext) -> Trigger:
    c, h, w = ctx.dataset.shape
    p = ctx.params
    pattern = low_frequency_pattern(c, h, w, p.cutoff, p.eps, p.pattern_seed)

    def trigger(x: torch.Tensor) -> torch.Tensor:
        return to_uint8(x.float() + pattern.to(x.device))

    return trigger
