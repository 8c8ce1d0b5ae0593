"""Coefficients-Preserving Sampling (CPS, arXiv 2509.05952; Flow-GRPO's ``sde_type='cps'``): hand-computed
steps, the peers' literal formula, the coefficient-preserving property on an exact velocity, the ODE limit,
sampling then re-evaluating (ratio exactly 1) and the relation to Flow-GRPO's unnormalised log-probability."""

import math

import pytest
import torch
from torch.distributions import Normal

from otca.flow import cps_step, get_transition, make_sigmas, ode_step


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor([[value]], dtype=torch.float32)  # [B=1, D=1]


def _latents(b=3, shape=(2, 4, 4), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g).to(dtype), torch.randn(b, *shape, generator=g).to(dtype)


def test_registered_as_cps():
    assert get_transition("cps") is cps_step


def test_hand_computed_step():
    # sigma 0.8 -> 0.6, eta 0.5: std = 0.6 sin(pi/4) = 0.3 sqrt(2); x0_hat = 1 - 0.8 * 0.5 = 0.6;
    # eps_hat = 1 + 0.2 * 0.5 = 1.1; sqrt(0.36 - 0.18) = 0.3 sqrt(2); mean = 0.4 * 0.6 + 0.3 sqrt(2) * 1.1
    x_next, log_prob, mean, std = cps_step(_scalar(1.0), _scalar(0.5), 0.8, 0.6, eta=0.5, noise=_scalar(1.0))
    s = 0.3 * math.sqrt(2)
    torch.testing.assert_close(mean, _scalar(0.24 + 1.1 * s))
    torch.testing.assert_close(std.flatten(), torch.tensor([s]))
    torch.testing.assert_close(x_next, _scalar(0.24 + 2.1 * s))  # mean + std * 1
    # log N(mean + std; mean, std^2) = -1/2 - log(std) - log sqrt(2 pi)
    torch.testing.assert_close(log_prob, torch.tensor([-0.5 - math.log(s) - 0.5 * math.log(2 * math.pi)]))


def test_first_step_from_pure_noise_hand_computed():
    # sigma 1 -> 0.75, eta 1: std = 0.75, the eps_hat coefficient sqrt(0.75^2 - 0.75^2) = 0; x0_hat = 2 - 1 = 1
    _, _, mean, std = cps_step(_scalar(2.0), _scalar(1.0), 1.0, 0.75, eta=1.0, noise=_scalar(0.0))
    torch.testing.assert_close(mean, _scalar(0.25))
    torch.testing.assert_close(std.flatten(), torch.tensor([0.75]))


def test_matches_flow_grpo_literal_formula_on_tensors():
    """Flow-GRPO ``sd3_sde_with_logprob.py`` (``sde_type='cps'``), written out term by term in float64."""
    x, v = _latents()
    sigma, sigma_prev, a = 0.7, 0.55, 0.8
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    xd, vd = x.double(), v.double()
    std_dev_t = sigma_prev * math.sin(a * math.pi / 2)
    pred_original_sample = xd - sigma * vd
    noise_estimate = xd + vd * (1 - sigma)
    root = math.sqrt(sigma_prev**2 - std_dev_t**2)
    prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * root
    prev_sample = prev_sample_mean + std_dev_t * noise.double()
    x_next, _, mean, std = cps_step(x, v, sigma, sigma_prev, eta=a, noise=noise)
    torch.testing.assert_close(mean.double(), prev_sample_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_next.double(), prev_sample, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, torch.full_like(std, std_dev_t))


def test_log_ratio_is_flow_grpo_unnormalised_log_ratio_over_two_std_squared():
    """Flow-GRPO scores CPS with ``-(x' - mean)^2`` (mean over dims): its log-ratio between two velocities is ours
    times ``2 std^2`` (the constants cancel in a ratio)."""
    x, v = _latents()
    v2 = v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
    x_next, lp_old, mean_old, std = cps_step(x, v, 0.6, 0.4, eta=0.7, generator=torch.Generator().manual_seed(3))
    _, lp_new, mean_new, _ = cps_step(x, v2, 0.6, 0.4, eta=0.7, prev=x_next)
    flow_grpo = (-((x_next - mean_new) ** 2)).mean((1, 2, 3)) - (-((x_next - mean_old) ** 2)).mean((1, 2, 3))
    s = float(std.flatten()[0])
    torch.testing.assert_close(lp_new - lp_old, flow_grpo / (2 * s**2), rtol=1e-4, atol=1e-5)


