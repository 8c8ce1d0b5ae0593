"""Sampler transitions over a flow-matching velocity: the SDE steps the policy samples with, their Gaussian
log-densities, the deterministic Euler (ODE) step, and the KL between two transitions.

Conventions (docs/design.md): sigma 1 = noise, 0 = data; ``z_sigma = (1 - sigma) x0 + sigma * eps`` and the network
predicts ``v = eps - x0``. ``x, v: [B, *latent]`` in any dtype; ``sigma, sigma_next``: python floats or ``[B]``
tensors, broadcast over the latent dims. All math runs in float32; sampled states come back in ``x``'s dtype.

Derivation of the SDE step (paper Eq. 4-5). From ``v = eps - x0`` the clean and noise predictions are
``x0_hat = z - sigma v`` and ``eps_hat = z + (1 - sigma) v``, and Eq. 5 (alpha = 1 - sigma, std = sigma) gives the
score ``grad log p(z) = -(z - (1 - sigma) x0_hat) / sigma^2 = -eps_hat / sigma``. For any noise scale ``g`` the
reverse-time SDE of Eq. 4, ``dz = (v - g^2/2 * grad log p) dsigma + g dw``, has the same marginals as the ODE
``dz = v dsigma`` (the score term removes exactly what the added noise spreads). One Euler-Maruyama step over
``dt = sigma_next - sigma < 0`` is the Gaussian

    mean = z + dt * (v + g^2 / (2 sigma) * (z + (1 - sigma) v))
         = z * (1 + g^2 dt / (2 sigma)) + v * (1 + g^2 (1 - sigma) / (2 sigma)) * dt,
    std  = g * sqrt(-dt).

The second line is Flow-GRPO's ``sd3_sde_with_logprob.py`` form. The two transitions differ only in ``g``:
Flow-SDE (Flow-GRPO) ``g = eta * sqrt(sigma / (1 - sigma))``; Dance-SDE (DanceGRPO ``flux_step``) ``g = eta``.
The third transition, CPS (:class:`CpsTransition`), is not an Euler-Maruyama step: it re-noises the clean and
noise predictions with the forward process's own coefficients (DDIM-style).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from otca.registry import Registry

Sigma = float | torch.Tensor
# g(sigma, sigma_max, eta) -> the SDE's noise scale g, elementwise over broadcastable tensors
NoiseScale = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class Transition(Protocol):
    """One stochastic sampler step ``latents[:, k] -> latents[:, k+1]`` and its log-density.

    Returns ``(x_next [B, *latent] in x's dtype, log_prob [B] fp32, mean [B, *latent] fp32,
    std [B, 1, ..., 1] fp32)``. Given ``prev`` it evaluates that state instead of sampling (``x_next`` is
    ``prev``); given ``noise`` it samples ``mean + std * noise``; otherwise it draws the noise with ``generator``.
    """

    def __call__(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        sigma: Sigma,
        sigma_next: Sigma,
        *,
        eta: float,
        noise: torch.Tensor | None = None,
        prev: torch.Tensor | None = None,
        reduce: str = "mean",
        generator: torch.Generator | None = None,
        sigma_max: Sigma | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...


TRANSITIONS: Registry[Transition] = Registry("transition")

_REDUCTIONS = {"mean": torch.mean, "sum": torch.sum}


def _reduce(values: torch.Tensor, reduce: str) -> torch.Tensor:
    """``values [B, *latent] -> [B]`` by mean or sum over every non-batch dim."""
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce: expected one of {', '.join(_REDUCTIONS)}, got {reduce!r}")
    return _REDUCTIONS[reduce](values, dim=tuple(range(1, values.dim())))


def _column(sigma: Sigma, x: torch.Tensor, name: str) -> torch.Tensor:
    """A float or ``[B]`` noise level as an fp32 ``[B, 1, ..., 1]`` column that broadcasts over ``x [B, *latent]``."""
    if x.dim() < 2:
        raise ValueError(f"x: expected [B, *latent] with at least one latent dim, got shape {tuple(x.shape)}")
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    elif s.shape != x.shape[:1]:
        raise ValueError(f"{name}: expected a float or a [B] tensor with B={x.shape[0]}, got shape {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (x.dim() - 1)))  # [B, 1, ..., 1]


def _require_same_shape(t: torch.Tensor | None, x: torch.Tensor, name: str) -> None:
    if t is not None and t.shape != x.shape:
        raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")


def _check_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    eta: float,
    noise: torch.Tensor | None,
    prev: torch.Tensor | None,
    sigma_max: Sigma | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checks every :class:`Transition` makes; returns the fp32 columns ``(sigma, sigma_next, sigma_max)``
    ``[B, 1, ..., 1]`` (``sigma_max`` defaults to ``sigma_next``: Flow-GRPO's ``sigmas[1]`` on the first step)."""
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta: expected a finite number >= 0, got {eta!r}")
    _require_same_shape(v, x, "v")
    _require_same_shape(noise, x, "noise")
    _require_same_shape(prev, x, "prev")
    s = _column(sigma, x, "sigma")  # [B, 1, ..., 1]
    s_next = _column(sigma_next, x, "sigma_next")  # [B, 1, ..., 1]
    s_max = s_next if sigma_max is None else _column(sigma_max, x, "sigma_max")  # [B, 1, ..., 1]
    ok = ((0 <= s_next) & (s_next < s) & (s <= 1) & (0 <= s_max) & (s_max < 1)).flatten()  # [B]
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0])
        raise ValueError(
            f"sigma, sigma_next, sigma_max: expected 0 <= sigma_next < sigma <= 1 and 0 <= sigma_max < 1, got "
            f"sigma={s.flatten()[i].item()}, sigma_next={s_next.flatten()[i].item()}, "
            f"sigma_max={s_max.flatten()[i].item()} at sample {i}"
        )
    return s, s_next, s_max


