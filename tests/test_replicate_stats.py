"""P(A > B) over paired (replicate, holdout seed) draws, its bootstrap interval and the verdict
it allows; the expected value of a procedure with its interval."""
from __future__ import annotations

import math

import numpy as np
import pytest

from d3tune.stats import compare_paired, mean_interval, prob_ahead


def test_prob_ahead_by_hand():
    # pairs: A wins, B wins, tie, A wins -> (1 + 0 + 0.5 + 1) / 4
    assert prob_ahead([1, 2, 3, 4], [0, 3, 3, 1]) == pytest.approx(0.625)
    assert prob_ahead([0.9, 0.8, 0.7], [0.85, 0.8, 0.75]) == pytest.approx(0.5)


def test_a_clearly_better_defense_is_ahead():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.6, 0.8, 9)  # 3 replicates x 3 holdout seeds
    a = b + rng.uniform(0.05, 0.1, 9)  # better on every paired draw, by construction
    out = compare_paired("d3", a, "ft", b)
    assert out.p == 1.0 and out.low == 1.0 and out.verdict == "d3 ahead"
    assert compare_paired("ft", b, "d3", a).verdict == "d3 ahead"  # the other way round


def test_identical_defenses_are_not_separable():
    x = np.linspace(0.7, 0.9, 9)
    out = compare_paired("a", x, "b", x.copy())
    assert out.p == 0.5 and (out.low, out.high) == (0.5, 0.5)
    assert out.verdict == "not separable"


def test_a_small_mixed_lead_is_not_separable():
    a = [0.90, 0.80, 0.85, 0.70, 0.95, 0.75, 0.88, 0.82, 0.79]
    b = [0.85, 0.82, 0.84, 0.74, 0.90, 0.78, 0.86, 0.80, 0.81]  # A wins 5 of 9
    out = compare_paired("a", a, "b", b)
    assert out.p == pytest.approx(5 / 9)
    assert out.low < 0.5 < out.high and out.verdict == "not separable"


def test_one_draw_has_no_interval():
    out = compare_paired("a", [0.9], "b", [0.8])
    assert out.p == 1.0 and math.isnan(out.low) and out.verdict == "not separable"
    mean, low, high, n = mean_interval([0.8])
    assert (mean, n) == (0.8, 1) and math.isnan(low) and math.isnan(high)


def test_mean_interval_brackets_the_mean():
    mean, low, high, n = mean_interval([0.7, 0.8, 0.9, 0.75, 0.85, 0.8])
    assert n == 6 and mean == pytest.approx(0.8) and low < mean < high
    assert 0.7 <= low and high <= 0.9


def test_unpaired_shapes_are_refused():
    with pytest.raises(ValueError, match="paired draws"):
        compare_paired("a", [1, 2], "b", [1, 2, 3])
