"""Reward-gain step credit: the per-step reward gain that TCD's similarity gain stands in for, measured directly.

Input: ``step_rewards [B, T+1, K]``, reward ``j`` of the decoded clean prediction ``x0_hat`` of state ``t``
(``t = T``: the final state). Transition ``t`` (``latents[:, t] -> latents[:, t+1]``) gains

    g[b, t, j] = step_rewards[b, t+1, j] - step_rewards[b, t, j]                      # [B, T, K]

the same differencing as TCD's Eq. 7 (our reading, docs/credit-schemes.md) and as ``otca analyze-credit``'s
``dR``. Each objective's gains are divided by that objective's std over the batch and states (its spread in
reward units), so that objectives of different scales are comparable and TCD's ``eps`` means the same for all.
Gains become weights by TCD's convention (Eq. 8 with the ``w_min`` floor, mean 1 over the trained steps:
:func:`otca.credit.tcd.tcd_weights_from_gains`):

- :func:`reward_gain_weights`: one profile per sample from the ``beta``-weighted sum of the scaled gains;
- :func:`objective_step_weights`: one profile per sample *and objective* ``[B, T, K]`` (the objective-aware
  schemes of :mod:`otca.credit.stepwise`);
- :func:`gain_profile` / :func:`ema_profile`: the mean profile ``[K, T]`` over samples and its running average
  over iterations, which the ``profile-moca`` scheme takes as ``CreditConfig.step_profile`` (no decodes), and
  which the trainer hands the step-reward schemes (``CreditInputs.gain_profile``) on the iterations where
  ``train.step_rewards_every > 1`` skips measuring step rewards (:func:`objective_gains`).
"""

from __future__ import annotations

import torch

from otca.credit.schemes import (
    CreditConfig,
    CreditInputs,
    compose_scheme,
    grpo_aggregator,
    moca_aggregator,
    register_scheme,
    requires,
)
from otca.credit.tcd import tcd_weights_from_gains


def reward_step_gains(step_rewards: torch.Tensor) -> torch.Tensor:
    """Per-transition reward gains ``g[:, t] = R[:, t+1] - R[:, t]``: ``[B, T+1, K] -> [B, T, K]`` fp32."""
    if step_rewards.dim() != 3 or step_rewards.shape[1] < 2:
        raise ValueError(f"step_rewards: expected a [B, T+1, K] tensor with T >= 1, got {list(step_rewards.shape)}")
    r = step_rewards.float()
    return r[:, 1:] - r[:, :-1]  # [B, T, K]


def scaled_step_gains(step_rewards: torch.Tensor) -> torch.Tensor:
    """:func:`reward_step_gains` divided by each objective's population std over all ``B * (T+1)`` values
    ``[B, T, K]``; an objective without spread has gains 0 (uniform weights after the TCD floor)."""
    r = step_rewards.float()
    sd = r.reshape(-1, r.shape[-1]).std(dim=0, unbiased=False)  # [K]
    g = reward_step_gains(r)  # [B, T, K]
    return torch.where(sd > 0, g / sd.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(g))  # [B, T, K]


def profile_for_every_sample(profile: torch.Tensor, batch: int) -> torch.Tensor:
    """One per-objective step profile ``[K, T]`` as every sample's gains ``[B, T, K]`` (a broadcast view)."""
    K, T = profile.shape
    return profile.float().T.unsqueeze(0).expand(batch, T, K)  # [B, T, K]


def objective_gains(inputs: CreditInputs) -> torch.Tensor:
    """Each sample's scaled per-objective step gains ``[B, T, K]``: :func:`scaled_step_gains` of
    ``inputs.step_rewards`` when given; else ``inputs.gain_profile [K, T]`` (the run's running profile, on
    iterations that do not measure step rewards), the same for every sample; else a one-line error."""
    if inputs.step_rewards is not None:
        return scaled_step_gains(inputs.step_rewards)  # [B, T, K]
    if inputs.gain_profile is not None:
        return profile_for_every_sample(inputs.gain_profile, inputs.rewards.shape[0])  # [B, T, K]
    raise ValueError(
        "CreditInputs.step_rewards: this scheme needs the rewards of the decoded clean prediction of every "
        "state [B, T+1, K] (or a gain_profile [K, T]); the trainer computes them for schemes whose scheme_needs() "
        "include 'step_rewards'"
    )


