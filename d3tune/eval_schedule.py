"""Which defense epochs a trial evaluates.

Why a schedule: scoring a model after every epoch can cost more than the defense itself. On a
BackdoorBench PreActResNet-18 record (5 % clean data, batch 256, 100 epochs, 2 CPU cores) one
D3 epoch is ~1 s of training on 67 images, while one evaluation on the 256-image subsets is
~3 s: per-epoch evaluation was 72 % of the trial. Only three kinds of epoch matter for results:
the scheduler's decision points (ASHA's rungs), the epoch a trial is stopped at, and the last
one. The others only draw curves, and a curve needs a few points, not a hundred.

So by default (``eval.every`` unset) a trial evaluates the first epoch, then every k-th, k the
smallest interval that keeps periodic evaluation within ``eval.share`` of training, and always
the rung epochs and the last (on the full sets). k comes from a cost model, not from timings,
so a trial's curve is as reproducible as its metrics: training an image costs about three
forward passes (forward and backward), evaluating one costs one, on the same model, so an
epoch on ``n`` clean images costs ``3 n`` and one evaluation costs the images it scores. That
gives k = 15 on the record above (measured costs: 2.8 s / 1.08 s per epoch, also k = 15), 7 on
the digits CNN (10 % clean data; measured 6) and 1, a full curve, on Fashion-MNIST's 1,000
clean images. Defenses that cost more per step than plain fine-tuning (FT-SAM, SAU) get
fewer points than their share allows, never more evaluation. ``eval.every: N`` fixes k = N.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

# Periodic evaluation's target share of training time when ``eval.every`` is unset. Why 0.15:
# with the always-evaluated first, rung and last epochs and the "before" evaluation on top, a
# trial then spends about 15-20 % of its time evaluating.
DEFAULT_EVAL_SHARE = 0.15

# Forward-pass equivalents of training on one image (forward, backward ~ 2 forwards) against
# evaluating one (a forward pass).
TRAIN_COST_PER_IMAGE = 3.0


def auto_interval(train_cost: float, eval_cost: float, share: float) -> int:
    """The smallest k with eval / (k * train + eval) <= share: evaluating once every k epochs
    keeps evaluation within ``share`` of the time (costs per epoch and per evaluation, in any
    one unit)."""
    if eval_cost <= 0 or train_cost <= 0 or share >= 1:
        return 1
    k = eval_cost * (1.0 - share) / (share * train_cost)
    return max(1, math.ceil(k - 1e-9))


def interval_for(train_images: int, eval_images: int, share: float = DEFAULT_EVAL_SHARE) -> int:
    """k for a defense epoch over ``train_images`` clean images and an evaluation scoring
    ``eval_images`` (clean and poisoned sets together)."""
    return auto_interval(TRAIN_COST_PER_IMAGE * train_images, float(eval_images), share)


def due_epochs(last: int, every: int, forced: Iterable[float] = (),
               first: bool = False) -> set[int]:
    """The epochs 1..last a trial evaluates: every ``every``-th, the first epoch at or past each
    of ``forced`` (a scheduler's decision points), the last, and with ``first`` epoch 1 (the
    default schedule's curve starts there; a fixed ``eval.every`` means exactly that)."""
    marks = {math.ceil(e - 1e-9) for e in forced}
    return {e for e in range(1, last + 1)
            if (first and e == 1) or e == last or e % every == 0 or e in marks}


__all__ = ["DEFAULT_EVAL_SHARE", "TRAIN_COST_PER_IMAGE", "auto_interval", "due_epochs",
           "interval_for"]
