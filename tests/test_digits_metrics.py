"""Eval-only metrics of the digits world: the judge's reading, the Fréchet distance, group diversity."""

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otca.worlds.digits import metrics as M
from otca.worlds.digits.data import load_digit_images
from otca.worlds.digits.prompts import EVAL_TEMPLATES, make_prompt

KEYS = {"eval/judge_alignment", "eval/judge_accuracy", "eval/diversity", "eval/fidelity_fd", "eval/fidelity_n"}


@pytest.fixture(scope="module")
def splits():
    return load_digit_images("train"), load_digit_images("test")


def prompts_for(labels, shift=0):
    return [make_prompt(EVAL_TEMPLATES[i % 2], (int(d) + shift) % 10) for i, d in enumerate(labels)]


def stats(mean, cov):
    return M.FeatureStats(torch.tensor(mean, dtype=torch.float64), torch.tensor(cov, dtype=torch.float64), n=100)


# --- the judge ------------------------------------------------------------------------------------------


def test_judge_reads_real_digits_and_rejects_wrong_prompts(splits):
    _, (x, y) = splits
    assert M.judge_alignment(x, prompts_for(y)).mean() > 0.85
    assert M.judge_alignment(x, prompts_for(y, shift=3)).mean() < 0.05
    assert M.judge_accuracy(x, prompts_for(y)) >= 0.90
    assert M.judge_accuracy(x, prompts_for(y, shift=3)) < 0.05


def test_judge_accuracy_is_a_share_of_argmax_hits(splits):
    _, (x, y) = splits
    with torch.no_grad():
        pred = M.load_judge()(x[:40]).argmax(-1)
    assert M.judge_accuracy(x[:40], prompts_for(y[:40])) == pytest.approx((pred == y[:40]).float().mean().item())


# --- the Fréchet distance ------------------------------------------------------------------------------


def test_frechet_of_one_dimensional_gaussians_is_w2_squared():
    # W2^2(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance(stats([1.0], [[4.0]]), stats([-2.0], [[9.0]])) == pytest.approx(9 + 1)


