"""The objective-aware per-step MOCA schemes (step-moca, profile-moca), checked by hand and by identities."""

import math

import pytest
import torch
from pydantic import ValidationError

from otca.credit import CreditConfig, CreditInputs, get_scheme, objective_step_weights, stepwise_moca_fuse
from otca.flow.schedule import make_sigmas

EPS = 1e-6
NEW = ["step-moca", "profile-moca", "reward-gain", "reward-gain-moca"]


def random_inputs(B=12, T=6, K=3, G=4, seed=0, mask=None):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, K, generator=g) * torch.tensor([1.0, 5.0, 0.2])[:K]
    sr = torch.randn(B, T + 1, K, generator=g).cumsum(1)
    gains = torch.randn(B, T, generator=g) * 0.1
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    return CreditInputs(rewards, torch.arange(B) // (B // G), mask, make_sigmas(T), gains, step_rewards=sr)


def profile_for(K, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(tuple(float(x) for x in row) for row in torch.randn(K, T, generator=g))


@pytest.mark.parametrize("name", NEW)
def test_new_schemes_contract(name):
    B, T, K = 12, 6, 3
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[3] = False  # a sample with no trained step
    inputs = random_inputs(B, T, K, mask=mask)
    cfg = CreditConfig(adv_clip=0.3, step_profile=profile_for(K, T))
    out = get_scheme(name)(inputs, cfg)
    assert out.advantages.shape == (B, T) and out.weights.shape == (B, T) and out.per_sample.shape == (B,)
    assert out.objective_advantages.shape == (B, K) and out.coefficients.shape == (B, K)
    for t in (out.advantages, out.weights, out.per_sample, out.objective_advantages, out.coefficients):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert torch.equal(out.advantages[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(out.weights[~mask], torch.zeros(int((~mask).sum())))
    rows = mask.any(1)
    torch.testing.assert_close((out.weights.sum(1) / mask.sum(1).clamp_min(1))[rows], torch.ones(int(rows.sum())))
    assert (out.weights >= 0).all() and out.per_sample.abs().max() <= 0.3
    torch.testing.assert_close(out.advantages, out.weights * out.per_sample[:, None])
    assert (out.coefficients >= 0).all()
    torch.testing.assert_close(out.coefficients.sum(1), torch.ones(B))
    for v in out.metrics.values():
        assert isinstance(v, float) and math.isfinite(v)


@pytest.mark.parametrize("name", ["step-moca", "profile-moca"])
def test_flat_profiles_are_moca(name):
    inputs = random_inputs()
    flat = CreditConfig(w_min=1.0, step_profile=profile_for(3, 6))
    moca = get_scheme("moca")(inputs, flat)
    out = get_scheme(name)(inputs, flat)
    torch.testing.assert_close(out.per_sample, moca.per_sample, atol=1e-7, rtol=0)
    torch.testing.assert_close(out.advantages, moca.advantages, atol=1e-7, rtol=0)
    torch.testing.assert_close(out.coefficients, moca.coefficients)
    assert out.metrics["frac_fused_zero"] == moca.metrics["frac_fused_zero"]
    # a zero profile is flat too (relu(0) + eps on every step), whatever the floor
    zero = CreditConfig(step_profile=((0.0,) * 6,) * 3)
    torch.testing.assert_close(get_scheme("profile-moca")(inputs, zero).advantages,
                               get_scheme("moca")(inputs, zero).advantages, atol=1e-7, rtol=0)


def closed_form_fuse(A, w, tanh_e, eps=EPS):
    """MOCA's fused value clip(lambda / 2, min, max) per (sample, step), written out (the Alg. 1 identity)."""
    B, T, K = w.shape
    z = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            row = [float(w[b, t, j]) * float(A[b, j]) for j in range(K)]
            s = sum(row)
            lam = max(s, 0.0) / (abs(s) + eps) * float(tanh_e[b])
            z[b, t] = min(max(lam / 2, min(row)), max(row))
    return z


def test_stepwise_fuse_against_the_closed_form():
    g = torch.Generator().manual_seed(2)
    B, T, K = 10, 5, 3
    A = torch.randn(B, K, generator=g)
    w = objective_step_weights(torch.randn(B, T, K, generator=g), None, EPS, 0.3)
    tanh_e = torch.rand(B, generator=g)
    z, c, lam = stepwise_moca_fuse(A, w, tanh_e)
    torch.testing.assert_close(z.double(), closed_form_fuse(A, w, tanh_e), atol=1e-6, rtol=0)
    torch.testing.assert_close((c * (w * A[:, None, :])).sum(-1), z, atol=1e-6, rtol=0)  # z = c . A_step
    assert (lam >= 0).all() and (lam <= 1).all()
    # a sample's fused values never change sign across steps (the module docstring's claim)
    assert not ((z > 1e-7).any(1) & (z < -1e-7).any(1)).any()
    with pytest.raises(ValueError, match="advantages, tanh_e: expected"):
        stepwise_moca_fuse(A[:, :2], w, tanh_e)


def test_profile_moca_by_hand():
    # one group of four, two objectives, two steps (all trained). Both objectives have mean 0 and unbiased std
    # sqrt(20/3), so A = rewards * a. Equal TCD gains: std(q) = 0, so e is huge and tanh(e) = 1.
    rewards = torch.tensor([[3.0, 1.0], [1.0, -3.0], [-1.0, 3.0], [-3.0, -1.0]])
    a = 1 / math.sqrt(20 / 3)
    inputs = CreditInputs(rewards, torch.zeros(4, dtype=torch.long), torch.ones(4, 2, dtype=torch.bool),
                          make_sigmas(2), torch.full((4, 2), 0.1))
    # objective 0 forms early, objective 1 late; without a floor the weights are ~(2, 0) and ~(0, 2)
    cfg = CreditConfig(w_min=0.0, step_profile=((1.0, -1.0), (-1.0, 1.0)))
    out = get_scheme("profile-moca")(inputs, cfg)
    hi, lo = 2 * (1 + EPS) / (1 + 2 * EPS), 2 * EPS / (1 + 2 * EPS)
    w = torch.tensor([[hi, lo], [lo, hi]])  # [T, K]
    torch.testing.assert_close(out.objective_advantages, rewards * a)
    want_z = closed_form_fuse(rewards * a, w.expand(4, 2, 2), torch.ones(4))  # [4, 2]
    # by hand, rows (w_0 A_0, w_1 A_1) per step and clip(lambda / 2, min, max):
    #   sample 0 (3a, a):   all positive at both steps -> 0.5, 0.5 (lambda ~ 1, inside the bracket)
    #   sample 1 (a, -3a):  step 0 (2a, -0) sums > 0 -> 0.5; step 1 (0, -6a) sums < 0 -> 0
    #   sample 2 (-a, 3a):  step 0 (-2a, 0) -> 0; step 1 (-0, 6a) -> 0.5
    #   sample 3 (-3a, -a): all negative -> the mildest: -a lo, then -3a lo
    hand = torch.tensor([[0.5, 0.5], [0.5, 0.0], [0.0, 0.5], [-a * lo, -3 * a * lo]], dtype=torch.float64)
    torch.testing.assert_close(want_z, hand, atol=2e-6, rtol=0)
    torch.testing.assert_close(out.advantages.double(), want_z, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.per_sample.double(), want_z.mean(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.weights[:3], torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.weights[3], torch.tensor([0.5, 1.5]), atol=1e-4, rtol=0)
    # uniform-profile MOCA gives sample 1 nothing (its objectives sum < 0) and sample 2 0.5 at both steps; here
    # each mixed sample is credited at the step where its positive objective forms
    moca = get_scheme("moca")(inputs, cfg)
    torch.testing.assert_close(moca.advantages[1:3], torch.tensor([[0.0, 0.0], [0.5, 0.5]]), atol=1e-6, rtol=0)
    assert moca.metrics["frac_fused_zero"] == 0.25 and out.metrics["frac_fused_zero"] == 0.0
    # mean Alg. 1 coefficients over the first and the second half of the trained steps, each on the simplex
    assert out.metrics["coef_early/0"] + out.metrics["coef_early/1"] == pytest.approx(1.0)
    assert out.metrics["coef_late/0"] + out.metrics["coef_late/1"] == pytest.approx(1.0)


def test_clip_scales_the_whole_row():
    inputs = random_inputs()
    cfg = CreditConfig(step_profile=profile_for(3, 6))
    free = get_scheme("step-moca")(inputs, cfg.model_copy(update={"adv_clip": 100.0}))
    clipped = get_scheme("step-moca")(inputs, cfg.model_copy(update={"adv_clip": 0.1}))
    torch.testing.assert_close(clipped.weights, free.weights)  # the step shape is kept
    torch.testing.assert_close(clipped.per_sample, free.per_sample.clamp(-0.1, 0.1))
    assert clipped.metrics["frac_clipped"] == float((free.per_sample.abs() > 0.1).float().mean())


def test_mask_drops_steps_and_renormalises_each_objective():
    B, T = 12, 6
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, -1] = False
    inputs, masked = random_inputs(), random_inputs(mask=mask)
    cfg = CreditConfig()
    out = get_scheme("step-moca")(masked, cfg)
    assert torch.equal(out.advantages[:, -1], torch.zeros(B))
    nonzero = out.per_sample != 0
    torch.testing.assert_close(out.weights[:, :-1].mean(1)[nonzero], torch.ones(int(nonzero.sum())))
    # unlike the factorised schemes, the per-sample advantage depends on the mask: each objective's profile is
    # renormalised over the trained steps before the per-step fusion
    full = get_scheme("step-moca")(inputs, cfg)
    assert not torch.allclose(full.per_sample, out.per_sample)
    torch.testing.assert_close(get_scheme("moca")(masked, cfg).per_sample, get_scheme("moca")(inputs, cfg).per_sample)


def test_profile_errors():
    inputs = random_inputs()
    with pytest.raises(ValueError, match="^CreditConfig.step_profile: this scheme needs a per-objective step profile"):
        get_scheme("profile-moca")(inputs, CreditConfig())
    with pytest.raises(ValueError, match="CreditConfig.step_profile: expected 3 lists \\(one per reward\\) of 6 "
                                         "numbers \\(one per transition\\), got 2 lists of 6"):
        get_scheme("profile-moca")(inputs, CreditConfig(step_profile=profile_for(2, 6)))
    with pytest.raises(ValidationError, match="same length"):
        CreditConfig(step_profile=((1.0, 2.0), (1.0,)))
    with pytest.raises(ValidationError, match="finite"):
        CreditConfig(step_profile=((1.0, float("nan")),))
    assert CreditConfig(step_profile=[[1, 2], [3, 4]]).step_profile == ((1.0, 2.0), (3.0, 4.0))  # YAML lists
