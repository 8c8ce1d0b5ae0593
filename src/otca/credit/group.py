"""Group statistics and the group-relative advantages of GRPO (paper Eq. 2), plus the linear reward aggregators.

Samples of one prompt share a group id. Every function is vectorized over groups (``index_add`` /
``scatter_reduce`` on the group index), computes in fp32, and gives 0, never NaN, for a group whose values
are all equal (zero variance, or a single sample).

The aggregators turn rewards ``[B, K]`` into one advantage per sample ``z [B]`` and also return the
per-objective parts ``A [B, K]`` they combined, so that credit diagnostics can say which objective drove ``z``.
"""

from __future__ import annotations

from typing import Literal

import torch

Std = Literal["unbiased", "population"]
Scope = Literal["group", "batch"]


def _group_index(group_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """Contiguous group index ``[B]`` in ``0..G-1`` and the number of groups ``G``."""
    if group_ids.dim() != 1 or group_ids.shape[0] != batch:
        raise ValueError(f"group_ids: expected shape [{batch}], got {list(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids: expected an integer tensor, got {group_ids.dtype}")
    uniq, inv = torch.unique(group_ids, return_inverse=True)  # [G], [B]
    return inv, uniq.numel()


def _std_divisor(n: torch.Tensor, std: Std) -> torch.Tensor:
    """``n - 1`` (Bessel; torch.std, DanceGRPO) or ``n`` (np.std, Flow-GRPO), at least 1 so that a single
    sample has std 0 instead of NaN."""
    if std not in ("unbiased", "population"):
        raise ValueError(f"std: expected 'unbiased' or 'population', got {std!r}")
    return (n - 1 if std == "unbiased" else n).clamp_min(1)


def group_center(
    x: torch.Tensor, group_ids: torch.Tensor, *, std: Std = "unbiased", scope: Scope = "group"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deviation from the group mean ``x - mean_g`` ``[B, K]``, the std it is divided by ``[B, K]``, and
    whether the sample's group is constant in that column ``[B, K]`` bool.

    ``x [B, K]``; ``scope="group"``: std within each group; ``"batch"``: one std over the whole batch
    (Flow-GRPO ``global_std``) while the mean stays per group. The deviation is exactly 0 in a group whose
    values are all equal, whatever the rounding of its mean, so such groups give exactly-0 advantages.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a [B, K] tensor, got shape {list(x.shape)}")
    if scope not in ("group", "batch"):
        raise ValueError(f"scope: expected 'group' or 'batch', got {scope!r}")
    x = x.float()
    B, K = x.shape
    inv, G = _group_index(group_ids, B)
    n = torch.bincount(inv, minlength=G).unsqueeze(1).float()  # [G, 1]
    mean = x.new_zeros(G, K).index_add_(0, inv, x) / n  # [G, K]
    dev = x - mean[inv]  # [B, K]
    idx = inv.unsqueeze(1).expand(B, K)  # [B, K]
    hi = x.new_empty(G, K).scatter_reduce_(0, idx, x, "amax", include_self=False)  # [G, K]
    lo = x.new_empty(G, K).scatter_reduce_(0, idx, x, "amin", include_self=False)  # [G, K]
    constant = (hi == lo)[inv]  # [B, K]
    dev = torch.where(constant, torch.zeros_like(dev), dev)  # [B, K]
    if scope == "group":
        ss = x.new_zeros(G, K).index_add_(0, inv, dev**2)  # [G, K]
        sd = (ss / _std_divisor(n, std)).sqrt()[inv]  # [B, K]
    else:
        centred = x - x.mean(dim=0, keepdim=True)  # [B, K]
        sd = ((centred**2).sum(dim=0, keepdim=True) / _std_divisor(torch.tensor(float(B)), std)).sqrt()
        sd = sd.expand(B, K)  # [B, K]
    return dev, sd, constant


def group_normalize(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std: Std = "unbiased",
    eps: float = 1e-8,
    scope: Scope = "group",
) -> torch.Tensor:
    """Group-relative advantages ``(r - mean_g) / (std + eps)`` ``[B, K]``, per group and objective (Eq. 2).

    ``rewards [B, K]``, ``group_ids [B]`` (integers; equal ids form a group). Defaults are DanceGRPO's
    (unbiased std, eps 1e-8); Flow-GRPO uses ``std="population", eps=1e-4`` and ``scope="batch"``.
    """
    dev, sd, constant = group_center(rewards, group_ids, std=std, scope=scope)  # [B, K] each
    return torch.where(constant, torch.zeros_like(dev), dev / (sd + eps))  # [B, K]; 0, not 0/0, when eps = 0


def _check_weights(weights: torch.Tensor, k: int) -> torch.Tensor:
    if weights.shape != (k,):
        raise ValueError(f"reward_weights: expected shape [{k}], got {list(weights.shape)}")
    return weights.float()


def normalize_then_sum(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    std: Std = "unbiased",
    eps: float = 1e-8,
    scope: Scope = "group",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = sum_k beta_k A_k`` ``[B]`` with per-objective group advantages ``A [B, K]`` (returned too).

    DanceGRPO's multi-reward advantage (``vq_coef * A_vq + mq_coef * A_mq``, ``train_grpo_hunyuan.py``) and
    MixGRPO's ``advantage_aggr``; ``weights`` ``beta [K]``.
    """
    A = group_normalize(rewards, group_ids, std=std, eps=eps, scope=scope)  # [B, K]
    return A @ _check_weights(weights, A.shape[1]), A


def sum_then_normalize(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    std: Std = "population",
    eps: float = 1e-4,
    scope: Scope = "group",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's advantage of the weighted raw sum, ``z = (s - mean_g s) / (std(s) + eps)`` with
    ``s = sum_k beta_k r_k`` ``[B]`` (``rewards.multi_score`` then ``PerPromptStatTracker``).

    Returns ``z [B]`` and its exact split ``A [B, K]``, ``A_k = (r_k - mean_g r_k) / (std(s) + eps)``, so that
    ``z = sum_k beta_k A_k``: the parts show when one objective's raw scale dominates the sum.
    """
    beta = _check_weights(weights, rewards.shape[1])
    s = rewards.float() @ beta.unsqueeze(1)  # [B, 1]
    _, sd_s, constant_s = group_center(s, group_ids, std=std, scope=scope)  # [B, 1] each
    dev_r, _, _ = group_center(rewards, group_ids, std=std, scope=scope)  # [B, K]
    # A group whose weighted sum is constant gets 0 (as group_normalize gives it), not dev_r / eps.
    A = torch.where(constant_s, torch.zeros_like(dev_r), dev_r / (sd_s + eps))  # [B, K]
    return A @ beta, A


def gdpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    std: Std = "unbiased",
    eps: float = 1e-4,
    scope: Scope = "group",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GDPO (arXiv 2601.05242): per-objective group z-scores ``A [B, K]``, weighted sum, then one batch-wise
    ``(x - mean) / (std + eps)`` ``[B]``. Defaults follow its TRL integration (torch std, eps 1e-4 twice).

    Returns ``z [B]`` and ``A [B, K]`` (the per-objective z-scores before the batch renormalisation).
    """
    pre, A = normalize_then_sum(rewards, group_ids, weights, std=std, eps=eps, scope=scope)  # [B], [B, K]
    whole_batch = torch.zeros_like(group_ids)  # [B]: one group
    return group_normalize(pre.unsqueeze(1), whole_batch, std=std, eps=eps).squeeze(1), A