def test_frechet_of_diagonal_covariances():
    a, b = stats([0.0, 1.0, 2.0], np.diag([1.0, 4.0, 0.25])), stats([1.0, 1.0, 0.0], np.diag([9.0, 1.0, 0.25]))
    expected = (1 + 0 + 4) + (1 - 3) ** 2 + (2 - 1) ** 2 + 0
    assert M.frechet_distance(a, b) == pytest.approx(expected)
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_frechet_matches_the_scipy_sqrtm_formula(seed, d):
    rng = np.random.default_rng(seed)
    ma, mb = rng.normal(size=d), rng.normal(size=d)
    la, lb = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    ca, cb = la @ la.T + 0.1 * np.eye(d), lb @ lb.T + 0.1 * np.eye(d)  # non-commuting SPD matrices
    # FID's own form: |mu_a - mu_b|^2 + tr(Ca + Cb - 2 sqrtm(Ca Cb))
    ref = ((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    got = M.frechet_distance(stats(ma, ca), stats(mb, cb))
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-8)
    assert M.frechet_distance(stats(mb, cb), stats(ma, ca)) == pytest.approx(got, rel=1e-6, abs=1e-8)


def test_feature_stats_are_the_judge_features_moments(splits):
    _, (x, _) = splits
    s = M.feature_stats(x[:50])
    with torch.no_grad():
        f = M.load_judge().features(x[:50]).double().numpy()  # [50, D]
    assert s.n == 50
    assert np.allclose(s.mean.numpy(), f.mean(0)) and np.allclose(s.cov.numpy(), np.cov(f, rowvar=False))
    with pytest.raises(ValueError, match="at least 2 images"):
        M.feature_stats(x[:1])


def test_fidelity_small_for_real_digits_large_for_noise_and_blank(splits):
    (xtr, _), _ = splits
    n = M.FD_EVAL_SIZE
    real = M.fidelity_distance(xtr[:n])
    noise = M.fidelity_distance(torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    blank = M.fidelity_distance(torch.zeros(n, 1, 16, 16) + 0.01 * torch.rand(n, 1, 16, 16))
    assert real < 10 and noise > 5 * real and blank > 5 * real


def test_fidelity_reference_as_pixels_or_stats_or_default(splits):
    (xtr, _), (xte, _) = splits
    a = M.fidelity_distance(xtr[:80])
    assert a == pytest.approx(M.fidelity_distance(xtr[:80], xte))
    assert a == pytest.approx(M.fidelity_distance(xtr[:80], M.feature_stats(xte)))


def test_fidelity_bias_shrinks_with_sample_size(splits):
    (xtr, _), _ = splits
    # the reason for a fixed eval size: the same distribution looks closer with more samples
    assert M.fidelity_distance(xtr) < M.fidelity_distance(xtr[:80])


# --- diversity -----------------------------------------------------------------------------------------


def loop_diversity(x, ids):
    per_group = []
    for g in sorted(set(ids.tolist())):
        members = [x[i].flatten() for i in range(len(ids)) if ids[i] == g]
        pairs = [math.dist(a.tolist(), b.tolist()) for a, b in itertools.combinations(members, 2)]
        if pairs:
            per_group.append(sum(pairs) / len(pairs))
    return sum(per_group) / len(per_group)


def test_diversity_zero_for_identical_copies_positive_otherwise():
    one = torch.rand(1, 1, 16, 16)
    assert M.group_diversity(one.expand(6, -1, -1, -1), torch.zeros(6, dtype=torch.long)) == 0.0
    assert M.group_diversity(torch.rand(6, 1, 16, 16), torch.zeros(6, dtype=torch.long)) > 0.0


def test_diversity_hand_value():
    x = torch.zeros(4, 1, 1, 2)
    x[1, 0, 0] = torch.tensor([3.0, 4.0])  # group 0: one pair at distance 5
    x[3, 0, 0] = torch.tensor([1.0, 0.0])  # group 1: one pair at distance 1
    assert M.group_diversity(x, torch.tensor([0, 0, 1, 1])) == pytest.approx((5 + 1) / 2)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(0, 3), min_size=2, max_size=12))
def test_diversity_matches_a_loop(seed, ids):
    ids = torch.tensor(ids)
    x = torch.rand(len(ids), 1, 3, 3, generator=torch.Generator().manual_seed(seed))
    got = M.group_diversity(x, ids)
    if all(int((ids == g).sum()) < 2 for g in ids.unique()):
        assert math.isnan(got)  # undefined, not 0 (which would read as collapse)
    else:
        assert got == pytest.approx(loop_diversity(x, ids), rel=1e-6)


def test_diversity_checks_group_ids_shape():
    with pytest.raises(ValueError, match="group_ids must be"):
        M.group_diversity(torch.rand(4, 1, 2, 2), torch.zeros(3))


# --- the bundle ----------------------------------------------------------------------------------------


def test_evaluate_digits_names_values_and_fixed_fd_size(splits):
    (xtr, ytr), _ = splits
    x, y = xtr[:120], ytr[:120]
    out = M.evaluate_digits(x, prompts_for(y), y)
    assert set(out) == KEYS and all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    keep = torch.linspace(0, 119, M.FD_EVAL_SIZE).round().long()
    assert out["eval/fidelity_fd"] == pytest.approx(M.fidelity_distance(x[keep]))
    assert out["eval/fidelity_n"] == M.FD_EVAL_SIZE
    assert out["eval/judge_alignment"] == pytest.approx(M.judge_alignment(x, prompts_for(y)).mean().item())
    assert out["eval/diversity"] == pytest.approx(M.group_diversity(x, y))


def test_evaluate_digits_small_batches_warn_and_use_everything(splits):
    (xtr, ytr), _ = splits
    with pytest.warns(UserWarning, match="biased upwards"):
        out = M.evaluate_digits(xtr[:20], prompts_for(ytr[:20]), torch.arange(20))
    assert out["eval/fidelity_n"] == 20 and math.isnan(out["eval/diversity"])
