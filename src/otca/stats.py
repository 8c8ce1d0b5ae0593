"""Statistics that turn several training runs into evidence: bootstrap confidence intervals over seeds,
paired differences against a baseline, sample efficiency, and the Pareto front / hypervolume of a trade-off.

The unit of resampling is the seed: runs of one seed share prompts and initial noise across schemes
(``otca compare``), so a scheme and its baseline are compared seed by seed (paired), and a confidence interval
comes from resampling seeds with replacement (the percentile bootstrap, Efron & Tibshirani 1993, ch. 13).
With 3-5 seeds the percentile interval is rough (it under-covers, and 3 seeds have only 10 distinct
resamples); it is reported as what the seeds support, not as a test at a nominal level.

Quantiles are the inverted empirical CDF (no interpolation between resampled values), so a statistic that is
``inf`` on some resamples (a scheme that never reaches a threshold) gives an ``inf`` bound, not NaN.

All functions are pure NumPy on float64 and deterministic for a given ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
# statistic(samples [R, n, ...]) -> [R]: one value per resample; the units (seeds) are axis 1
Statistic = Callable[[FloatArray], FloatArray]


@dataclass(frozen=True)
class Estimate:
    """A point estimate on the data with a bootstrap interval ``[low, high]`` at ``level``, from ``n`` units."""

    value: float
    low: float
    high: float
    n: int
    level: float

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level!r}")


def percentile_interval(stats: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``stats [R]`` by the inverted empirical CDF:
    the smallest value whose empirical CDF is at least the probability. ``inf`` values sort last."""
    _check_level(level)
    s = np.sort(np.asarray(stats, dtype=np.float64).ravel())  # [R]
    if s.size == 0 or np.isnan(s).any():
        raise ValueError(f"bootstrap statistics: expected a non-empty array without NaN, got {s.size} values")
    R = s.size
    lo_p, hi_p = (1 - level) / 2, (1 + level) / 2
    # inverted CDF: index ceil(p R) - 1 (1-based rank ceil(p R)); the tiny slack keeps p R = integer exact
    lo = s[max(math.ceil(lo_p * R - 1e-9) - 1, 0)]
    hi = s[min(max(math.ceil(hi_p * R - 1e-9) - 1, 0), R - 1)]
    return float(lo), float(hi)


def bootstrap(
    values: ArrayLike,
    statistic: Statistic,
    *,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap of ``statistic`` over the units (rows) of ``values [n, ...]``.

    ``statistic`` maps samples ``[R, n, ...]`` to ``[R]`` (vectorised over resamples); the point estimate is
    ``statistic(values[None])``. Resample ``r`` takes rows ``idx[r] = rng.integers(0, n, n)`` of
    ``np.random.default_rng(seed)``, drawn as one ``[R, n]`` array.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"bootstrap values: expected at least one unit (row), got shape {list(x.shape)}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples: expected >= 1, got {n_resamples}")
    _check_level(level)
    n = x.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))  # [R, n]
    stats = np.asarray(statistic(x[idx]), dtype=np.float64)  # [R]
    if stats.shape != (n_resamples,):
        raise ValueError(f"statistic: expected one value per resample [{n_resamples}], got {list(stats.shape)}")
    point = float(np.asarray(statistic(x[None]), dtype=np.float64).reshape(-1)[0])
    lo, hi = percentile_interval(stats, level)
    return Estimate(point, lo, hi, n, level)


def _mean_over_units(samples: FloatArray) -> FloatArray:
    return np.asarray(samples.mean(axis=1), dtype=np.float64)  # [R]


def mean_ci(values: Sequence[float] | ArrayLike, *, n_resamples: int = 10_000, level: float = 0.95,
            seed: int = 0) -> Estimate:
    """The mean of ``values [n]`` with its percentile-bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or not np.isfinite(x).all():
        raise ValueError(f"mean_ci values: expected a 1-D array of finite numbers, got {x.tolist()}")
    return bootstrap(x, _mean_over_units, n_resamples=n_resamples, level=level, seed=seed)


def paired_differences(values: Mapping[int, float], baseline: Mapping[int, float]) -> dict[int, float]:
    """``values[s] - baseline[s]`` for every seed ``s`` of ``values``, in seed order; every seed of ``values``
    must have a baseline (a seed without one is an error naming it)."""
    missing = sorted(set(values) - set(baseline))
    if missing or not values:
        raise ValueError(f"paired differences: expected a baseline for every seed of {sorted(values)}, "
                         f"missing {missing}" if values else "paired differences: expected at least one seed")
    return {s: float(values[s]) - float(baseline[s]) for s in sorted(values)}


def paired_difference_ci(
    values: Mapping[int, float],
    baseline: Mapping[int, float],
    *,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Mean per-seed difference ``values - baseline`` with its bootstrap interval (seeds resampled as pairs)."""
    d = paired_differences(values, baseline)
    return mean_ci(list(d.values()), n_resamples=n_resamples, level=level, seed=seed)


