"""Multi-Objective Credit Allocation (MOCA), paper Sec. 3.3, Eq. 12-14 and Alg. 1.

Per sample, MOCA picks simplex coefficients ``c [K]`` minimising ``(c.A)^2 - lambda * c.A`` (Eq. 13). The
objective depends on ``c`` only through ``z = c.A``, which ranges over ``[min_k A_k, max_k A_k]``, so the fused
advantage is always ``clip(lambda / 2, min_k A_k, max_k A_k)``. We still run Alg. 1, vectorized over samples:
its coefficients are what the credit diagnostics log, and the clip identity is the test of it.
"""

from __future__ import annotations

import torch

from otca.credit.group import Std, group_center


def trajectory_score(dS: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Eq. 12: ``q_i = sum_k w_k dS_k`` ``[B]`` from gains ``dS [B, T]`` and Eq. 8 weights ``w [B, T]``."""
    return (w.float() * dS.float()).sum(dim=1)  # [B]


def exploration_signal(
    q: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    center: bool = False,
    std: Std = "unbiased",
) -> torch.Tensor:
    """Eq. 12: ``e_i = |q_i| / (std_group(q) + eps)`` ``[B]`` from trajectory scores ``q [B]``.

    ``center=True``: ``|q_i - mean_group(q)|``, the "deviation from the group average" of Sec. 6.2; the paper's
    formulas use the uncentred ``|q_i|``.
    """
    if not eps > 0:
        raise ValueError(f"eps: expected > 0, got {eps!r}")
    dev, sd, _ = group_center(q.float().unsqueeze(1), group_ids, std=std)  # [B, 1], [B, 1]
    spread = dev if center else q.float().unsqueeze(1)  # [B, 1]
    return (spread.abs() / (sd + eps)).squeeze(1)  # [B]


def exploration_gate(advantages: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The sign factor of Eq. 14, ``relu(sum_k A_k) / (|sum_k A_k| + eps)`` ``[N]`` for rows ``A [N, K]``:
    about 1 when the objectives' advantages sum to a positive value, 0 otherwise."""
    total = advantages.float().sum(dim=1)  # [N]
    return total.relu() / (total.abs() + eps)  # [N]


def exploration_strength(
    advantages: torch.Tensor,
    q: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    center: bool = False,
    std: Std = "unbiased",
) -> torch.Tensor:
    """Exploration strength ``lambda [B]`` (Eq. 12 and 14).

    ``e_i`` is :func:`exploration_signal` (``center`` as there), then
    ``lambda_i = relu(sum_k A_ik) / (|sum_k A_ik| + eps) * tanh(e_i)``. ``advantages [B, K]``, ``q [B]``.
    """
    e = exploration_signal(q, group_ids, eps=eps, center=center, std=std)  # [B], Eq. 12
    return exploration_gate(advantages, eps) * torch.tanh(e)  # [B], Eq. 14


def _alg1(advantages: torch.Tensor, lam: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Alg. 1 for all samples at once: ``(z [B], c [B, K])``; see :func:`moca_coefficients`, :func:`moca_fuse`."""
    if advantages.dim() != 2 or lam.shape != advantages.shape[:1]:
        raise ValueError(
            f"advantages, lam: expected [B, K] and [B], got {list(advantages.shape)} and {list(lam.shape)}"
        )
    A = advantages.float()  # [B, K]
    B, K = A.shape
    sorted_A, perm = torch.sort(A, dim=1, stable=True)  # [B, K], [B, K]; ascending, ties keep index order
    s_min, s_max = sorted_A[:, 0], sorted_A[:, -1]  # [B], [B]
    case1 = (s_max - s_min) < tol  # [B]
    c1 = torch.nn.functional.one_hot(A.argmax(dim=1), K).float()  # [B, K]; argmax returns the first maximum
    z = torch.clamp(lam.float() / 2, s_min, s_max)  # [B], z_hat
    close = (A - z.unsqueeze(1)).abs() < tol  # [B, K]
    one_hot = case1 | close.any(dim=1)  # [B]: Case 1 or Case 2
    c2 = torch.nn.functional.one_hot(close.to(torch.uint8).argmax(dim=1), K).float()  # [B, K], first match
    c12 = torch.where(case1.unsqueeze(1), c1, c2)  # [B, K]
    if K == 1:  # every row is Case 1: there is no bracket to search
        return A.squeeze(1), c1
    lo, hi = sorted_A[:, :-1], sorted_A[:, 1:]  # [B, K-1] each
    inside = (lo <= z.unsqueeze(1)) & (z.unsqueeze(1) <= hi)  # [B, K-1]
    j = inside.to(torch.uint8).argmax(dim=1, keepdim=True)  # [B, 1], first bracket
    a_lo, a_hi = sorted_A.gather(1, j), sorted_A.gather(1, j + 1)  # [B, 1] each
    width = torch.where(one_hot.unsqueeze(1), torch.ones_like(a_lo), a_hi - a_lo)  # [B, 1]; >= 2 tol in Case 3
    c3 = torch.zeros_like(A)  # [B, K]
    c3.scatter_(1, perm.gather(1, j), (a_hi - z.unsqueeze(1)) / width)
    c3.scatter_(1, perm.gather(1, j + 1), (z.unsqueeze(1) - a_lo) / width)
    c = torch.where(one_hot.unsqueeze(1), c12, c3)  # [B, K]
    # c.A is the chosen A_k exactly in Cases 1-2; in Case 3 it is z_hat up to rounding, and taking z_hat
    # itself keeps a fused 0 (mixed signs, lambda = 0) exactly 0.
    return torch.where(one_hot, (c12 * A).sum(dim=1), z), c


def moca_coefficients(advantages: torch.Tensor, lam: torch.Tensor, *, tol: float = 1e-8) -> torch.Tensor:
    """Alg. 1, batched: simplex coefficients ``c [B, K]`` for per-objective advantages ``A [B, K]`` and
    exploration strengths ``lam [B]``.

    Case 1, ``max_k A - min_k A < tol``: one-hot on the argmax (the first index on ties). Otherwise
    ``z_hat = clip(lam / 2, min_k A, max_k A)``; Case 2, some ``|A_k - z_hat| < tol``: one-hot on the first such
    ``k``; Case 3: after a stable ascending sort, the first bracket ``A_(j) <= z_hat <= A_(j+1)`` gets the
    linear interpolation weights. In Case 3 both bracket ends are ``>= tol`` from ``z_hat``, so the bracket
    width is at least ``2 tol`` and the division is safe.
    """
    return _alg1(advantages, lam, tol)[1]


def moca_fuse(advantages: torch.Tensor, lam: torch.Tensor, *, tol: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused advantage ``z = c . A`` ``[B]`` (Alg. 2 line 13) and the Alg. 1 coefficients ``c [B, K]``.

    ``z`` equals ``clip(lam / 2, min_k A, max_k A)`` up to ``tol``: mixed-sign objectives whose sum is not
    positive fuse to exactly 0, and all-negative ones to the mildest (largest) advantage.
    """
    return _alg1(advantages, lam, tol)