def _sample_and_score(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    noise: torch.Tensor | None,
    prev: torch.Tensor | None,
    reduce: str,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gaussian step ``N(mean, std^2)`` of a :class:`Transition`: sample it (or take ``prev``) and score it."""
    if prev is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        # Cast before scoring: the density must be that of the state actually stored, so that re-evaluating
        # it later with the same parameters gives a ratio of exactly 1.
        prev = (mean + std * noise.float()).to(x.dtype)  # [B, *latent]
    # The action is a constant of the policy gradient: only mean and std carry gradient.
    log_prob = gaussian_log_prob(prev.detach(), mean, std, reduce)  # [B]
    return prev, log_prob, mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """``log N(x; mean, std^2)`` per element, reduced over the non-batch dims to ``[B]`` (fp32).

    ``x [B, *latent]``; ``mean`` and ``std`` broadcast against it. ``reduce="mean"`` (the default, as DanceGRPO
    and Flow-GRPO) or ``"sum"`` (the true log-density of the whole latent). A zero ``std`` has no density (NaN).
    """
    x, mean, std = x.float(), mean.float(), std.float()
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI  # [B, *latent]
    return _reduce(log_density, reduce)  # [B]


def predict_x0(x: torch.Tensor, v: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """The clean prediction ``x0_hat = x - sigma * v`` ``[B, *latent]`` in ``x``'s dtype (fp32 arithmetic)."""
    s = _column(sigma, x, "sigma")  # [B, 1, ..., 1]
    return (x.float() - s * v.float()).to(x.dtype)  # [B, *latent]


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: Sigma, sigma_next: Sigma) -> torch.Tensor:
    """Deterministic Euler step of ``dz = v dsigma``: ``x + (sigma_next - sigma) * v`` in ``x``'s dtype.

    Used for evaluation sampling; it has no log-density. Either direction is allowed (inversion runs upward).
    """
    dt = _column(sigma_next, x, "sigma_next") - _column(sigma, x, "sigma")  # [B, 1, ..., 1]
    return (x.float() + dt * v.float()).to(x.dtype)  # [B, *latent]


