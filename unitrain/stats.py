"""Statistics for comparing runs across seeds, after rliable.

Agarwal, Schwarzer, Castro, Courville and Bellemare 2021, "Deep Reinforcement Learning at the Edge
of the Statistical Precipice" (NeurIPS): report an interval estimate, not a point; the
interquartile mean (IQM: the mean of the middle 50 % of runs, robust to an outlying seed yet
using half the runs, unlike the median) with a percentile bootstrap confidence interval over runs.
The estimators are rliable's (``aggregate_iqm`` is ``scipy.stats.trim_mean(x, 0.25)``; the
bootstrap resamples runs with replacement), written here over numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["auc", "bootstrap_ci", "first_reaching", "iqm", "performance_profile",
           "probability_of_improvement", "probability_of_improvement_ci"]


def iqm(values: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean: drop ``⌊n/4⌋`` values at each end of the sorted values, average the
    rest (``scipy.stats.trim_mean(values, 0.25)``)."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size == 0:
        raise ValueError("iqm of no values")
    k = int(0.25 * x.size)
    return float(x[k: x.size - k].mean())


def bootstrap_ci(values: Sequence[float] | np.ndarray,
                 statistic: Callable[[np.ndarray], float] = iqm, reps: int = 5000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic`` over runs.

    Args:
        values: one value per run (seed).
        statistic: ``values -> float`` (default: :func:`iqm`).
        reps: bootstrap resamples (each draws ``len(values)`` runs with replacement).
        level: coverage of the interval.
        seed: seed of the resampling, so reported intervals are reproducible.

    Returns:
        ``(low, high)``, the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the statistic
        over the resamples.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap of no values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(reps, x.size))
    stats = np.array([statistic(x[row]) for row in idx])
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def auc(curve: Sequence[tuple[float, float]], start: float = 0.0,
        end: float | None = None) -> float:
    """Normalised area under a return-vs-frames curve: its trapezoid integral over
    ``[start, end]`` divided by ``end − start``, i.e. the mean return over the budget.

    Points are ``(frames, return)``. Before the first point the curve is taken as the first
    return (no evaluation happened earlier), after the last as the last return.
    """
    if not curve:
        return float("nan")
    pts = sorted(curve)
    end = pts[-1][0] if end is None else end
    if end <= start:
        return float(pts[-1][1])
    xs = [start] + [x for x, _ in pts if start < x < end] + [end]
    fx = np.interp(xs, [x for x, _ in pts], [y for _, y in pts])
    return float(np.trapezoid(fx, xs) / (end - start))


def first_reaching(curve: Sequence[tuple[float, float]], threshold: float) -> float | None:
    """The first ``x`` (frames or seconds) of a ``(x, return)`` curve whose return is
    ``>= threshold``, or ``None``."""
    return next((x for x, y in sorted(curve) if y >= threshold), None)


def probability_of_improvement(x: Sequence[float] | np.ndarray,
                               y: Sequence[float] | np.ndarray) -> float:
    """``P(X > Y)``: the probability that a run of X scores above a run of Y, ties counting half.

    Agarwal et al. 2021 (section 4.3; rliable's ``probability_of_improvement``): the Mann–Whitney
    U statistic of X against Y divided by ``n·m``, averaged over tasks (here one task):
    ``(#{x_i > y_j} + 0.5·#{x_i = y_j}) / (n·m)`` over all pairs of runs.
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("probability of improvement of no values")
    greater = (a[:, None] > b[None, :]).sum()
    ties = (a[:, None] == b[None, :]).sum()
    return float((greater + 0.5 * ties) / (a.size * b.size))


def probability_of_improvement_ci(x: Sequence[float] | np.ndarray,
                                  y: Sequence[float] | np.ndarray, reps: int = 2000,
                                  level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Stratified percentile bootstrap interval of :func:`probability_of_improvement`: each
    resample draws X's runs and Y's runs separately, with replacement, keeping their sizes."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap of no values")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, size=(reps, a.size))
    ib = rng.integers(0, b.size, size=(reps, b.size))
    stats = np.array([probability_of_improvement(a[i], b[j]) for i, j in zip(ia, ib)])
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def performance_profile(values: Sequence[float] | np.ndarray, taus: Sequence[float] | np.ndarray,
                        reps: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run-score performance profile (Agarwal et al. 2021, section 4.2; rliable's
    ``create_performance_profile``): for each ``τ`` the fraction of runs whose score is ``> τ``,
    with a percentile bootstrap band over runs.

    Returns:
        ``(profile, low, high)``, arrays of ``len(taus)``.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    t = np.asarray(taus, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("performance profile of no values")
    profile = (x[:, None] > t[None, :]).mean(0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(reps, x.size))
    boot = (x[idx][:, :, None] > t[None, None, :]).mean(1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha], axis=0)
    return profile, low, high
