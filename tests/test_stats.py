"""otca.stats against hand-computed values and loop / brute-force references."""

import itertools
import math

import numpy as np
import pytest

from otca.stats import (
    bootstrap,
    first_reach,
    hypervolume,
    mean_ci,
    paired_difference_ci,
    paired_differences,
    pareto_front,
    percentile_interval,
    sample_efficiency,
    trailing_mean,
)


def test_percentile_interval_inverted_cdf_by_hand():
    s = np.arange(1.0, 101.0)  # 1..100
    assert percentile_interval(s, 0.9) == (5.0, 95.0)  # ranks ceil(0.05 * 100) = 5 and ceil(0.95 * 100) = 95
    assert percentile_interval(s[::-1], 0.5) == (25.0, 75.0)  # order of the input does not matter
    assert percentile_interval([1.0, 2.0, math.inf, math.inf], 0.5) == (1.0, math.inf)  # no NaN from inf
    with pytest.raises(ValueError, match="level"):
        percentile_interval(s, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        percentile_interval([1.0, math.nan], 0.5)


def test_bootstrap_matches_a_loop_with_the_same_draws():
    x = np.array([0.3, -1.2, 2.5, 0.7, 1.1])
    est = bootstrap(x, lambda s: np.median(s, axis=1), n_resamples=500, level=0.8, seed=7)
    idx = np.random.default_rng(7).integers(0, 5, size=(500, 5))
    loop = sorted(float(np.median([x[i] for i in row])) for row in idx)
    assert est.low == loop[math.ceil(0.1 * 500) - 1] and est.high == loop[math.ceil(0.9 * 500) - 1]
    assert est.value == float(np.median(x)) and est.n == 5 and est.level == 0.8


def test_mean_ci_two_values_by_hand():
    # resample means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 95 % interval is [0, 1]
    # and the 40 % interval (quantiles 0.3 and 0.7) is [0.5, 0.5]
    wide = mean_ci([0.0, 1.0], n_resamples=20_000, level=0.95, seed=1)
    assert (wide.value, wide.low, wide.high) == (0.5, 0.0, 1.0)
    narrow = mean_ci([0.0, 1.0], n_resamples=20_000, level=0.4, seed=1)
    assert (narrow.low, narrow.high) == (0.5, 0.5)
    same = mean_ci([2.0, 2.0, 2.0], n_resamples=100)
    assert (same.value, same.low, same.high) == (2.0, 2.0, 2.0)


def test_mean_ci_three_values_converges_to_the_exact_bootstrap_distribution():
    x = np.array([0.0, 1.0, 5.0])
    exact = sorted(float(np.mean(x[list(t)])) for t in itertools.product(range(3), repeat=3))  # 27 resamples
    est = mean_ci(x, n_resamples=50_000, level=0.8, seed=3)
    # exact quantiles 0.1 and 0.9 of the 27 equally likely resample means (inverted CDF)
    assert est.low == exact[math.ceil(0.1 * 27) - 1] and est.high == exact[math.ceil(0.9 * 27) - 1]
    assert est.value == pytest.approx(2.0)


def test_bootstrap_is_seeded():
    x = [0.1, 0.5, 0.2, 0.9]
    assert mean_ci(x, seed=4) == mean_ci(x, seed=4)
    assert mean_ci(x, n_resamples=50, seed=4) != mean_ci(x, n_resamples=50, seed=5)


def test_paired_differences_and_ci():
    scheme = {0: 0.9, 1: 0.8, 2: 0.95}
    base = {2: 0.9, 0: 0.85, 1: 0.7, 3: 0.1}  # an extra baseline seed is ignored
    d = paired_differences(scheme, base)
    assert list(d) == [0, 1, 2]
    np.testing.assert_allclose(list(d.values()), [0.05, 0.1, 0.05])
    est = paired_difference_ci(scheme, base, n_resamples=2000, seed=0)
    assert est.value == pytest.approx(0.2 / 3) and 0.05 - 1e-12 <= est.low <= est.value <= est.high <= 0.1 + 1e-12
    with pytest.raises(ValueError, match="missing \\[5\\]"):
        paired_differences({5: 1.0}, base)


def test_trailing_mean_and_first_reach_against_loops():
    rng = np.random.default_rng(0)
    v = rng.normal(size=23).cumsum()
    for w in (1, 3, 7, 30):
        loop = [np.mean(v[max(0, i - w + 1): i + 1]) for i in range(len(v))]
        np.testing.assert_allclose(trailing_mean(v, w), loop)
        thr = float(np.quantile(loop, 0.6))
        want = next(i for i, m in enumerate(loop) if m >= thr)
        assert first_reach(v, thr, smooth=w) == want
        wall = np.linspace(0.5, 30.0, len(v))
        assert first_reach(v, thr, smooth=w, x=wall) == wall[want]
    assert first_reach([0.0, 0.1, 0.2], 0.5) is None
    assert first_reach([0.0, 1.0, 0.0, 1.0], 0.75, smooth=2) is None  # the smoothed curve stays at 0.5
    with pytest.raises(ValueError, match="window"):
        trailing_mean(v, 0)


def test_sample_efficiency_by_hand():
    # baseline climbs 0..10 in steps of 1 (final 10, reached at iteration 10); the scheme is twice as fast
    base = {0: np.arange(11.0), 1: np.arange(11.0)}
    fast = {0: np.minimum(2 * np.arange(11.0), 12), 1: np.minimum(2 * np.arange(11.0), 12)}
    eff = sample_efficiency(fast, base, n_resamples=200)
    assert eff.per_seed[0].threshold == 10.0 and eff.per_seed[0].scheme_at == 5 and eff.per_seed[0].baseline_at == 10
    assert (eff.ratio.value, eff.ratio.low, eff.ratio.high) == (0.5, 0.5, 0.5)
    # one seed never reaches: the ratio is inf, and so is the upper bound; the best smoothed value is kept
    slow = {0: fast[0], 1: np.full(11, 9.0)}
    eff = sample_efficiency(slow, base, n_resamples=2000, level=0.9)
    assert eff.per_seed[1].scheme_at is None and eff.per_seed[1].scheme_best == 9.0
    assert eff.ratio.value == math.inf and eff.ratio.high == math.inf and eff.ratio.low == 0.5
    # wall-time variant: the baseline's iterations cost 2 s, the scheme's 3 s
    wall = sample_efficiency(fast, base, scheme_x={s: 3.0 * np.arange(11) for s in base},
                             baseline_x={s: 2.0 * np.arange(11) for s in base}, n_resamples=50)
    assert wall.ratio.value == pytest.approx(15 / 20)


def test_sample_efficiency_ratio_of_sums_with_smoothing():
    rng = np.random.default_rng(2)
    base = {s: rng.normal(size=40).cumsum() * 0.1 + np.linspace(0, 1, 40) for s in range(4)}
    scheme = {s: rng.normal(size=40).cumsum() * 0.1 + np.linspace(0, 1.5, 40) for s in range(4)}
    eff = sample_efficiency(scheme, base, smooth=5, n_resamples=300, seed=1)
    at, base_at = [], []
    for s in range(4):
        thr = np.mean(base[s][-5:])
        sm = [np.mean(scheme[s][max(0, i - 4): i + 1]) for i in range(40)]
        bm = [np.mean(base[s][max(0, i - 4): i + 1]) for i in range(40)]
        at.append(next((i for i, m in enumerate(sm) if m >= thr), math.inf))
        base_at.append(next(i for i, m in enumerate(bm) if m >= thr))
    assert [eff.per_seed[s].scheme_at if eff.per_seed[s].scheme_at is not None else math.inf for s in range(4)] == at
    want = sum(at) / sum(base_at)
    assert eff.ratio.value == pytest.approx(want)


def test_pareto_front_against_a_loop():
    rng = np.random.default_rng(1)
    for M in (2, 3):
        p = rng.integers(0, 5, size=(30, M)).astype(float)  # integer grid: ties and duplicates
        got = pareto_front(p)
        for i in range(30):
            dominated = any((p[j] >= p[i]).all() and (p[j] > p[i]).any() for j in range(30))
            assert got[i] == (not dominated)
    assert pareto_front([[1.0, 1.0], [1.0, 1.0]]).tolist() == [True, True]


def test_hypervolume_by_hand():
    assert hypervolume([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]], [0.0, 0.0]) == pytest.approx(6.0)  # 3 + 2 + 1
    assert hypervolume([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]], [1.0, 1.0]) == pytest.approx(1.0)  # only (2, 2)
    assert hypervolume([[2.0, 2.0], [1.0, 1.0]], [0.0, 0.0]) == pytest.approx(4.0)  # a dominated point adds 0
    assert hypervolume([[-1.0, 5.0]], [0.0, 0.0]) == 0.0  # below the reference in one objective
    # two boxes in 3-D: 2*2*2 + 3*1*1 - overlap 2*1*1
    assert hypervolume([[2.0, 2.0, 2.0], [3.0, 1.0, 1.0]], [0.0, 0.0, 0.0]) == pytest.approx(8 + 3 - 2)
    assert hypervolume([[4.0]], [1.0]) == 3.0
    with pytest.raises(ValueError, match="ref: expected a finite \\[2\\]"):
        hypervolume([[1.0, 2.0]], [0.0])


@pytest.mark.parametrize("M", [2, 3])
def test_hypervolume_against_counting_grid_cells(M):
    # integer points: the dominated region is a union of unit cells, counted one by one
    rng = np.random.default_rng(M)
    for _ in range(5):
        p = rng.integers(0, 7, size=(8, M))
        count = sum(any((q >= np.array(c) + 1).all() for q in p) for c in itertools.product(range(7), repeat=M))
        assert hypervolume(p.astype(float), np.zeros(M)) == pytest.approx(count)


def test_hypervolume_against_monte_carlo():
    rng = np.random.default_rng(9)
    p = rng.uniform(0.2, 1.0, size=(12, 3))
    ref = np.array([0.1, 0.0, 0.2])
    y = rng.uniform(0, 1, size=(400_000, 3))
    inside = ((y[:, None, :] <= p[None]).all(2).any(1) & (y >= ref).all(1)).mean()
    # the unit cube has volume 1; the MC standard error is about 8e-4
    assert hypervolume(p, ref) == pytest.approx(float(inside), abs=4e-3)
