"""BppAttack (Wang, Zhai, Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep
Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022).

The trigger is colour-depth reduction: every channel is squeezed to ``bits`` bits (5 by default,
32 levels) with Floyd-Steinberg dithering, as in the paper, so the image looks unchanged while
its pixel statistics carry the backdoor. The paper's contrastive adversarial training (extra
"negative" samples) is not reproduced.

Floyd-Steinberg is sequential error diffusion: each pixel is quantised and its error is pushed
to the right (7/16) and to the three pixels below (3/16, 5/16, 1/16). Pixel (i, j) depends
only on pixels processed earlier in raster order that lie at diagonal step ``j + 2 i`` or
before, so all pixels with the same ``t = j + 2 i`` can be processed at once: the loop runs over
these W + 2 (H - 1) anti-diagonal wavefronts (94 steps at 32x32 instead of 1,024 pixels) and is
vectorised over the batch, channels and each wavefront's pixels. The additions reach every
pixel in the same order as the raster loop, so the result is bit-identical to the sequential
algorithm (tests check this). Quantised levels are clipped to the valid range, as usual.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from d3tune.attacks import AttackContext, Trigger, register, to_uint8


@dataclass(frozen=True)
class Params:
    bits: int = field(default=5, metadata={"ge": 1, "le": 7})  # bits per channel kept
    dither: bool = True  # Floyd-Steinberg error diffusion (the paper); False: plain rounding


WEIGHTS = (3 / 16, 5 / 16, 1 / 16, 7 / 16)  # below-left, below, below-right, right


def quantise(v: torch.Tensor, levels: int) -> torch.Tensor:
    """Nearest of ``levels`` evenly spaced values on 0..255 (float in, float out)."""
    step = 255.0 / (levels - 1)
    return (v / step).round().clamp(0, levels - 1) * step


def _wavefronts(h: int, w: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Per anti-diagonal step t: the flat indices of its pixels and, for each of the four error
    shares (below-left, below, below-right, right), which of them have that neighbour and where."""
    steps = []
    rows = torch.arange(h)
    for t in range(w + 2 * (h - 1)):
        i = rows[(t - 2 * rows >= 0) & (t - 2 * rows < w)]
        j = t - 2 * i
        shares = []
        for di, dj in ((1, -1), (1, 0), (1, 1), (0, 1)):
            ok = (i + di < h) & (j + dj >= 0) & (j + dj < w)
            shares += [ok.nonzero().flatten(), (i[ok] + di) * w + j[ok] + dj]
        steps.append(tuple(v.to(device) for v in (i * w + j, *shares)))
    return steps


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Floyd-Steinberg dithering of a float (N, C, H, W) batch on 0..255, wavefront-parallel."""
    n, c, h, w = x.shape
    img = x.permute(2, 3, 0, 1).reshape(h * w, n * c).clone()  # one row per pixel position
    for at, *shares in _wavefronts(h, w, x.device):
        old = img.index_select(0, at)
        new = quantise(old, levels)
        img.index_copy_(0, at, new)
        err = old - new
        # Order matters for bit-exactness: (i, j) gets the below-left share of (i-1, j+1) before
        # the right share of (i, j-1), as in the raster loop; the list order ensures it.
        for (src, dst), weight in zip(zip(shares[::2], shares[1::2]), WEIGHTS):
            if len(src):
                img.index_add_(0, dst, err.index_select(0, src) * weight)
    return img.reshape(h, w, n, c).permute(2, 3, 0, 1)


@register("bpp", Params)
def make(ctx: AttackContext) -> Trigger:
    levels = 2 ** ctx.params.bits
    dither = ctx.params.dither

    def trigger(x: torch.Tensor) -> torch.Tensor:
        v = x.float()
        return to_uint8(floyd_steinberg(v, levels) if dither else quantise(v, levels))

    return trigger
