"""Statistics for comparing classifiers on the same test digits: t-intervals, paired bootstrap, McNemar's test."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

# Below this many discordant pairs McNemar's test uses the exact binomial distribution instead of chi-square.
MCNEMAR_EXACT_BELOW = 25


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval [low, high]."""

    mean: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on paired correctness: `b` = only A correct, `c` = only B correct."""

    b: int
    c: int
    statistic: float  # chi-square with continuity correction, or min(b, c) for the exact test
    p_value: float
    method: str  # "exact" (binomial) or "chi2" (with continuity correction)


def t_interval(values, confidence: float = 0.95) -> Interval:
    """Return the mean of `values` with a Student-t confidence interval (mean +- t * s / sqrt(n)).

    With a single value the interval is (nan, nan), because a spread cannot be estimated from one seed.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(values.mean())
    if values.size == 1:
        return Interval(mean, math.nan, math.nan)
    sem = values.std(ddof=1) / math.sqrt(values.size)
    half_width = float(scipy_stats.t.ppf(0.5 + confidence / 2, df=values.size - 1) * sem)
    return Interval(mean, mean - half_width, mean + half_width)


def _resample_counts(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """Draw `resamples` bootstrap samples of n items; return how often each item is drawn, int (resamples, n)."""
    drawn = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]  # (R, n) flat indices
    return np.bincount(drawn.ravel(), minlength=resamples * n).reshape(resamples, n)


def _as_seed_by_digit(correct) -> np.ndarray:
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim == 1:
        correct = correct[None, :]
    if correct.ndim != 2:
        raise ValueError(f"expected correctness of shape (seeds, digits) or (digits,), got {correct.shape}")
    return correct


def paired_bootstrap(
    correct_a,
    correct_b,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Bootstrap the accuracy difference A - B over test digits and seeds, keeping each pair together.

    `correct_a` and `correct_b` are booleans of shape (seeds, digits): entry (s, i) says whether the model of arm A
    (or B) trained with seed s classified test digit i correctly. Arms A and B trained with the same seed form a
    pair. Each resample draws the digits with replacement (the same digits for every seed and for both arms) and,
    with more than one seed, the seeds with replacement; the statistic is the mean of A - B over the drawn pairs.
    The interval is the percentile interval (Efron and Tibshirani 1993, ch. 13). Returns the observed difference
    with that interval.
    """
    a = _as_seed_by_digit(correct_a)
    b = _as_seed_by_digit(correct_b)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays must have the same shape, got {a.shape} and {b.shape}")
    seeds, digits = a.shape
    if digits == 0:
        raise ValueError("paired_bootstrap needs at least one test digit")
    difference = a.astype(np.float64) - b.astype(np.float64)  # (seeds, digits)
    observed = float(difference.mean())

    # Per-seed sums over drawn digits: weights (R, digits) count how often each digit is drawn.
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, 2_000_000 // max(digits, 1)))
    estimates = []
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        digit_counts = _resample_counts(rng, size, digits)  # (R, digits)
        per_seed = digit_counts @ difference.T / digits  # (R, seeds)
        if seeds > 1:
            seed_counts = _resample_counts(rng, size, seeds)  # (R, seeds)
            estimates.append((per_seed * seed_counts).sum(axis=1) / seeds)
        else:
            estimates.append(per_seed[:, 0])
    estimates = np.concatenate(estimates)
    alpha = 1.0 - confidence
    low, high = np.quantile(estimates, [alpha / 2, 1 - alpha / 2])
    return Interval(observed, float(low), float(high))


def mcnemar(correct_a, correct_b) -> McNemarResult:
    """McNemar's test of equal error rates for two classifiers on the same test digits (McNemar 1947).

    Inputs are booleans of the same shape; with shape (seeds, digits) every (seed, digit) pair counts once, which
    treats seeds as independent replicates. `b` counts pairs where only A is correct, `c` where only B is. With
    b + c < MCNEMAR_EXACT_BELOW the two-sided p-value is exact: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2),
    capped at 1. Otherwise it uses chi-square with one degree of freedom on (|b - c| - 1)^2 / (b + c)
    (Edwards 1948 continuity correction).
    """
    a = np.asarray(correct_a, dtype=bool)
    b_arr = np.asarray(correct_b, dtype=bool)
    if a.shape != b_arr.shape:
        raise ValueError(f"paired arrays must have the same shape, got {a.shape} and {b_arr.shape}")
    only_a = int(np.sum(a & ~b_arr))
    only_b = int(np.sum(~a & b_arr))
    discordant = only_a + only_b
    if discordant == 0:
        return McNemarResult(only_a, only_b, 0.0, 1.0, "exact")
    if discordant < MCNEMAR_EXACT_BELOW:
        p_value = min(1.0, 2.0 * float(scipy_stats.binom.cdf(min(only_a, only_b), discordant, 0.5)))
        return McNemarResult(only_a, only_b, float(min(only_a, only_b)), p_value, "exact")
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant
    p_value = float(scipy_stats.chi2.sf(statistic, df=1))
    return McNemarResult(only_a, only_b, float(statistic), p_value, "chi2")


def bootstrap_subset_difference(
    correct,
    subset: np.ndarray,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Bootstrap the accuracy on a subset of test digits minus the accuracy on all of them.

    `correct` is boolean (seeds, digits) for one arm and `subset` a boolean mask (digits,). Each resample draws the
    test digits with replacement (the same draw for every seed); accuracies are averaged over seeds. A negative
    interval means the subset is harder than the whole test set. Returns the observed difference with its
    percentile interval.
    """
    correct = _as_seed_by_digit(correct).astype(np.float64)
    subset = np.asarray(subset, dtype=bool)
    seeds, digits = correct.shape
    if subset.shape != (digits,):
        raise ValueError(f"subset mask must have shape ({digits},), got {subset.shape}")
    if not subset.any():
        raise ValueError("the subset is empty")
    per_digit = correct.mean(axis=0)  # (digits,): accuracy over seeds of each digit
    observed = float(per_digit[subset].mean() - per_digit.mean())

    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, 2_000_000 // digits))
    estimates = []
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        counts = _resample_counts(rng, size, digits).astype(np.float64)  # (R, digits)
        subset_counts = counts[:, subset].sum(axis=1)
        subset_accuracy = counts[:, subset] @ per_digit[subset] / np.maximum(subset_counts, 1)
        estimates.append(np.where(subset_counts > 0, subset_accuracy - counts @ per_digit / digits, np.nan))
    estimates = np.concatenate(estimates)
    alpha = 1.0 - confidence
    low, high = np.nanquantile(estimates, [alpha / 2, 1 - alpha / 2])
    return Interval(observed, float(low), float(high))
