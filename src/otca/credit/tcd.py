"""Trajectory-Level Credit Decomposition (TCD), paper Sec. 3.2, Eq. 6-8.

Our reading (DESIGN.md): transition ``k`` maps ``latents[:, k] -> latents[:, k+1]``; its gain is how much it
raises the cosine similarity to the decoded ``final`` latent, ``dS_k = S_{k+1} - S_k``. This is the paper's
``S_t - S_{t+1}`` with ``t`` counting down, the reading under which "a larger dS is a larger increase in
alignment" holds. Eq. 8 turns gains into weights summing to 1 over the trained steps; the floor ``w_min``
(Sec. 6.5) is applied on the mean-1 scale: ``w_hat = w_min + (1 - w_min) * n_trained * w``.
"""

from __future__ import annotations

import torch

from otca.credit.weights import mean_one_over_mask, normalize_over_mask


def similarity_to_final(latents: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Eq. 6: ``S_k = cos(flat(latents[:, k]), flat(final))`` ``[B, T+1]`` in fp32, without gradient.

    ``latents [B, T+1, *latent]``, ``final [B, *latent]``. A zero latent has similarity 0.
    """
    if latents.dim() < 3 or latents.shape[0] != final.shape[0] or latents.shape[2:] != final.shape[1:]:
        raise ValueError(
            f"latents, final: expected [B, T+1, *latent] and [B, *latent], got {list(latents.shape)} and "
            f"{list(final.shape)}"
        )
    B, T1 = latents.shape[:2]
    z = latents.detach().reshape(B, T1, -1).float()  # [B, T+1, D]
    f = final.detach().reshape(B, -1, 1).float()  # [B, D, 1]
    dot = torch.bmm(z, f).squeeze(2)  # [B, T+1]
    norms = torch.linalg.vector_norm(z, dim=2) * torch.linalg.vector_norm(f, dim=(1, 2)).unsqueeze(1)  # [B, T+1]
    S: torch.Tensor = dot / norms.clamp_min(torch.finfo(torch.float32).tiny)  # [B, T+1]
    return S


def tcd_gains(latents: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Eq. 7 (our reading): similarity gain of each transition ``dS_k = S_{k+1} - S_k`` ``[B, T]``."""
    S = similarity_to_final(latents, final)  # [B, T+1]
    return S[:, 1:] - S[:, :-1]  # [B, T]


def eq8_weights(dS: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 8: ``w_k = (relu(dS_k) + eps) / sum_j (relu(dS_j) + eps)`` over the trained steps ``[B, T]``.

    ``dS [B, T]``, ``mask [B, T]`` bool (None: all steps). Each row sums to 1 over its mask (0 outside); with
    no positive gain the weights are uniform. ``eps > 0`` keeps the denominator away from 0.
    """
    if not eps > 0:
        raise ValueError(f"eps: expected > 0, got {eps!r}")
    return normalize_over_mask(dS.float().relu() + eps, mask)  # [B, T]


def tcd_weights_from_gains(
    dS: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6, w_min: float = 0.5
) -> torch.Tensor:
    """Mean-1 TCD weights ``w_hat = w_min + (1 - w_min) * n_trained * w`` ``[B, T]`` from gains ``dS [B, T]``.

    ``w`` is :func:`eq8_weights`; every trained step gets at least ``w_min`` and the mean over the trained
    steps is 1; untrained steps get 0. ``w_min = 1`` is the uniform broadcast.
    """
    if not 0 <= w_min <= 1:
        raise ValueError(f"w_min: expected a number in [0, 1], got {w_min!r}")
    w = eq8_weights(dS, mask, eps)  # [B, T], sums to 1 per row
    trained = torch.ones_like(w) if mask is None else mask.float()  # [B, T]
    return w_min * trained + (1 - w_min) * mean_one_over_mask(w, mask)  # [B, T], mean_one = n_trained * w


def tcd_weights(
    latents: torch.Tensor,
    final: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    w_min: float = 0.5,
) -> torch.Tensor:
    """Mean-1 TCD weights ``[B, T]`` straight from a trajectory (``latents [B, T+1, ...]``, ``final [B, ...]``)."""
    return tcd_weights_from_gains(tcd_gains(latents, final), mask, eps, w_min)
