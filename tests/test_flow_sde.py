"""SDE transitions, their log-densities, the ODE step and the KL: hand-computed cases, torch.distributions
references, the peers' literal formulas, analytic paths, sampling statistics and the bitwise ratio-1 check."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from otca.flow import (
    dance_sde_step,
    flow_sde_step,
    gaussian_log_prob,
    get_transition,
    kl_to_reference,
    make_sigmas,
    ode_step,
    predict_x0,
)

NAMES = ["flow-sde", "dance-sde"]


def _latents(b=3, shape=(2, 4, 4), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g).to(dtype)
    v = torch.randn(b, *shape, generator=g).to(dtype)
    return x, v


def _scalar(value):
    return torch.tensor([[value]], dtype=torch.float32)  # [B=1, D=1]


# --- the shared log-density -------------------------------------------------------------------------------


def test_gaussian_log_prob_matches_torch_distributions():
    x, mean = _latents()
    std = torch.tensor([0.3, 1.0, 2.5]).reshape(3, 1, 1, 1)
    ref = Normal(mean, std.expand_as(mean)).log_prob(x)  # [B, *latent]
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduce="sum"), ref.sum(dim=(1, 2, 3)))


def test_gaussian_log_prob_is_fp32_for_bf16_input():
    x, mean = _latents(dtype=torch.bfloat16)
    out = gaussian_log_prob(x, mean, torch.tensor(0.5))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, Normal(mean.float(), 0.5).log_prob(x.float()).mean(dim=(1, 2, 3)))


def test_bad_reduce():
    x, mean = _latents()
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, mean, torch.tensor(1.0), reduce="max")


# --- transitions: hand-computed and literal peer formulas ----------------------------------------------------


def test_flow_sde_hand_computed():
    # g = 0.4 * sqrt(0.8 / 0.2) = 0.8 ; dt = -0.2 ; g^2 / (2 sigma) = 0.64 / 1.6 = 0.4
    # mean = 1 * (1 - 0.4 * 0.2) + 0.5 * (1 + 0.4 * 0.2) * (-0.2) = 0.92 - 0.108 = 0.812 ; std = 0.8 * sqrt(0.2)
    _, _, mean, std = flow_sde_step(_scalar(1.0), _scalar(0.5), 0.8, 0.6, eta=0.4, noise=_scalar(0.0))
    torch.testing.assert_close(mean, _scalar(0.812))
    torch.testing.assert_close(std.flatten(), torch.tensor([0.8 * math.sqrt(0.2)]))


def test_dance_sde_hand_computed():
    # x0_hat = 1 - 0.5 * 0.5 = 0.75 ; score = -(1 - 0.5 * 0.75) / 0.25 = -2.5 ; dsigma = -0.25
    # mean = 1 - 0.25 * 0.5 + (-0.5 * 0.16 * -2.5) * (-0.25) = 0.875 - 0.05 = 0.825 ; std = 0.4 * sqrt(0.25) = 0.2
    _, _, mean, std = dance_sde_step(_scalar(1.0), _scalar(0.5), 0.5, 0.25, eta=0.4, noise=_scalar(0.0))
    torch.testing.assert_close(mean, _scalar(0.825))
    torch.testing.assert_close(std.flatten(), torch.tensor([0.2]))


def test_flow_sde_matches_flow_grpo_formula_on_tensors():
    x, v = _latents()
    sigma, sigma_next, eta = 0.7, 0.55, 0.9
    std_t = eta * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    ref_mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    _, _, mean, std = flow_sde_step(x, v, sigma, sigma_next, eta=eta)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(std.flatten(), torch.full((3,), std_t * math.sqrt(-dt)))


def test_dance_sde_matches_dancegrpo_formula_on_tensors():
    x, v = _latents()
    sigma, sigma_next, eta = 0.7, 0.55, 0.3
    dsigma = sigma_next - sigma
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    ref_mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    _, _, mean, std = dance_sde_step(x, v, sigma, sigma_next, eta=eta)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(std.flatten(), torch.full((3,), eta * math.sqrt(sigma - sigma_next)))


def test_sde_with_g_equal_eta_coincide():
    # sigma = 0.5 makes Flow-SDE's g = eta * sqrt(0.5 / 0.5) = eta, i.e. Dance-SDE's
    x, v = _latents()
    flow = flow_sde_step(x, v, 0.5, 0.3, eta=0.6, noise=torch.zeros_like(x))
    dance = dance_sde_step(x, v, 0.5, 0.3, eta=0.6, noise=torch.zeros_like(x))
    for a, b in zip(flow, dance, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_transition_log_prob_matches_torch_distributions(name, reduce):
    x, v = _latents()
    x_next, log_prob, mean, std = get_transition(name)(x, v, 0.6, 0.4, eta=0.7, reduce=reduce)
    ref = Normal(mean, std.expand_as(mean)).log_prob(x_next)
    torch.testing.assert_close(log_prob, getattr(ref, reduce)(dim=(1, 2, 3)))


# --- sigma = 1, eta = 0, the ODE step --------------------------------------------------------------------------


def test_flow_sde_first_step_is_finite_with_std_eta():
    sigmas = make_sigmas(10, shift=3.0)
    x, v = _latents()
    x_next, log_prob, mean, std = flow_sde_step(x, v, sigmas[0].item(), sigmas[1].item(), eta=0.7)
    assert all(bool(t.isfinite().all()) for t in (x_next, log_prob, mean, std))
    # default sigma_max = sigma_next: g = eta * sqrt(1 / (1 - s1)), std = g * sqrt(1 - s1) = eta
    torch.testing.assert_close(std.flatten(), torch.full((3,), 0.7))


def test_flow_sde_explicit_sigma_max_only_acts_at_sigma_one():
    x, v = _latents()
    sigma = torch.tensor([1.0, 0.9, 1.0])
    _, _, _, std = flow_sde_step(x, v, sigma, 0.8, eta=0.5, sigma_max=0.95)
    expected = [0.5 * math.sqrt(1 / 0.05) * math.sqrt(0.2), 0.5 * math.sqrt(0.9 / 0.1) * math.sqrt(0.1)]
    torch.testing.assert_close(std.flatten(), torch.tensor([expected[0], expected[1], expected[0]]))


def test_ode_step_hand_computed_and_dtype():
    torch.testing.assert_close(ode_step(_scalar(1.0), _scalar(0.5), 0.8, 0.6), _scalar(0.9))
    x, v = _latents(dtype=torch.bfloat16)
    assert ode_step(x, v, 0.5, 0.25).dtype == torch.bfloat16


def test_ode_on_straight_path_reaches_data():
    # z_sigma = (1 - sigma) x0 + sigma eps has the constant velocity eps - x0, so Euler is exact on any schedule.
    x0, eps = _latents()
    sigmas = make_sigmas(7, shift=3.0)
    z = eps
    for k in range(7):
        z = ode_step(z, eps - x0, sigmas[k].item(), sigmas[k + 1].item())
    torch.testing.assert_close(z, x0)
    torch.testing.assert_close(predict_x0(0.3 * x0 + 0.7 * eps, eps - x0, 0.7), x0)


def test_predict_x0_hand_computed_and_per_sample_sigma():
    x = torch.tensor([[1.0], [2.0]])
    v = torch.tensor([[0.5], [-1.0]])
    torch.testing.assert_close(predict_x0(x, v, torch.tensor([0.2, 0.5])), torch.tensor([[0.9], [2.5]]))


@pytest.mark.parametrize("name", NAMES)
def test_eta_zero_is_the_ode_step(name):
    x, v = _latents()
    x_next, _, mean, std = get_transition(name)(x, v, 1.0, 0.8, eta=0.0)
    ode = ode_step(x, v, 1.0, 0.8)
    torch.testing.assert_close(mean, ode)
    torch.testing.assert_close(x_next, ode)
    assert bool((std == 0).all())


# --- sampling and the ratio-1 contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sample_sigma", [False, True])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_sample_then_evaluate_is_bitwise_equal(name, dtype, per_sample_sigma, reduce):
    step = get_transition(name)
    x, v = _latents(b=4, dtype=dtype)
    sigmas = make_sigmas(8, shift=3.0)
    for k in range(8):
        sigma, sigma_next = sigmas[k].item(), sigmas[k + 1].item()
        if per_sample_sigma:
            sigma, sigma_next = torch.full((4,), sigma), torch.full((4,), sigma_next)
        g = torch.Generator().manual_seed(k)
        x_next, log_prob, _, _ = step(x, v, sigma, sigma_next, eta=0.8, reduce=reduce, generator=g)
        assert x_next.dtype == dtype and log_prob.dtype == torch.float32
        again, log_prob_again, _, _ = step(x, v, sigma, sigma_next, eta=0.8, reduce=reduce, prev=x_next)
        assert again is x_next
        assert torch.equal(log_prob, log_prob_again)
        assert bool((torch.exp(log_prob_again - log_prob) == 1).all())
        x = x_next


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    sigma=st.floats(0.02, 1.0),
    frac=st.floats(0.0, 0.95),
    eta=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_ratio_one_and_finite_for_any_step(name, sigma, frac, eta, seed):
    sigma_next = sigma * frac
    x, v = _latents(b=2, shape=(3, 5), seed=seed, dtype=torch.bfloat16)
    step = get_transition(name)
    x_next, log_prob, _, _ = step(x, v, sigma, sigma_next, eta=eta, generator=torch.Generator().manual_seed(seed))
    _, log_prob_again, _, _ = step(x, v, sigma, sigma_next, eta=eta, prev=x_next)
    assert torch.equal(log_prob, log_prob_again)
    assert bool(log_prob.isfinite().all())


@pytest.mark.parametrize("name", NAMES)
def test_given_noise_and_generator_reproduce(name):
    step = get_transition(name)
    x, v = _latents()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x_next, _, mean, std = step(x, v, 0.9, 0.7, eta=0.5, noise=noise)
    torch.testing.assert_close(x_next, mean + std * noise)
    drawn = step(x, v, 0.9, 0.7, eta=0.5, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(drawn, x_next)


@pytest.mark.parametrize("name", NAMES)
def test_samples_have_the_stated_mean_and_std(name):
    n = 20000
    x, v = _latents(b=1, shape=(4,))
    x, v = x.expand(n, 4), v.expand(n, 4)
    x_next, _, mean, std = get_transition(name)(x, v, 0.75, 0.5, eta=0.7, generator=torch.Generator().manual_seed(0))
    s = std[0, 0].item()
    # 5 standard errors of the sample mean and of the sample std
    assert (x_next.mean(0) - mean[0]).abs().max().item() < 5 * s / math.sqrt(n)
    assert (x_next.std(0) / s - 1).abs().max().item() < 5 / math.sqrt(2 * n)


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_gradient_treats_the_action_as_constant(name):
    # d/dv of mean_d log N(prev; mean(v), std^2) = (prev - mean) / (std^2 D) * dmean/dv, and for both SDEs
    # dmean/dv = dt * (1 + g^2 (1 - sigma) / (2 sigma)). At sampling time prev - mean = std * noise is not 0.
    x, v = _latents()
    v.requires_grad_(True)
    sigma, sigma_next, eta = 0.6, 0.45, 0.7
    x_next, log_prob, mean, std = get_transition(name)(x, v, sigma, sigma_next, eta=eta, generator=torch.Generator())
    log_prob.sum().backward()
    dt = sigma_next - sigma
    g = std[0].item() / math.sqrt(-dt)
    dmean_dv = dt * (1 + g**2 * (1 - sigma) / (2 * sigma))
    expected = (x_next - mean).detach() / std**2 / x[0].numel() * dmean_dv
    torch.testing.assert_close(v.grad, expected)


# --- registry, KL, bad input -------------------------------------------------------------------------------------


def test_registry():
    assert get_transition("flow-sde") is flow_sde_step
    assert get_transition("dance-sde") is dance_sde_step
    with pytest.raises(KeyError, match="cps, dance-sde, flow-sde"):
        get_transition("ddpm")


def test_kl_to_reference_matches_torch_distributions():
    mean, ref = _latents()
    std = torch.tensor([0.2, 0.5, 1.5]).reshape(3, 1, 1, 1)
    expected = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(ref, std.expand_as(ref))).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl_to_reference(mean, ref, std), expected)
    assert torch.equal(kl_to_reference(mean, mean, std), torch.zeros(3))


@pytest.mark.parametrize(
    "sigma, sigma_next, kwargs, match",
    [
        (0.5, 0.5, {}, "sigma_next < sigma"),
        (0.5, 0.6, {}, "sigma_next < sigma"),
        (1.2, 0.5, {}, "sigma <= 1"),
        (0.5, -0.1, {}, "0 <= sigma_next"),
        (1.0, 0.5, {"sigma_max": 1.0}, "sigma_max < 1"),
        (torch.tensor([0.5, 0.4]), 0.3, {}, r"\[B\] tensor with B=3"),
        (0.5, 0.3, {"eta": -1.0}, "eta"),
        (0.5, 0.3, {"reduce": "median"}, "reduce"),
        (0.5, 0.3, {"prev": torch.zeros(3, 2)}, "prev"),
        (0.5, 0.3, {"noise": torch.zeros(1)}, "noise"),
    ],
)
def test_bad_input_is_a_clear_error(sigma, sigma_next, kwargs, match):
    x, v = _latents()
    kwargs = {"eta": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        flow_sde_step(x, v, sigma, sigma_next, **kwargs)


def test_batch_only_latent_is_rejected():
    with pytest.raises(ValueError, match="at least one latent dim"):
        dance_sde_step(torch.zeros(3), torch.zeros(3), 0.5, 0.3, eta=0.5)
