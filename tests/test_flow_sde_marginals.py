"""The SDE transitions keep the ODE's marginals (the claim of ``otca.flow.sde``'s docstring), checked on a
Gaussian toy where everything is known in closed form.

Data ``x0 ~ N(0, s0^2 I)``, noise ``eps ~ N(0, I)``, ``z_sigma = (1 - sigma) x0 + sigma eps``: the marginal at
``sigma`` is ``N(0, m(sigma) I)`` with ``m = (1 - sigma)^2 s0^2 + sigma^2``, and the exact velocity of the path is
``E[eps - x0 | z] = z * (sigma - (1 - sigma) s0^2) / m(sigma)`` (the covariance of ``eps - x0`` with ``z`` over the
variance of ``z``). Sampling with the SDE from sigma = 1 must end with variance ``m(sigma_end)``; the same noise
without the score correction of the drift ends far from it, so the tolerance is one the check can fail.
"""

from __future__ import annotations

import pytest
import torch

from otca.flow.sde import dance_sde_step, flow_sde_step

S0, D, N, STEPS, END, ETA = 0.5, 4, 8000, 50, 0.1, 0.7
TOL = 0.05  # relative; the sampling error of the variance is ~0.8% (sqrt(2 / (N * D))), discretisation ~1%


def marginal_var(sigma: float) -> float:
    return (1 - sigma) ** 2 * S0**2 + sigma**2


def velocity(z: torch.Tensor, sigma: float) -> torch.Tensor:
    return z * (sigma - (1 - sigma) * S0**2) / marginal_var(sigma)  # [N, D]


def sigmas() -> list[float]:
    return torch.linspace(1.0, END, STEPS + 1, dtype=torch.float64).tolist()


def run_sde(step) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, D, generator=g)  # sigma = 1: pure noise, m(1) = 1
    s = sigmas()
    for a, b in zip(s[:-1], s[1:], strict=True):
        z, *_ = step(z, velocity(z, a), a, b, eta=ETA, generator=g)
    return z


def run_uncorrected(noise_scale) -> torch.Tensor:
    """The ODE's drift plus the SDE's noise, without the score term that compensates it (a wrong correction)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, D, generator=g)
    s = sigmas()
    for a, b in zip(s[:-1], s[1:], strict=True):
        z = z + (b - a) * velocity(z, a) + noise_scale(a, b) * (a - b) ** 0.5 * torch.randn(N, D, generator=g)
    return z


def flow_g(a: float, b: float) -> float:
    return ETA * (a / (1 - (b if a == 1 else a))) ** 0.5  # Flow-SDE's g, sigma_max = sigma_next at sigma = 1


def dance_g(a: float, b: float) -> float:
    return ETA


@pytest.mark.parametrize("step, g", [(flow_sde_step, flow_g), (dance_sde_step, dance_g)], ids=["flow", "dance"])
def test_sde_sampling_keeps_the_marginal_variance_of_the_ode(step, g):
    want = marginal_var(END)
    z = run_sde(step)
    assert abs(float(z.mean())) < 0.02
    assert float(z.var()) == pytest.approx(want, rel=TOL)
    # the deterministic ODE agrees (sanity of the toy's velocity), and dropping the correction breaks it
    ode = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    s = sigmas()
    for a, b in zip(s[:-1], s[1:], strict=True):
        ode = ode + (b - a) * velocity(ode, a)
    assert float(ode.var()) == pytest.approx(want, rel=TOL)
    assert float(run_uncorrected(g).var()) > (1 + 4 * TOL) * want
