"""The policy loss over per-(sample, step) log-probabilities and advantages, with a registry of surrogate
objectives (``clip``: PPO / GRPO; ``log-hinge``: PCPO) and a registry of ratio guards (``none``; ``ratio-norm``:
GRPO-Guard's RatioNorm with its per-step gradient reweighting). Advantages are taken as given: credit schemes
clip the fused per-sample advantage before temporal weighting, so nothing is clipped here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


@dataclass(frozen=True)
class StepGeometry:
    """What a ratio guard may read about each trained transition, all ``[B, T]`` fp32: ``mean_sq_dev`` the mean
    over latent dims of ``(mean_theta - mean_old)^2`` (with gradient through ``mean_theta``), ``std`` the
    transition's std, ``dt = sigma - sigma_next > 0``. Build one step's with :meth:`of_step`."""

    mean_sq_dev: torch.Tensor  # [B, T]
    std: torch.Tensor  # [B, T]
    dt: torch.Tensor  # [B, T]

    @staticmethod
    def of_step(
        mean: torch.Tensor, old_mean: torch.Tensor, std: torch.Tensor, sigma: float, sigma_next: float
    ) -> StepGeometry:
        """One step's geometry ``[B, 1]`` from the transition means ``[B, *latent]`` under the current and the
        rollout policy and its ``std [B, 1, ..., 1]`` (what a :class:`~otca.flow.sde.Transition` returns)."""
        dims = tuple(range(1, mean.dim()))
        sq = ((mean.float() - old_mean.float()) ** 2).mean(dim=dims)  # [B]
        dt = torch.full_like(sq, float(sigma) - float(sigma_next))  # [B]
        return StepGeometry(sq[:, None], std.float().reshape(-1)[:, None].detach(), dt[:, None].detach())


class RatioGuard(Protocol):
    """A transform of the log importance ratio before the surrogate: ``(log_ratio [B, T], geometry) ->
    (guarded log_ratio [B, T], per-entry loss weight [B, T])``. ``needs_geometry``: whether it reads a
    :class:`StepGeometry` (then the rollout must keep the transition means)."""

    @property
    def needs_geometry(self) -> bool: ...

    def __call__(
        self, log_ratio: torch.Tensor, geometry: StepGeometry | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


RATIO_GUARDS: Registry[RatioGuard] = Registry("ratio guard")


@dataclass(frozen=True)
class NoGuard:
    """The plain ratio, weight 1 (Flow-GRPO, DanceGRPO, the OTCA paper)."""

    needs_geometry: bool = False

    def __call__(self, log_ratio: torch.Tensor, geometry: StepGeometry | None) -> tuple[torch.Tensor, torch.Tensor]:
        return log_ratio, torch.ones_like(log_ratio)


@dataclass(frozen=True)
class RatioNorm:
    """GRPO-Guard (Wang et al., arXiv 2510.22319, CVPR 2026): RatioNorm plus per-step gradient reweighting.

    For a Gaussian step with shared std ``s = sigma_t sqrt(dt)`` and ``x' = mean_old + s eps``, the per-dim
    log-ratio is ``log r = eps * d / s - d^2 / (2 s^2)`` with ``d = mean_theta - mean_old``: its mean is biased
    below 0 by ``d^2 / (2 s^2)`` and its spread scales with ``1 / s``, which differs across steps (the paper's
    diagnosis). RatioNorm removes the bias and rescales by the std:

        log r_hat = s * (log r + mean_d(d^2) / (2 s^2))        (= s * mean_d(eps d / s) = mean_d(eps d) for D = 1)

    and the gradient reweighting multiplies each step's surrogate by ``delta = 1 / dt``:

        J = 1/G sum_i 1/T sum_t delta_t * min(r_hat A, clip(r_hat, 1 - eps, 1 + eps) A).

    Reading of the formula: the paper's equations as carried by its official code (Flow-GRPO's
    ``train_sd3_GRPO_Guard.py``: ``ratio = exp((logp - logp_old + mse / (2 s^2)) * s)`` with the per-dim mean
    convention, and ``policy_loss / sqrt_dt^2``); ``s`` here is the transition's own std, so the same code serves
    Flow-SDE, Dance-SDE and CPS, while ``delta = 1 / dt`` is the paper's choice derived for the SDE steps (whose
    mean moves by ``dt`` times the velocity). The paper pairs it with a tiny clip range (2e-6 to 4e-6): the
    normalised log-ratio is of the order of the mean change, not of its ratio to the std.
    """

    needs_geometry: bool = True

    def __call__(self, log_ratio: torch.Tensor, geometry: StepGeometry | None) -> tuple[torch.Tensor, torch.Tensor]:
        if geometry is None:
            raise ValueError("ratio guard 'ratio-norm': needs the step geometry (transition means, std, dt)")
        s = geometry.std.float()  # [B, T]
        bias = geometry.mean_sq_dev.float() / (2 * s**2)  # [B, T]
        return s * (log_ratio + bias), 1.0 / geometry.dt.float()  # [B, T], [B, T]


RATIO_GUARDS.register("none")(NoGuard())
RATIO_GUARDS.register("ratio-norm")(RatioNorm())


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
    ratio_guard: str = "none",
    geometry: StepGeometry | None = None,
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

    ``ratio_guard`` (a name in :data:`RATIO_GUARDS`) transforms the log-ratio before the objective and weights
    each entry's objective term (not the KL); ``geometry`` is what it reads (:class:`StepGeometry`, ``[B, T]``
    fields). The ratio metrics are those of the guarded ratio.

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
    guard = RATIO_GUARDS.get(ratio_guard)

    # Zero masked entries *before* any nonlinearity: where() then routes them an exact-zero gradient, whereas
    # zeroing afterwards would multiply a zero by an inf/NaN local derivative.
    log_ratio = torch.where(mask, log_probs.float() - old_log_probs.float(), 0.0)  # [B, T]
    if geometry is not None:  # masked-out entries get harmless values, like the ratio (no inf/NaN gradient)
        for name in ("mean_sq_dev", "std", "dt"):
            _check_bt(getattr(geometry, name), log_probs, f"geometry.{name}")
        geometry = StepGeometry(
            torch.where(mask, geometry.mean_sq_dev.float(), 0.0),
            torch.where(mask, geometry.std.float(), 1.0),
            torch.where(mask, geometry.dt.float(), 1.0),
        )
    log_ratio, weight = guard(log_ratio, geometry)  # [B, T], [B, T]
    log_ratio = torch.where(mask, log_ratio, 0.0)  # [B, T]
    adv = torch.where(mask, advantages.float(), 0.0)  # [B, T]
    per_entry = torch.where(mask, weight * surrogate(log_ratio, adv, float(clip_range)), 0.0)  # [B, T]
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
