"""Default search spaces of the leaderboard, one per defense: ranges around each defense's own
defaults (BackdoorBench's, see d3tune/defenses/*.py), D3's as in the robust spec.

Why in code and not only in YAML: a leaderboard spec may list defenses without spaces and still
be an equal-budget comparison; every space here contains the defense's default setting, so a
search can always find it again (tuning cannot be worse than the default on the search seeds
except by the TPE's sampling luck). A spec's ``spaces: {ft: {...}}`` replaces one of them.
The common ``lr``/``epochs``/``batch_size`` are searched only for defenses that use them
(ANP, I-BAU and SAU run their own optimisers; I-BAU ignores ``epochs`` too).
"""
from __future__ import annotations

from typing import Any

# The order a leaderboard runs them in (cheap and the method first; ANP, the slowest, last).
ALL_DEFENSES = ("d3", "ft", "fp", "nad", "fst", "ft_sam", "ibau", "sau", "anp")

_FINETUNE = {  # the profile's defaults on digits: lr 0.01, 40 epochs, batch 32
    "defense.lr": {"loguniform": [0.002, 0.05]},
    "defense.epochs": {"int": [20, 60]},
    "defense.batch_size": {"choice": [16, 32, 64]},
}

DEFAULT_SPACES: dict[str, dict[str, Any]] = {
    "d3": {  # as search_spaces/robust_d3_digits.yaml
        "defense.lr": {"loguniform": [0.003, 0.05]},
        "defense.epochs": {"int": [20, 60]},
        "defense.batch_size": {"choice": [16, 32, 64]},
        "defense.eps": {"uniform": [0.0, 0.5]},
        "defense.lmd": {"loguniform": [0.1, 10.0]},
        "defense.p": {"choice": [1, 1.5, 2]},
        "defense.radius": {"uniform": [0.5, 2.0]},
        "defense.init": {"choice": ["random", "near", "middle", "far", "noise"]},
    },
    "ft": {**_FINETUNE, "defense.weight_decay": {"choice": [0.0, 0.0001, 0.0005, 0.001]}},
    "fp": {**_FINETUNE, "defense.acc_ratio": {"uniform": [0.02, 0.3]},
           "defense.prune_step": {"choice": [0.005, 0.01, 0.02, 0.05]}},
    "nad": {**_FINETUNE, "defense.te_epochs": {"int": [5, 20]},
            "defense.beta1": {"loguniform": [100.0, 2500.0]},
            "defense.beta2": {"loguniform": [200.0, 5000.0]},
            "defense.beta3": {"loguniform": [200.0, 5000.0]},
            "defense.p": {"choice": [1.0, 2.0, 4.0]}},
    "fst": {**_FINETUNE, "defense.alpha": {"uniform": [0.05, 0.5]}},
    "ft_sam": {**_FINETUNE, "defense.rho": {"loguniform": [0.1, 5.0]},
               "defense.label_smoothing": {"uniform": [0.0, 0.2]}},
    "ibau": {"defense.adam_lr": {"loguniform": [0.00002, 0.001]},
             "defense.n_rounds": {"int": [3, 10]},
             "defense.k": {"int": [3, 8]},
             "defense.radius": {"loguniform": [2.0, 20.0]},
             "defense.batch_size": {"choice": [16, 32, 64]}},
    "sau": {"defense.adam_lr": {"loguniform": [0.00002, 0.001]},
            "defense.eps": {"uniform": [0.05, 0.4]},
            "defense.adv_steps": {"int": [3, 8]},
            "defense.lmd_3": {"uniform": [0.5, 2.0]},
            "defense.epochs": {"int": [20, 60]}},
    "anp": {"defense.eps": {"uniform": [0.1, 0.6]},
            "defense.alpha": {"uniform": [0.0, 0.5]},
            "defense.mask_lr": {"loguniform": [0.05, 0.5]},
            "defense.threshold": {"uniform": [0.05, 0.5]}},
}

__all__ = ["ALL_DEFENSES", "DEFAULT_SPACES"]