def test_log_prob_matches_torch_distributions():
    x, v = _latents()
    x_next, log_prob, mean, std = cps_step(x, v, 0.9, 0.5, eta=0.6, generator=torch.Generator().manual_seed(0))
    ref = Normal(mean, std.expand_as(mean)).log_prob(x_next)
    torch.testing.assert_close(log_prob, ref.mean((1, 2, 3)))
    _, log_sum, _, _ = cps_step(x, v, 0.9, 0.5, eta=0.6, prev=x_next, reduce="sum")
    torch.testing.assert_close(log_sum, ref.sum((1, 2, 3)))


def test_eta_zero_is_the_euler_ode_step():
    x, v = _latents()
    x_next, _, mean, std = cps_step(x, v, 0.8, 0.5, eta=0.0)
    torch.testing.assert_close(mean, ode_step(x, v, 0.8, 0.5))
    torch.testing.assert_close(x_next, mean)
    assert bool((std == 0).all())


def test_preserves_the_forward_coefficients_with_the_exact_velocity():
    """z = (1 - s) x0 + s e and v = e - x0: x_next - (1 - s') x0 has mean 0 and std exactly s' (the noise
    coefficient of the forward process at s'), whatever eta; Flow-SDE does not (its std overshoots)."""
    n, d = 40000, 2
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    s, s_next = 0.7, 0.4
    z, v = (1 - s) * x0 + s * e, e - x0
    for eta in (0.3, 0.8, 1.0):
        x_next, _, _, _ = cps_step(z, v, s, s_next, eta=eta, generator=g)
        resid = x_next - (1 - s_next) * x0  # [n, d]
        assert abs(float(resid.mean())) < 5 * s_next / math.sqrt(n * d)
        assert abs(float(resid.std()) / s_next - 1) < 5 / math.sqrt(2 * n * d)
    flow, _, _, _ = get_transition("flow-sde")(z, v, s, s_next, eta=0.8, generator=g)
    assert float((flow - (1 - s_next) * x0).std()) > 1.05 * s_next


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_sample_then_evaluate_gives_ratio_exactly_one(dtype, reduce):
    x, v = _latents(b=4, dtype=dtype)
    sigmas = make_sigmas(8, shift=3.0)
    for k in range(7):  # the last step (sigma_next = 0) is deterministic: no density
        sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
        x_next, log_prob, _, _ = cps_step(
            x, v, sigma, sigma_next, eta=0.8, reduce=reduce, generator=torch.Generator().manual_seed(k)
        )
        assert x_next.dtype == dtype and log_prob.dtype == torch.float32 and bool(log_prob.isfinite().all())
        again, log_prob_again, _, _ = cps_step(x, v, sigma, sigma_next, eta=0.8, reduce=reduce, prev=x_next)
        assert again is x_next and torch.equal(log_prob, log_prob_again)
        assert bool((torch.exp(log_prob_again - log_prob) == 1).all())
        x = x_next


def test_last_step_is_deterministic_without_density():
    x, v = _latents()
    x_next, log_prob, mean, std = cps_step(x, v, 0.1, 0.0, eta=0.8, generator=torch.Generator())
    torch.testing.assert_close(x_next, x - 0.1 * v)  # the clean prediction
    assert bool((std == 0).all()) and bool(log_prob.isnan().all())


def test_bad_eta_and_sigmas_are_clear_errors():
    x, v = _latents()
    with pytest.raises(ValueError, match=r"CPS expects a noise level in \[0, 1\]"):
        cps_step(x, v, 0.5, 0.3, eta=1.5)
    with pytest.raises(ValueError, match="eta"):
        cps_step(x, v, 0.5, 0.3, eta=-0.1)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        cps_step(x, v, 0.5, 0.6, eta=0.5)