# ------------------------------------------------------------------ sample efficiency


def trailing_mean(values: ArrayLike, window: int) -> FloatArray:
    """Mean of the last ``window`` entries up to each position of ``values [n]`` (fewer at the start) ``[n]``."""
    if window < 1:
        raise ValueError(f"smooth: expected a window >= 1, got {window}")
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"curve: expected a 1-D array, got shape {list(v.shape)}")
    c = np.concatenate([[0.0], np.cumsum(v)])  # [n+1]
    idx = np.arange(v.size)  # [n]
    lo = np.maximum(idx + 1 - window, 0)  # [n]
    return np.asarray((c[idx + 1] - c[lo]) / (idx + 1 - lo), dtype=np.float64)  # [n]


def first_reach(
    values: ArrayLike, threshold: float, *, smooth: int = 1, x: ArrayLike | None = None
) -> float | None:
    """Where a training curve first reaches ``threshold``: ``x[i]`` for the first ``i`` whose trailing mean over
    ``smooth`` entries is ``>= threshold``; ``None`` when it never does.

    ``values [n]`` is one value per iteration; ``x [n]`` is what to report (default: the index ``i``, i.e. the
    iteration of a curve logged from iteration 0; pass the wall seconds for the wall-time variant).
    """
    s = trailing_mean(values, smooth)  # [n]
    xs = np.arange(s.size, dtype=np.float64) if x is None else np.asarray(x, dtype=np.float64)
    if xs.shape != s.shape:
        raise ValueError(f"first_reach x: expected shape {list(s.shape)} like the curve, got {list(xs.shape)}")
    hit = np.flatnonzero(s >= threshold)
    return float(xs[hit[0]]) if hit.size else None


@dataclass(frozen=True)
class Reach:
    """One seed of a sample-efficiency comparison: the baseline's final smoothed reward (``threshold``), where
    the scheme and the baseline first reach it (``None``: never), and the scheme's best smoothed reward (how
    close it came)."""

    threshold: float
    scheme_at: float | None
    baseline_at: float | None
    scheme_best: float


@dataclass(frozen=True)
class Efficiency:
    """Per-seed reaches and the ratio ``sum_s scheme_at / sum_s baseline_at`` (``inf`` when the scheme misses
    the threshold on some seed) with its bootstrap interval over seeds."""

    per_seed: dict[int, Reach]
    ratio: Estimate


def _ratio_of_sums(samples: FloatArray) -> FloatArray:
    """``samples [R, n, 2]`` (scheme, baseline) -> ``sum scheme / sum baseline`` ``[R]``; ``inf`` if any scheme
    entry is ``inf``; NaN (an error later) for a zero baseline sum."""
    num, den = samples[..., 0].sum(axis=1), samples[..., 1].sum(axis=1)  # [R], [R]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.where(np.isinf(num), np.inf, num / den), dtype=np.float64)  # [R]


