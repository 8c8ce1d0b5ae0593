"""Temporal step weights over the trained steps, and the two peers' schedule-only weights (PCPO, TempFlow).

Every temporal weight in otca is ``[B, T]``, 0 outside the trained-step mask and mean 1 over it, so that
all-ones weights reproduce the uniform broadcast of DanceGRPO / Flow-GRPO exactly.

PCPO and TempFlow both weight transition ``k`` (``sigmas[k] -> sigmas[k+1]``) through the Flow-SDE
(Flow-GRPO) noise scale ``g_k = eta * sqrt(sigma_k / (1 - sigma_k))``, the scale :mod:`otca.flow.sde` samples
with; at ``sigma = 1`` the ``1 - sigma`` uses ``1 - sigmas[1]`` instead, as Flow-GRPO does. ``eta`` cancels
under the mean-1 normalisation, so the weights are a function of the schedule alone.
"""

from __future__ import annotations

import torch

from otca.flow.sde import flow_noise_scale


def normalize_over_mask(raw: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``raw [B, T] >= 0`` scaled to sum 1 over each row's masked steps ``[B, T]``; 0 outside the mask.

    A row with no masked step (or a zero masked sum) gets all zeros rather than NaN.
    """
    raw = raw.float()
    if mask is not None:
        raw = raw * mask  # [B, T]
    total = raw.sum(dim=1, keepdim=True)  # [B, 1]
    return raw / total.clamp_min(torch.finfo(torch.float32).tiny)  # [B, T]


def mean_one_over_mask(raw: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``raw [B, T] >= 0`` scaled to mean 1 over each row's masked steps ``[B, T]``; 0 outside the mask."""
    n = raw.shape[1] if mask is None else mask.sum(dim=1, keepdim=True)  # [B, 1] trained steps per row
    return n * normalize_over_mask(raw, mask)  # [B, T]


def _flow_sde_steps(sigmas: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per transition of ``sigmas [T+1]``: ``sigma_k [T]``, ``dt_k = sigma_k - sigma_{k+1} [T]`` and the Flow-SDE
    noise scale ``g_k [T]`` (:func:`otca.flow.sde.flow_noise_scale`, ``sigma_max = sigmas[1]``)."""
    s = sigmas[:-1].float()  # [T]
    dt = s - sigmas[1:].float()  # [T], > 0
    return s, dt, flow_noise_scale(s, sigmas[1].float(), eta)


def flow_sde_std(sigmas: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """Std ``g_k * sqrt(dt_k)`` of each Flow-SDE transition ``[T]`` for ``sigmas [T+1]`` (Flow-GRPO
    ``sd3_sde_with_logprob.py``: ``std_dev_t * sqrt(-dt)``)."""
    _, dt, g = _flow_sde_steps(sigmas, eta)
    return g * dt.sqrt()  # [T]


def tempflow_weights(sigmas: torch.Tensor, mask: torch.Tensor, *, eta: float = 1.0) -> torch.Tensor:
    """TempFlow-GRPO's noise-aware weights ``Norm(sigma_t * sqrt(dt))`` ``[B, T]`` (arXiv 2508.04324):
    the Flow-SDE transition std, normalised to mean 1 over each row's trained steps of ``mask [B, T]``."""
    std = flow_sde_std(sigmas, eta)  # [T]
    return mean_one_over_mask(std.expand(mask.shape), mask)  # [B, T]


def pcpo_native_weights(sigmas: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """PCPO's native per-step weight of a Flow-SDE policy ``[T]`` (arXiv 2509.25774, Prop. 2):
    ``w(t) = sqrt(dt) / g_t * (1 + (1 - t) g_t^2 / (2 t))`` with ``t = sigma_k``, ``dt = sigma_k - sigma_{k+1}``.

    At ``t = 1`` the ``1 - t`` is ``1 - sigmas[1]``, the substitution Flow-GRPO makes inside ``g``; making it in
    the whole weight keeps the bracket at ``1 + eta^2 / 2`` on every step, which is why ``eta`` cancels.
    """
    s, dt, g = _flow_sde_steps(sigmas, eta)
    one_minus = 1 - torch.where(s == 1, sigmas[1].float(), s)  # [T]
    return dt.sqrt() / g * (1 + one_minus * g**2 / (2 * s))  # [T]


def pcpo_weights(sigmas: torch.Tensor, mask: torch.Tensor, *, eta: float = 1.0) -> torch.Tensor:
    """PCPO's proportional step weights ``[B, T]``: the multiplier ``zeta * dt / w(t)`` that turns the native
    weight :func:`pcpo_native_weights` into the target ``zeta * dt`` (Prop. 2), mean 1 over ``mask [B, T]``
    (``zeta = sum w`` is one constant and drops out). For Flow-SDE this equals :func:`tempflow_weights`: both
    papers aim at a per-step scale proportional to ``dt``. PCPO's log-hinge objective is a loss option.
    """
    _, dt, _ = _flow_sde_steps(sigmas, eta)
    return mean_one_over_mask((dt / pcpo_native_weights(sigmas, eta)).expand(mask.shape), mask)  # [B, T]
