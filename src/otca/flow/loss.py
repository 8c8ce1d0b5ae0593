"""The policy loss over per-(sample, step) log-probabilities and advantages, with a registry of surrogate
objectives (``clip``: PPO / GRPO; ``log-hinge``: PCPO). Advantages are taken as given: credit schemes clip
the fused per-sample advantage before temporal weighting, so nothing is clipped here."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from otca.registry import Registry

# (log_ratio [B, T], advantages [B, T], clip_range) -> per-entry loss to minimise [B, T]
Objective = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]

OBJECTIVES: Registry[Objective] = Registry("policy objective")

_METRIC_NAMES = ("clip_frac", "ratio_mean", "ratio_min", "ratio_max", "approx_kl", "policy_loss")


@OBJECTIVES.register("clip")
def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` per entry ``[B, T]``, rho = exp(log_ratio): the negated
    clipped objective of paper Eq. 1, with the per-step advantages of Eq. 15 (DanceGRPO / Flow-GRPO loss)."""
    ratio = torch.exp(log_ratio)  # [B, T]
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)  # [B, T]
    return -torch.minimum(ratio * advantages, clipped * advantages)  # [B, T]


@OBJECTIVES.register("log-hinge")
def log_hinge(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PCPO's log-hinge ``max(0, eps |A| - A log rho)`` per entry ``[B, T]`` (arXiv 2509.25774): the hinge
    form of the clipped objective with ``rho - 1`` replaced by ``log rho``; its gradient is ``-A grad log rho``
    while active, on the same active set as PPO clipping for a small ``eps``."""
    return torch.relu(clip_range * advantages.abs() - advantages * log_ratio)  # [B, T]


def _check_bt(t: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    if t.shape != ref.shape or t.dim() != 2:
        raise ValueError(f"{name}: expected a [B, T] tensor of shape {tuple(ref.shape)}, got {tuple(t.shape)}")


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    objective: str = "clip",
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise (a scalar) and its metrics, over the trained entries of ``mask [B, T]`` (bool).

    ``log_probs [B, T]`` (with gradient), ``old_log_probs [B, T]`` (from the rollout), ``advantages [B, T]``
    (per-step, already clipped and weighted by the credit scheme), optional ``kl [B, T]`` (e.g. from
    :func:`otca.flow.kl_to_reference`) added as ``kl_coef * kl``. Every per-entry term is reduced by the mean
    over the trained entries (paper Eq. 15's ``1/G 1/T``; an empty mask gives 0). Masked-out entries
    contribute nothing, not even gradient, whatever they hold (inf and NaN included).

    Gradient accumulation: with ``normalizer`` the loss is the *sum* over trained entries divided by
    ``normalizer``; calling this on chunks of steps (or samples) with ``normalizer`` = the total number of
    trained entries and summing the chunk losses reproduces the full-batch mean exactly.

    Metrics (python floats, means over this call's trained entries, NaN when there are none): ``clip_frac``
    (fraction with ``|rho - 1| > clip_range``), ``ratio_mean/min/max``, ``approx_kl`` (mean of
    ``rho - 1 - log rho``), ``policy_loss`` (the objective term alone), ``kl`` (if given) and ``num_trained``.
    """
    _check_bt(log_probs, log_probs, "log_probs")
    _check_bt(old_log_probs, log_probs, "old_log_probs")
    _check_bt(advantages, log_probs, "advantages")
    _check_bt(mask, log_probs, "mask")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor, got {mask.dtype}")
    if not (isinstance(clip_range, (int, float)) and math.isfinite(clip_range) and clip_range >= 0):
        raise ValueError(f"clip_range: expected a finite number >= 0, got {clip_range!r}")
    if normalizer is not None and not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer: expected a finite number > 0 or None, got {normalizer!r}")
    if kl is not None:
        _check_bt(kl, log_probs, "kl")
    elif kl_coef != 0:
        raise ValueError(f"kl: expected a [B, T] tensor since kl_coef is {kl_coef}, got None")
    surrogate = OBJECTIVES.get(objective)

    # Zero masked entries *before* any nonlinearity: where() then routes them an exact-zero gradient, whereas
    # zeroing afterwards would multiply a zero by an inf/NaN local derivative.
    log_ratio = torch.where(mask, log_probs.float() - old_log_probs.float(), 0.0)  # [B, T]
    adv = torch.where(mask, advantages.float(), 0.0)  # [B, T]
    per_entry = torch.where(mask, surrogate(log_ratio, adv, float(clip_range)), 0.0)  # [B, T]
    kl_term = None if kl is None else torch.where(mask, kl.float(), 0.0)  # [B, T]
    total = per_entry if kl_term is None else per_entry + kl_coef * kl_term  # [B, T]
    count = int(mask.sum())
    loss = total.sum() / (normalizer if normalizer is not None else max(count, 1))

    metrics = _metrics(log_ratio.detach(), per_entry.detach(), kl_term, mask, float(clip_range), count)
    return loss, metrics


def _metrics(
    log_ratio: torch.Tensor,
    per_entry: torch.Tensor,
    kl: torch.Tensor | None,
    mask: torch.Tensor,
    clip_range: float,
    count: int,
) -> dict[str, float]:
    """Ratio and loss diagnostics over the trained entries of ``mask [B, T]``, fetched in one transfer."""
    names = _METRIC_NAMES + (() if kl is None else ("kl",))
    if count == 0:
        return {**{n: math.nan for n in names}, "num_trained": 0.0}
    lr = log_ratio[mask]  # [N]
    ratio = torch.exp(lr)  # [N]
    values = [
        ((ratio - 1).abs() > clip_range).float().mean(),
        ratio.mean(),
        ratio.min(),
        ratio.max(),
        (ratio - 1 - lr).mean(),
        per_entry[mask].mean(),
    ]
    if kl is not None:
        values.append(kl.detach()[mask].mean())
    return {**dict(zip(names, torch.stack(values).tolist(), strict=True)), "num_trained": float(count)}