def sample_efficiency(
    scheme: Mapping[int, ArrayLike],
    baseline: Mapping[int, ArrayLike],
    *,
    smooth: int = 1,
    scheme_x: Mapping[int, ArrayLike] | None = None,
    baseline_x: Mapping[int, ArrayLike] | None = None,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Efficiency:
    """How fast a scheme reaches the baseline's final training reward, relative to the baseline, per seed.

    ``scheme[s]``, ``baseline[s]``: training curves ``[n]`` of seed ``s`` (one value per iteration). For each
    seed, the threshold is the baseline's trailing mean (over ``smooth``) at its last iteration; both curves'
    first reach of it is taken with :func:`first_reach` (the baseline reaches it at its last iteration at the
    latest). ``*_x`` give what the reach is measured in (default: the iteration index; wall seconds for the
    wall-time variant). The ratio is of the sums over seeds (a ratio of means), < 1 when the scheme is faster.
    """
    paired_differences({s: 0.0 for s in scheme}, {s: 0.0 for s in baseline})  # every seed has a baseline
    per_seed: dict[int, Reach] = {}
    for s in sorted(scheme):
        base = np.asarray(baseline[s], dtype=np.float64)
        threshold = float(trailing_mean(base, smooth)[-1])
        at = first_reach(scheme[s], threshold, smooth=smooth, x=None if scheme_x is None else scheme_x[s])
        base_at = first_reach(base, threshold, smooth=smooth, x=None if baseline_x is None else baseline_x[s])
        best = float(trailing_mean(scheme[s], smooth).max())
        per_seed[s] = Reach(threshold, at, base_at, best)
    pairs = np.array([[math.inf if r.scheme_at is None else r.scheme_at, r.baseline_at] for r in per_seed.values()],
                     dtype=np.float64)  # [n, 2]; baseline_at is never None (it reaches at its end)
    if (pairs[:, 1] <= 0).any():
        raise ValueError("sample efficiency: the baseline reaches its final reward at x <= 0 on some seed "
                         f"({ {s: r.baseline_at for s, r in per_seed.items()} }); the ratio is undefined")
    ratio = bootstrap(pairs, _ratio_of_sums, n_resamples=n_resamples, level=level, seed=seed)
    return Efficiency(per_seed, ratio)


# ------------------------------------------------------------------ multi-objective trade-off


def _points(points: ArrayLike, name: str = "points") -> FloatArray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1 or not np.isfinite(p).all():
        raise ValueError(f"{name}: expected a finite [N, M] array, got shape {list(p.shape)}")
    return p


def pareto_front(points: ArrayLike) -> NDArray[np.bool_]:
    """Which of ``points [N, M]`` are not dominated, every objective maximised ``[N]`` bool.

    ``q`` dominates ``p`` when ``q >= p`` in every objective and ``q > p`` in one; equal points do not
    dominate each other, so duplicates are all kept. (Negate a column to minimise it.)
    """
    p = _points(points)
    ge = (p[None, :, :] >= p[:, None, :]).all(axis=2)  # [N, N]: ge[i, j] = point j >= point i everywhere
    gt = (p[None, :, :] > p[:, None, :]).any(axis=2)  # [N, N]: point j > point i somewhere
    return np.asarray(~np.any(ge & gt, axis=1), dtype=np.bool_)  # [N]


def _union_volume(p: FloatArray) -> float:
    """Volume of the union of boxes ``[0, p_i]`` for ``p [N, M] > 0`` by slicing along the last objective
    (exact; the recursion is the hypervolume-by-slicing-objectives scheme, cost O(N^(M-1) log N))."""
    N, M = p.shape
    if N == 0:
        return 0.0
    if M == 1:
        return float(p[:, 0].max())
    order = np.argsort(-p[:, -1], kind="stable")  # descending last coordinate
    p = p[order]
    z = np.append(p[:, -1], 0.0)  # [N+1]
    vol = 0.0
    for i in range(N):
        depth = z[i] - z[i + 1]
        if depth > 0:  # the slab (z[i+1], z[i]] is covered by the first i+1 boxes' projections
            vol += depth * _union_volume(p[: i + 1, :-1])
    return vol


def hypervolume(points: ArrayLike, ref: ArrayLike) -> float:
    """The hypervolume of ``points [N, M]`` against the reference point ``ref [M]`` (every objective
    maximised): the volume of ``{y : ref <= y <= p for some point p}``. Exact for any M (by slicing; meant
    for the 2-3 objectives of a comparison and tens of points). A point not above ``ref`` in every objective
    adds nothing."""
    p = _points(points)
    r = np.asarray(ref, dtype=np.float64)
    if r.shape != (p.shape[1],) or not np.isfinite(r).all():
        raise ValueError(f"ref: expected a finite [{p.shape[1]}] point, got {r.tolist()}")
    d = p - r  # [N, M]
    d = d[(d > 0).all(axis=1)]
    return _union_volume(d[pareto_front(d)]) if d.size else 0.0
