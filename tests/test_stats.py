"""Statistics against hand-computed values: t-interval, McNemar's test, paired and subset bootstraps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from augsvhn.eval import stats


def test_t_interval_three_values():
    # mean 2, sample sd 1, t(0.975, df=2) = 4.302653 (table value), so half width 4.302653 / sqrt(3).
    interval = stats.t_interval([1.0, 2.0, 3.0])
    assert interval.mean == pytest.approx(2.0)
    assert interval.low == pytest.approx(2.0 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert interval.high == pytest.approx(2.0 + 4.302653 / math.sqrt(3), abs=1e-5)


def test_t_interval_single_value_has_no_width():
    interval = stats.t_interval([0.8])
    assert interval.mean == 0.8
    assert math.isnan(interval.low)
    assert math.isnan(interval.high)


def _pairs(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([True] * both + [True] * only_a + [False] * only_b + [False] * neither)
    b = np.array([True] * both + [False] * only_a + [True] * only_b + [False] * neither)
    return a, b


def test_mcnemar_exact_small_table():
    # b = 1, c = 6: P(X <= 1) for X ~ Bin(7, 1/2) = (1 + 7) / 128, two-sided p = 16 / 128.
    a, b = _pairs(both=50, only_a=1, only_b=6, neither=10)
    result = stats.mcnemar(a, b)
    assert (result.b, result.c) == (1, 6)
    assert result.method == "exact"
    assert result.p_value == pytest.approx(16 / 128)


def test_mcnemar_exact_symmetric_is_one():
    a, b = _pairs(both=5, only_a=3, only_b=3, neither=1)
    assert stats.mcnemar(a, b).p_value == 1.0


def test_mcnemar_chi_square_large_table():
    # b = 30, c = 10: (|30 - 10| - 1)^2 / 40 = 9.025; chi-square(1) survival = erfc(sqrt(x / 2)).
    a, b = _pairs(both=200, only_a=30, only_b=10, neither=40)
    result = stats.mcnemar(a, b)
    assert result.method == "chi2"
    assert result.statistic == pytest.approx(9.025)
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))


def test_mcnemar_no_discordant_pairs():
    a = np.ones(10, dtype=bool)
    assert stats.mcnemar(a, a).p_value == 1.0


def test_paired_bootstrap_known_difference():
    # A is right wherever B is, and also on 10% more of 2,000 digits: the difference per digit is 1 on 200 digits.
    rng = np.random.default_rng(1)
    b = rng.random(2000) < 0.7
    a = b.copy()
    flip = rng.choice(np.flatnonzero(~b), size=200, replace=False)
    a[flip] = True
    interval = stats.paired_bootstrap(a, b, n_resamples=4000, seed=0)
    assert interval.mean == pytest.approx(0.1)
    # Normal approximation: standard error sqrt(0.1 * 0.9 / 2000) = 0.00671, 1.96 of them each side.
    half_width = 1.96 * math.sqrt(0.1 * 0.9 / 2000)
    assert interval.low == pytest.approx(0.1 - half_width, abs=0.002)
    assert interval.high == pytest.approx(0.1 + half_width, abs=0.002)


def test_paired_bootstrap_identical_arms():
    rng = np.random.default_rng(2)
    correct = rng.random((3, 500)) < 0.8
    interval = stats.paired_bootstrap(correct, correct, n_resamples=500)
    assert (interval.mean, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_seeds_widen_interval():
    # Seeds that disagree about the difference (+0.2 and -0.2 on every digit) add spread over seeds.
    a = np.array([[True] * 100, [False] * 100])
    b = np.array([[False] * 80 + [True] * 20, [True] * 80 + [False] * 20])
    interval = stats.paired_bootstrap(a, b, n_resamples=2000)
    assert interval.mean == pytest.approx(0.0)
    assert interval.low < -0.3
    assert interval.high > 0.3


def test_paired_bootstrap_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        stats.paired_bootstrap(np.ones(5, bool), np.ones(6, bool))


def test_subset_difference_hard_subset():
    # The first 100 of 1,000 digits are all wrong, the rest all right: slice 0.0 vs all 0.9.
    correct = np.ones((2, 1000), dtype=bool)
    correct[:, :100] = False
    subset = np.zeros(1000, dtype=bool)
    subset[:100] = True
    interval = stats.bootstrap_subset_difference(correct, subset, n_resamples=2000)
    assert interval.mean == pytest.approx(-0.9)
    assert interval.high < 0
    # The slice stays all wrong in every resample, so only the accuracy over all digits varies.
    assert interval.low == pytest.approx(-0.9 - 1.96 * math.sqrt(0.09 / 1000), abs=0.005)