def objective_step_weights(
    gains: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6, w_min: float = 0.5
) -> torch.Tensor:
    """Mean-1 step weights per sample and objective ``w[b, t, j]`` ``[B, T, K]`` from gains ``[B, T, K]``.

    Objective ``j``'s column is :func:`otca.credit.tcd.tcd_weights_from_gains` of ``gains[:, :, j]`` (relu,
    ``eps``, ``w_min`` floor): mean 1 over each row's trained steps of ``mask [B, T]``, 0 outside.
    """
    if gains.dim() != 3:
        raise ValueError(f"gains: expected a [B, T, K] tensor, got {list(gains.shape)}")
    B, T, K = gains.shape
    rows = gains.float().permute(0, 2, 1).reshape(B * K, T)  # [B*K, T]
    m = None if mask is None else mask.unsqueeze(1).expand(B, K, T).reshape(B * K, T)  # [B*K, T]
    return tcd_weights_from_gains(rows, m, eps, w_min).reshape(B, K, T).permute(0, 2, 1)  # [B, T, K]


def _beta(inputs: CreditInputs) -> torch.Tensor:
    """The objective weights ``beta [K]`` (all ones when the inputs carry none)."""
    if inputs.reward_weights is not None:
        return inputs.reward_weights.float()
    return torch.ones(inputs.rewards.shape[1], dtype=torch.float32, device=inputs.rewards.device)


@requires("step_rewards")
def reward_gain_weights(inputs: CreditInputs, config: CreditConfig) -> torch.Tensor:
    """Temporal weighter ``[B, T]``: TCD's weights (Eq. 8, ``w_min`` floor, mean 1 over the trained steps) of
    the ``beta``-weighted sum of the scaled reward gains ``sum_j beta_j g[b, t, j] / sd_j``."""
    g = objective_gains(inputs) @ _beta(inputs)  # [B, T]
    return tcd_weights_from_gains(g, inputs.mask, config.eps_w, config.w_min)  # [B, T]


def gain_profile(step_rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each objective's mean scaled gain per transition ``[K, T]`` (over samples; over the samples that train
    transition ``t`` when ``mask [B, T]`` is given; 0 for a transition no sample trains)."""
    g = scaled_step_gains(step_rewards)  # [B, T, K]
    m = torch.ones(g.shape[:2], device=g.device) if mask is None else mask.float()  # [B, T]
    total = (g * m.unsqueeze(2)).sum(dim=0)  # [T, K]
    return (total / m.sum(dim=0).clamp_min(1).unsqueeze(1)).T.contiguous()  # [K, T]


def ema_profile(previous: torch.Tensor | None, current: torch.Tensor, decay: float) -> torch.Tensor:
    """Running profile over iterations ``[K, T]``: ``decay * previous + (1 - decay) * current`` (``current`` on
    the first call, when ``previous`` is None)."""
    if not 0 <= decay < 1:
        raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
    if previous is None:
        return current.float().clone()
    if previous.shape != current.shape:
        raise ValueError(f"profile: expected shape {list(previous.shape)} like the running one, got "
                         f"{list(current.shape)}")
    return decay * previous.float() + (1 - decay) * current.float()  # [K, T]


# (a) as schemes: the reward-gain weighter in place of TCD's, with the linear (grpo) and the MOCA fusion
register_scheme("reward-gain")(compose_scheme(reward_gain_weights, grpo_aggregator))
register_scheme("reward-gain-moca")(compose_scheme(reward_gain_weights, moca_aggregator))
