"""kl_to_reference's two forms: hand-computed values, Flow-GRPO's literal formula on a real step, the ratio
between the forms on the 10-step shift-3 schedule, and bad input."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from otca.flow import KL_FORMS, flow_sde_step, kl_to_reference, make_sigmas


def _pair(b=2, shape=(3, 2, 2), diff=0.3):
    mean = torch.linspace(-1.0, 1.0, b * math.prod(shape)).reshape(b, *shape)
    return mean, mean - diff  # every element differs by `diff`


def test_registry_names():
    assert KL_FORMS.get("exact") is not None and KL_FORMS.get("flow-grpo") is not None
    with pytest.raises(KeyError, match="exact, flow-grpo"):
        kl_to_reference(*_pair(), torch.ones(2, 1, 1, 1), form="flow_grpo")


def test_hand_computed_both_forms():
    # sigma 0.75 -> 0.5 (dt 0.25), noise scale g = 0.8: transition std = 0.8 * sqrt(0.25) = 0.4
    # exact:     0.3^2 / (2 * 0.4^2) = 0.09 / 0.32 = 0.28125
    # flow-grpo: 0.3^2 / (2 * 0.8^2) = 0.09 / 1.28 = 0.0703125 (a quarter: 1 / dt = 4)
    mean, ref = _pair()
    std = torch.full((2, 1, 1, 1), 0.4)
    exact = kl_to_reference(mean, ref, std)
    also_exact = kl_to_reference(mean, ref, std, form="exact", sigma=0.75, sigma_next=0.5)
    flow = kl_to_reference(mean, ref, std, form="flow-grpo", sigma=0.75, sigma_next=0.5)
    torch.testing.assert_close(exact, torch.full((2,), 0.28125))
    torch.testing.assert_close(also_exact, torch.full((2,), 0.28125))
    torch.testing.assert_close(flow, torch.full((2,), 0.0703125))


def test_per_sample_sigmas():
    # sample 0: dt = 0.5, sample 1: dt = 0.1; std 1 for both -> flow-grpo = exact * dt
    mean, ref = _pair()
    std = torch.ones(2, 1, 1, 1)
    flow = kl_to_reference(mean, ref, std, form="flow-grpo", sigma=torch.tensor([1.0, 0.3]),
                           sigma_next=torch.tensor([0.5, 0.2]))
    torch.testing.assert_close(flow, torch.tensor([0.045 * 0.5, 0.045 * 0.1]))


def test_flow_grpo_form_is_flow_grpos_literal_kl_on_a_real_step():
    # Flow-GRPO (scripts/train_sd3.py): ((mean - mean_ref)**2).mean(dims) / (2 * std_dev_t**2) with
    # std_dev_t = eta * sqrt(sigma / (1 - sigma)) (sd3_sde_with_logprob.py), written out here independently.
    g = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    sigmas = make_sigmas(10, 3.0)
    eta = 0.7
    for k in (1, 4, 8):
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        _, _, mean, std = flow_sde_step(x, v, s, s_next, eta=eta, prev=x)
        _, _, ref_mean, _ = flow_sde_step(x, v_ref, s, s_next, eta=eta, prev=x)
        std_dev_t = eta * math.sqrt(s / (1 - s))
        expected = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)
        got = kl_to_reference(mean, ref_mean, std, form="flow-grpo", sigma=s, sigma_next=s_next)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        # and the exact form is torch's Gaussian KL with the transition std
        s = std.expand_as(mean)
        exact = kl_divergence(Normal(mean, s), Normal(ref_mean, s)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(kl_to_reference(mean, ref_mean, std), exact, rtol=1e-5, atol=0)


def test_ratio_is_4x_to_28x_on_ten_shift3_steps():
    # sigmas = 3s / (1 + 2s) over s = 1, 0.9, ..., 0: first step 1 -> 27/28 (dt 1/28), last 0.25 -> 0 (dt 1/4)
    sigmas = make_sigmas(10, 3.0)
    mean, ref = _pair()
    ratios = []
    for k in range(10):
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        std = torch.full((2, 1, 1, 1), 0.7 * math.sqrt(s - s_next))
        exact = kl_to_reference(mean, ref, std, form="exact", sigma=s, sigma_next=s_next)
        flow = kl_to_reference(mean, ref, std, form="flow-grpo", sigma=s, sigma_next=s_next)
        torch.testing.assert_close(exact / flow, torch.full((2,), 1 / (s - s_next)), rtol=1e-5, atol=0)
        ratios.append(float(exact[0] / flow[0]))
    assert ratios[0] == pytest.approx(28.0, rel=1e-5) and ratios[-1] == pytest.approx(4.0, rel=1e-5)
    assert all(a > b for a, b in zip(ratios, ratios[1:], strict=False))  # strongest at high noise


def test_flow_grpo_form_needs_the_sigmas():
    mean, ref = _pair()
    std = torch.ones(2, 1, 1, 1)
    with pytest.raises(ValueError, match="needs sigma and sigma_next"):
        kl_to_reference(mean, ref, std, form="flow-grpo")
    with pytest.raises(ValueError, match="both sigma and sigma_next"):
        kl_to_reference(mean, ref, std, form="flow-grpo", sigma=0.5)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        kl_to_reference(mean, ref, std, form="flow-grpo", sigma=0.5, sigma_next=0.5)
    with pytest.raises(ValueError, match="ref_mean"):
        kl_to_reference(mean, ref[:1], std)
