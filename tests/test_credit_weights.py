"""Peer step weights: TempFlow and PCPO by hand, against the sampler's std, eta cancellation, masks."""

import math

import pytest
import torch

from otca.credit import flow_sde_std, mean_one_over_mask, pcpo_native_weights, pcpo_weights, tempflow_weights
from otca.flow.schedule import make_sigmas
from otca.flow.sde import flow_sde_step

FULL = torch.ones(1, 2, dtype=torch.bool)


def test_tempflow_by_hand():
    # sigmas 1 -> 0.5 -> 0: step 0 has g = sqrt(1 / (1 - 0.5)) (sigma_max = sigmas[1]), std = g sqrt(0.5) = 1;
    # step 1 has g = sqrt(0.5 / 0.5) = 1, std = sqrt(0.5)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    torch.testing.assert_close(flow_sde_std(sigmas), torch.tensor([1.0, math.sqrt(0.5)]))
    total = 1 + math.sqrt(0.5)
    torch.testing.assert_close(tempflow_weights(sigmas, FULL), torch.tensor([[2 / total, 2 * math.sqrt(0.5) / total]]))


def test_flow_sde_std_matches_the_sampler():
    sigmas = make_sigmas(6, shift=3.0)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    for k in range(6):
        eta = 0.7
        *_, std = flow_sde_step(x, v, float(sigmas[k]), float(sigmas[k + 1]), eta=eta, sigma_max=float(sigmas[1]))
        torch.testing.assert_close(std.flatten(), flow_sde_std(sigmas, eta)[k].expand(2))


def pcpo_literal(sigmas: list[float], eta: float) -> list[float]:
    """PCPO Prop. 2 with plain floats: native w(t) = sqrt(dt)/g (1 + (1-t) g^2 / (2t)), multiplier zeta dt / w,
    then mean 1. At t = 1 the 1 - t is 1 - sigmas[1] (our reading of the singular first step)."""
    T = len(sigmas) - 1
    native = []
    for k in range(T):
        t, dt = sigmas[k], sigmas[k] - sigmas[k + 1]
        one_minus = 1 - sigmas[1] if t == 1 else 1 - t
        g = eta * math.sqrt(t / one_minus)
        native.append(math.sqrt(dt) / g * (1 + one_minus * g**2 / (2 * t)))
    zeta = sum(native)
    m = [zeta * (sigmas[k] - sigmas[k + 1]) / native[k] for k in range(T)]
    return [x * T / sum(m) for x in m]


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
def test_pcpo_matches_prop2_and_tempflow(shift, eta):
    sigmas = make_sigmas(8, shift=shift)
    mask = torch.ones(1, 8, dtype=torch.bool)
    want = torch.tensor([pcpo_literal(sigmas.double().tolist(), eta)], dtype=torch.float32)
    got = pcpo_weights(sigmas, mask, eta=eta)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # eta cancels, and for Flow-SDE PCPO's proportional weights are TempFlow's noise-aware ones
    torch.testing.assert_close(got, pcpo_weights(sigmas, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tempflow_weights(sigmas, mask, eta=eta), tempflow_weights(sigmas, mask))
    torch.testing.assert_close(got, tempflow_weights(sigmas, mask), atol=1e-5, rtol=1e-5)


def test_pcpo_native_weight_is_proportional_to_sqrt_dt_over_g():
    sigmas = make_sigmas(5, shift=3.0)
    eta = 0.7
    s, dt = sigmas[:-1], sigmas[:-1] - sigmas[1:]
    g = eta * torch.sqrt(s / (1 - torch.where(s == 1, sigmas[1], s)))
    torch.testing.assert_close(pcpo_native_weights(sigmas, eta), dt.sqrt() / g * (1 + eta**2 / 2))


def test_weights_over_a_mask():
    sigmas = make_sigmas(6, shift=3.0)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for fn in (pcpo_weights, tempflow_weights):
        w = fn(sigmas, mask)
        assert torch.isfinite(w).all() and torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
        torch.testing.assert_close(w[:2].sum(1) / mask[:2].sum(1), torch.ones(2))
        assert torch.equal(w[2], torch.zeros(6))
        # on the trained steps, the same ratios as without a mask
        full = fn(sigmas, torch.ones(1, 6, dtype=torch.bool))[0]
        torch.testing.assert_close(w[1, mask[1]], full[mask[1]] * 3 / full[mask[1]].sum())


def test_mean_one_without_mask():
    raw = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    torch.testing.assert_close(mean_one_over_mask(raw), torch.tensor([[0.5, 1.5], [1.0, 1.0]]))
