"""GRPO-Guard's RatioNorm with per-step gradient reweighting (arXiv 2510.22319) behind ``policy_loss``:
a hand-computed one-dimensional step, the official code's formula transcribed literally (value and gradient),
the bias it removes (sampled), the default guard being the plain loss, bad input."""

import math

import pytest
import torch

from otca.flow import RATIO_GUARDS, StepGeometry, flow_sde_step, gaussian_log_prob, policy_loss


def test_hand_computed_one_dimensional_step():
    # old mean 0, new mean d = 0.1, std s = 0.5, x' = 0.6 (eps = 1.2): log r = (2 x' d - d^2) / (2 s^2) = 0.22,
    # bias d^2 / (2 s^2) = 0.02, log r_hat = s (0.22 + 0.02) = 0.12 (= eps d); weight 1 / dt = 1 / 0.2 = 5.
    # A = 1, clip 0.05: r_hat = e^0.12 = 1.1275 -> -min(1.1275, 1.05) * 5 = -5.25
    x_next, s = torch.tensor([[0.6]]), torch.tensor([[0.5]])
    new = gaussian_log_prob(x_next, torch.tensor([[0.1]]), s)
    old = gaussian_log_prob(x_next, torch.tensor([[0.0]]), s)
    torch.testing.assert_close(new - old, torch.tensor([0.22]))
    geometry = StepGeometry(torch.tensor([[0.01]]), torch.tensor([[0.5]]), torch.tensor([[0.2]]))
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, m = policy_loss(new[:, None], old[:, None], torch.ones(1, 1), mask, clip_range=0.05,
                          ratio_guard="ratio-norm", geometry=geometry)
    assert loss.item() == pytest.approx(-5.25, abs=1e-5)
    assert m["ratio_mean"] == pytest.approx(math.exp(0.12), abs=1e-5) and m["clip_frac"] == 1.0
    plain, _ = policy_loss(new[:, None], old[:, None], torch.ones(1, 1), mask, clip_range=0.05)
    assert plain.item() == pytest.approx(-1.05, abs=1e-6)  # e^0.22 is clipped too, weight 1


def _official(logp, logp_old, mean, old_mean, std, dt, adv, clip):
    """The official code's ratio and loss for one step, written out (train_sd3_GRPO_Guard.py as read):
    ratio = exp((logp - logp_old + mse / (2 s^2)) * s), loss = mean(-min(ratio A, clip(ratio) A)) / sqrt_dt^2."""
    s = std
    mse = ((mean - old_mean) ** 2).mean(dim=tuple(range(1, mean.dim())))
    ratio = torch.exp((logp - logp_old + mse / (2 * s**2)) * s)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    return torch.mean(torch.maximum(unclipped, clipped)) / math.sqrt(dt) ** 2


@pytest.mark.parametrize("clip", [1e-1, 2e-6])
def test_matches_the_official_formula_in_value_and_gradient(clip):
    g = torch.Generator().manual_seed(0)
    x, v_old = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    sigma, sigma_next, eta = 0.7, 0.6, 0.9
    x_next, logp_old, old_mean, std = flow_sde_step(x, v_old, sigma, sigma_next, eta=eta, generator=g)
    v = (v_old + 0.02 * torch.randn(v_old.shape, generator=g)).requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])

    _, logp, mean, _ = flow_sde_step(x, v, sigma, sigma_next, eta=eta, prev=x_next)
    ref = _official(logp, logp_old, mean, old_mean, float(std.flatten()[0]), sigma - sigma_next, adv, clip)
    (ref_grad,) = torch.autograd.grad(ref, v)

    _, logp, mean, _ = flow_sde_step(x, v, sigma, sigma_next, eta=eta, prev=x_next)
    geometry = StepGeometry.of_step(mean, old_mean, std, sigma, sigma_next)
    assert geometry.mean_sq_dev.shape == geometry.std.shape == geometry.dt.shape == (4, 1)
    loss, _ = policy_loss(logp[:, None], logp_old[:, None], adv[:, None], torch.ones(4, 1, dtype=torch.bool),
                          clip_range=clip, ratio_guard="ratio-norm", geometry=geometry)
    (grad,) = torch.autograd.grad(loss, v)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-9)


def test_removes_the_negative_bias_of_the_log_ratio():
    """Over eps: E[log r] = -mean(d^2) / (2 s^2) < 0 (the left shift the paper reports); E[log r_hat] = 0."""
    n, dim, s = 20000, 8, 0.3
    g = torch.Generator().manual_seed(1)
    old_mean = torch.zeros(n, dim)
    d = 0.05 * torch.randn(1, dim, generator=g).expand(n, dim)
    x_next = old_mean + s * torch.randn(n, dim, generator=g)
    std = torch.tensor(s)
    log_r = gaussian_log_prob(x_next, old_mean + d, std) - gaussian_log_prob(x_next, old_mean, std)
    bias = float((d[0] ** 2).mean() / (2 * s**2))
    geometry = StepGeometry((d**2).mean(1)[:, None], torch.full((n, 1), s), torch.full((n, 1), 0.1))
    guarded, weight = RATIO_GUARDS.get("ratio-norm")(log_r[:, None], geometry)
    se = float(log_r.std()) / math.sqrt(n)
    assert abs(float(log_r.mean()) + bias) < 5 * se and bias > 10 * se  # the bias is there, and measured
    assert abs(float(guarded.mean())) < 5 * float(guarded.std()) / math.sqrt(n)
    torch.testing.assert_close(weight, torch.full((n, 1), 10.0))


def test_default_guard_is_the_plain_loss_and_registry_flags():
    assert set(RATIO_GUARDS.names()) >= {"none", "ratio-norm"}
    assert not RATIO_GUARDS.get("none").needs_geometry and RATIO_GUARDS.get("ratio-norm").needs_geometry
    g = torch.Generator().manual_seed(2)
    lp, old, adv = (torch.randn(3, 4, generator=g) * 0.01 for _ in range(3))
    mask = torch.rand(3, 4, generator=g) > 0.3
    a, ma = policy_loss(lp, old, adv, mask, clip_range=0.005)
    b, mb = policy_loss(lp, old, adv, mask, clip_range=0.005, ratio_guard="none")
    assert torch.equal(a, b) and ma == mb


def test_masked_entries_with_bad_geometry_give_no_nan():
    lp = torch.zeros(2, 2, requires_grad=True)
    mask = torch.tensor([[True, False], [True, False]])
    geometry = StepGeometry(torch.tensor([[0.0, math.inf]] * 2), torch.tensor([[0.5, 0.0]] * 2),
                            torch.tensor([[0.1, 0.0]] * 2))
    loss, _ = policy_loss(lp, torch.zeros(2, 2), torch.ones(2, 2), mask, ratio_guard="ratio-norm", geometry=geometry)
    loss.backward()
    assert math.isfinite(loss.item()) and bool(lp.grad.isfinite().all()) and bool((lp.grad[:, 1] == 0).all())


def test_bad_input_is_a_clear_error():
    z, m = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs the step geometry"):
        policy_loss(z, z, z, m, ratio_guard="ratio-norm")
    with pytest.raises(ValueError, match="geometry.std"):
        policy_loss(z, z, z, m, ratio_guard="ratio-norm", geometry=StepGeometry(z, torch.ones(2, 1), z + 1))
    with pytest.raises(KeyError, match="none, ratio-norm"):
        policy_loss(z, z, z, m, ratio_guard="guard")