def _sde_mean_std(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-Maruyama mean ``[B, *latent]`` and std ``[B, 1, ..., 1]`` of the reverse SDE (Eq. 4) with the
    Eq. 5 score, for fp32 ``x, v`` and ``[B, 1, ..., 1]`` columns ``sigma, sigma_next, g`` (module docstring)."""
    dt = sigma_next - sigma  # [B, 1, ..., 1], < 0
    # Eq. 5 as score = -eps_hat / sigma: the same value as -(x - (1 - sigma) x0_hat) / sigma^2 without the
    # cancellation that form suffers at small sigma.
    eps_hat = x + (1 - sigma) * v  # [B, *latent]
    mean = x + dt * (v + g**2 / (2 * sigma) * eps_hat)  # [B, *latent], Eq. 4 discretised
    return mean, g * torch.sqrt(-dt)  # [B, *latent], [B, 1, ..., 1]


@dataclass(frozen=True)
class SdeTransition:
    """The Euler-Maruyama step of the reverse SDE (Eq. 4) with the Eq. 5 score (module docstring), a
    :class:`Transition`; ``noise_scale(sigma, sigma_max, eta) -> g [B, 1, ..., 1]`` is the only part that differs
    between Flow-SDE and Dance-SDE. ``eta = 0`` is the Euler ODE step (std 0, log_prob NaN: use :func:`ode_step`
    for deterministic steps)."""

    noise_scale: NoiseScale

    def __call__(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        sigma: Sigma,
        sigma_next: Sigma,
        *,
        eta: float,
        noise: torch.Tensor | None = None,
        prev: torch.Tensor | None = None,
        reduce: str = "mean",
        generator: torch.Generator | None = None,
        sigma_max: Sigma | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        s, s_next, s_max = _check_step(x, v, sigma, sigma_next, eta, noise, prev, sigma_max)
        mean, std = _sde_mean_std(x.float(), v.float(), s, s_next, self.noise_scale(s, s_max, float(eta)))
        return _sample_and_score(x, mean, std, noise, prev, reduce, generator)


def flow_noise_scale(sigma: torch.Tensor, sigma_max: torch.Tensor, eta: float) -> torch.Tensor:
    """Flow-GRPO's ``g = eta * sqrt(sigma / (1 - sigma))``, elementwise; where ``sigma == 1`` the denominator
    uses ``sigma_max`` instead (``sd3_sde_with_logprob.py``), which keeps the first step finite.

    In :data:`flow_sde_step` (Flow-SDE) ``std = g * sqrt(sigma - sigma_next)``, and ``sigma_max`` defaults to
    ``sigma_next``: on the first step of a schedule that is ``sigmas[1]``, Flow-GRPO's value, so the first step
    has ``std = eta`` exactly."""
    return eta * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))


def dance_noise_scale(sigma: torch.Tensor, sigma_max: torch.Tensor, eta: float) -> torch.Tensor:
    """DanceGRPO's constant ``g = eta``, shaped like ``sigma`` (``flux_step``); it has no singularity at sigma 1.

    :data:`dance_sde_step` (Dance-SDE) is DanceGRPO's ``mean = x + dsigma * v - 0.5 * eta^2 * score * dsigma``
    with ``score = -(x - (1 - sigma) x0_hat) / sigma^2``, ``std = eta * sqrt(sigma - sigma_next)``: the module's
    SDE with this ``g``. Its ``sigma_max`` is accepted for the shared signature and only validated."""
    return torch.full_like(sigma, eta)


# Flow-GRPO's SDE step (Flow-SDE) and DanceGRPO's (Dance-SDE, ``flux_step``).
flow_sde_step = TRANSITIONS.register("flow-sde")(SdeTransition(flow_noise_scale))
dance_sde_step = TRANSITIONS.register("dance-sde")(SdeTransition(dance_noise_scale))


@dataclass(frozen=True)
class CpsTransition:
    """Coefficients-Preserving Sampling (CPS; Wang & Yu, "Coefficients-Preserving Sampling for Reinforcement
    Learning with Flow Matching", arXiv 2509.05952, the DDIM-style update of its method section; Flow-GRPO ships
    it as ``sde_type='cps'`` in ``sd3_sde_with_logprob.py``), a :class:`Transition`.

    With ``x0_hat = x - sigma v`` and ``eps_hat = x + (1 - sigma) v`` (module docstring), one step to
    ``sigma_next`` is the Gaussian

        std  = sigma_next * sin(eta * pi / 2),
        mean = (1 - sigma_next) * x0_hat + sqrt(sigma_next^2 - std^2) * eps_hat,

    so ``mean + std * z`` keeps the coefficients of the forward process at ``sigma_next``: data coefficient
    ``1 - sigma_next`` and, for independent unit ``eps_hat`` and ``z``, total noise variance exactly
    ``sigma_next^2`` (the SDE steps overshoot it, the paper's diagnosis of their noisy samples). ``eta`` is in
    [0, 1]: 0 is the Euler ODE step (``mean = x + (sigma_next - sigma) v``, std 0), 1 re-draws all the noise.

    The log-density is the exact Gaussian one (:func:`gaussian_log_prob`). Flow-GRPO's code scores CPS with the
    unnormalised ``-(x_next - mean)^2`` instead (no ``1 / (2 std^2)``, no constants), so its log-ratio is ours
    times ``2 std^2``: a clip range tuned there is not the same trust region here. The last step of a schedule
    (``sigma_next = 0``) has std 0 and no density (log_prob NaN): it is deterministic, never train it
    (``drop_last_step``, or an SDE window that ends before it). ``sigma_max`` is accepted for the shared
    signature and only validated.
    """

    def __call__(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        sigma: Sigma,
        sigma_next: Sigma,
        *,
        eta: float,
        noise: torch.Tensor | None = None,
        prev: torch.Tensor | None = None,
        reduce: str = "mean",
        generator: torch.Generator | None = None,
        sigma_max: Sigma | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        s, s_next, _ = _check_step(x, v, sigma, sigma_next, eta, noise, prev, sigma_max)
        if eta > 1:
            raise ValueError(f"eta: CPS expects a noise level in [0, 1] (std = sigma_next sin(eta pi/2)), got {eta!r}")
        xf, vf = x.float(), v.float()
        x0_hat = xf - s * vf  # [B, *latent]
        eps_hat = xf + (1 - s) * vf  # [B, *latent]
        std = s_next * math.sin(float(eta) * math.pi / 2)  # [B, 1, ..., 1]
        # clamp: sin(pi / 2) may round above 1 by an ulp, which would make the root NaN at eta = 1
        mean = (1 - s_next) * x0_hat + torch.sqrt((s_next**2 - std**2).clamp_min(0)) * eps_hat  # [B, *latent]
        return _sample_and_score(x, mean, std, noise, prev, reduce, generator)


# Coefficients-preserving sampling (Flow-GRPO's ``sde_type='cps'``).
cps_step = TRANSITIONS.register("cps")(CpsTransition())

def get_transition(name: str) -> Transition:
    """The transition registered under ``name`` (``"flow-sde"``, ``"dance-sde"``, ``"cps"``); unknown names list
    the known."""
    return TRANSITIONS.get(name)


# (std [B, 1, ..., 1] of the transition, sigma - sigma_next [B, 1, ..., 1] or None) -> the std the KL divides by
KlScale = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

KL_FORMS: Registry[KlScale] = Registry("KL form")


@KL_FORMS.register("exact")
def exact_kl_std(std: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
    """The transition's own std ``g sqrt(sigma - sigma_next)``: the exact KL between the two Gaussian steps."""
    return std


@KL_FORMS.register("flow-grpo")
def flow_grpo_kl_std(std: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
    """The SDE noise scale ``g = std / sqrt(sigma - sigma_next)``: Flow-GRPO's ``std_dev_t`` (the KL term of
    ``scripts/train_sd3.py``, ``((mean - mean_ref)**2).mean(dims) / (2 * std_dev_t**2)`` with ``std_dev_t`` from
    ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``), which leaves out the step's ``sqrt(-dt)``."""
    if step is None:
        raise ValueError("kl_to_reference: form 'flow-grpo' needs sigma and sigma_next")
    return std / torch.sqrt(step)


def kl_to_reference(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    *,
    form: str = "exact",
    sigma: Sigma | None = None,
    sigma_next: Sigma | None = None,
) -> torch.Tensor:
    """KL penalty between the policy's and the reference's transitions from the same state:
    ``||mean - ref_mean||^2 / (2 s^2)``, mean over the non-batch dims -> ``[B]`` fp32.

    ``mean, ref_mean [B, *latent]``; ``std [B, 1, ..., 1]`` is the transition std a step returns
    (``g sqrt(sigma - sigma_next)``). ``form`` (a name in :data:`KL_FORMS`) picks ``s``:

    * ``"exact"``: ``s = std``, the exact per-dimension KL between the two Gaussians (they share ``std``);
    * ``"flow-grpo"``: ``s = g = std / sqrt(sigma - sigma_next)``, Flow-GRPO's form (its issue #78: the ``dt`` of
      the variance is missing), which needs ``sigma`` and ``sigma_next`` (floats or ``[B]``).

    ``exact = flow-grpo / (sigma - sigma_next)``: on a 10-step shift-3 schedule the exact KL is 28x Flow-GRPO's on
    the first step and 4x on the last, so a ``kl_coef`` carried over from Flow-GRPO needs ``form="flow-grpo"``.
    """
    scale = KL_FORMS.get(form)
    _require_same_shape(ref_mean, mean, "ref_mean")
    step = None
    if sigma is not None or sigma_next is not None:
        if sigma is None or sigma_next is None:
            raise ValueError(f"kl_to_reference: expected both sigma and sigma_next, got {sigma!r}, {sigma_next!r}")
        step = _column(sigma, mean, "sigma") - _column(sigma_next, mean, "sigma_next")  # [B, 1, ..., 1]
        if not bool((step > 0).all()):
            raise ValueError(f"kl_to_reference: expected sigma_next < sigma, got {sigma!r}, {sigma_next!r}")
    s = scale(std.float(), step)  # [B, 1, ..., 1]
    sq = (mean.float() - ref_mean.float()) ** 2 / (2 * s**2)  # [B, *latent]
    return _reduce(sq, "mean")  # [B]
