"""Objective-aware per-step credit: each objective gets its own step profile, and MOCA fuses per step.

The paper promises every step "a timestep-aware objective mixture" (Sec. 1, Sec. 3.3: "step-conditioned
reward weights throughout the trajectory"), but its effective advantage (Sec. 3.3, used in Eq. 15) is
``A_tilde[i, t] = w[i, t] * sum_k c[i, k] A[i, k]``: one set of MOCA coefficients ``c`` per sample, the same at
every step. Here the mixture does depend on the step. With per-objective step weights ``w[b, t, j]`` (mean 1
over the trained steps for each objective) the per-step, per-objective advantages are

    A_step[b, t, j] = w[b, t, j] * A[b, j]                                             # [B, T, K]

and every row ``A_step[b, t, :]`` is fused by MOCA (Eq. 13-14, Alg. 1) with the per-step exploration strength
``lambda[b, t] = relu(sum_j A_step) / (|sum_j A_step| + eps) * tanh(e_b)``, where ``e_b`` is the sample's Eq. 12
signal (from TCD's trajectory score ``q``, as in MOCA). So an objective whose reward forms early (a digit's
identity) weighs more in the early steps' mixture, one that forms late (stroke detail) in the late steps'.

What the solver does with such rows: MOCA's fused value is ``clip(lambda / 2, min_j A_step, max_j A_step)``
(:mod:`otca.credit.moca`), so the step profiles move the fused value only through the bracket ends: a step
where every weighted advantage is above ``lambda / 2`` is credited with the smallest of them, one where all
are below it with the largest. Samples whose objectives are all positive (or all negative) keep that sign at
every step; mixed-sign samples get ``lambda[b, t] / 2 >= 0`` at each step. The fused values of a sample
therefore never change sign across steps, which lets the result factor exactly as every scheme's does:

    m[b]          = mean of z[b, t] over the trained steps                  # the per-sample advantage
    per_sample[b] = clamp(m[b], -adv_clip, adv_clip)                        # clipped before the weights
    weights[b, t] = z[b, t] / m[b]   (the mask where m = 0)                 # >= 0, mean 1 over the trained steps
    advantages    = weights * per_sample[:, None]

With ``w_min = 1`` every profile is flat and the scheme is exactly ``moca``. The coefficients reported are
Alg. 1's ``c`` averaged over the trained steps; the metrics add ``coef_early/<name>`` and ``coef_late/<name>``,
the mean coefficient over the first and second half of the trained transitions.

Two sources of per-objective gains are registered (docs/credit-schemes.md):

- ``step-moca``: the scaled per-step reward gains of each sample (``CreditInputs.step_rewards``, T decodes and
  reward calls per sample, :mod:`otca.credit.reward_gain`);
- ``profile-moca``: one fixed profile per objective, ``CreditConfig.step_profile`` (K lists of T gains, e.g.
  :func:`otca.credit.reward_gain.gain_profile` of an earlier run, or its running average), no decodes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from otca.credit.group import group_normalize
from otca.credit.moca import exploration_gate, exploration_signal, moca_fuse, trajectory_score
from otca.credit.reward_gain import objective_gains, objective_step_weights, profile_for_every_sample
from otca.credit.schemes import (
    Aggregate,
    CreditConfig,
    CreditInputs,
    CreditOutput,
    CreditScheme,
    _gains,
    _normalization,
    _reward_weights,
    credit_metrics,
    register_scheme,
    requires,
    scheme_needs,
)
from otca.credit.tcd import eq8_weights

# (inputs, config) -> per-objective step gains [B, T, K]
GainSource = Callable[[CreditInputs, CreditConfig], torch.Tensor]


def stepwise_moca_fuse(
    advantages: torch.Tensor,
    step_weights: torch.Tensor,
    tanh_e: torch.Tensor,
    *,
    eps: float = 1e-6,
    tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MOCA per step: ``(z [B, T], c [B, T, K], lambda [B, T])`` for ``A [B, K]``, ``w [B, T, K]``, ``tanh(e) [B]``.

    Row ``(b, t)`` is ``A_step = w[b, t] * A[b]`` with ``lambda = gate(A_step) * tanh(e_b)`` (Eq. 14, gate =
    :func:`otca.credit.moca.exploration_gate`), fused by the batched Alg. 1 over ``[B*T, K]`` rows.
    """
    B, T, K = step_weights.shape
    if advantages.shape != (B, K) or tanh_e.shape != (B,):
        raise ValueError(f"advantages, tanh_e: expected [{B}, {K}] and [{B}] for step weights [{B}, {T}, {K}], "
                         f"got {list(advantages.shape)} and {list(tanh_e.shape)}")
    rows = (step_weights.float() * advantages.float().unsqueeze(1)).reshape(B * T, K)  # [B*T, K]
    lam = exploration_gate(rows, eps) * tanh_e.float().repeat_interleave(T)  # [B*T], Eq. 14 per step
    z, c = moca_fuse(rows, lam, tol=tol)  # [B*T], [B*T, K]
    return z.reshape(B, T), c.reshape(B, T, K), lam.reshape(B, T)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, T, ...]`` over each row's masked steps ``[B, ...]`` (over all steps for a row without)."""
    m = mask.float()  # [B, T]
    m = torch.where(m.sum(dim=1, keepdim=True) > 0, m, torch.ones_like(m))  # [B, T]
    m = m.reshape(*m.shape, *([1] * (x.dim() - 2)))  # [B, T, 1...]
    return (x * m).sum(dim=1) / m.sum(dim=1)  # [B, ...]


def _half_means(c: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean coefficient ``[K]`` over the (sample, step) pairs of the first and of the second half of the trained
    transitions (by the transition index ``t`` against the middle of the trained range)."""
    steps = mask.any(dim=0).nonzero().flatten()  # trained transition indices
    T = mask.shape[1]
    mid = (steps.min() + steps.max()).float() / 2 if steps.numel() else torch.tensor(T / 2)
    t = torch.arange(T, device=mask.device).float()  # [T]
    early = mask & (t <= mid).unsqueeze(0)  # [B, T]
    late = mask & (t > mid).unsqueeze(0)  # [B, T]
    out = []
    for part in (early, late):
        n = part.sum().clamp_min(1)
        out.append((c * part.unsqueeze(2).float()).sum(dim=(0, 1)) / n)  # [K]
    return out[0], out[1]


def objective_step_scheme(source: GainSource) -> CreditScheme:
    """The objective-aware per-step MOCA scheme (module docstring) with per-objective gains from ``source``."""

    def scheme(inputs: CreditInputs, config: CreditConfig) -> CreditOutput:
        mask = inputs.mask
        norm = _normalization(config, "unbiased", 1e-8)
        A = group_normalize(inputs.rewards, inputs.group_ids, **norm) * _reward_weights(inputs, config)  # [B, K]
        dS = _gains(inputs)  # [B, T]
        q = trajectory_score(dS, eq8_weights(dS, None, config.eps_w))  # [B], Eq. 12 as MOCA
        e = exploration_signal(q, inputs.group_ids, eps=config.eps_moca, center=config.center_q, std=norm["std"])
        w = objective_step_weights(source(inputs, config), mask, config.eps_w, config.w_min)  # [B, T, K]
        z, c, lam = stepwise_moca_fuse(A, w, torch.tanh(e), eps=config.eps_moca, tol=config.tol)  # [B, T], ...
        z = z * mask  # [B, T], no credit outside the trained steps
        n = mask.sum(dim=1)  # [B]
        m = z.sum(dim=1) / n.clamp_min(1)  # [B], 0 for a sample without trained steps
        per_sample = m.clamp(-config.adv_clip, config.adv_clip)  # [B]
        safe = torch.where(m == 0, torch.ones_like(m), m)  # [B]
        # z never changes sign along a row (module docstring); the clamp only removes round-off of a fused ~0
        weights = torch.where((m == 0).unsqueeze(1), mask.float(), (z / safe.unsqueeze(1)).clamp_min(0)) * mask
        advantages = weights * per_sample.unsqueeze(1)  # [B, T]
        names = inputs.reward_names or tuple(str(k) for k in range(inputs.rewards.shape[1]))
        early, late = _half_means(c, mask)  # [K], [K]
        extra = {"lambda_mean": _masked_mean(lam, mask).mean()}
        extra.update({f"coef_early/{name}": early[k] for k, name in enumerate(names)})
        extra.update({f"coef_late/{name}": late[k] for k, name in enumerate(names)})
        agg = Aggregate(m, A, _masked_mean(c, mask), extra)  # coefficients [B, K]: c averaged over trained steps
        metrics = credit_metrics(agg, per_sample, weights, advantages, mask, names)
        return CreditOutput(advantages, weights, per_sample, A, agg.coefficients, metrics)

    return requires("gains", *scheme_needs(source))(scheme)


@requires("step_rewards")
def reward_gain_source(inputs: CreditInputs, config: CreditConfig) -> torch.Tensor:
    """Per-objective gains from the inputs' step rewards (or the run's running profile on iterations without
    them): :func:`otca.credit.reward_gain.objective_gains`."""
    return objective_gains(inputs)  # [B, T, K]


def profile_source(inputs: CreditInputs, config: CreditConfig) -> torch.Tensor:
    """Per-objective gains from ``config.step_profile`` (K lists of T), the same for every sample ``[B, T, K]``."""
    B, K = inputs.rewards.shape
    T = inputs.mask.shape[1]
    profile = config.step_profile
    if profile is None:
        raise ValueError("CreditConfig.step_profile: this scheme needs a per-objective step profile (K lists of T "
                         "numbers, e.g. otca.credit.gain_profile of an earlier run); got None")
    p = torch.tensor(profile, dtype=torch.float32, device=inputs.rewards.device)  # [K', T']
    if p.shape != (K, T):
        raise ValueError(f"CreditConfig.step_profile: expected {K} lists (one per reward) of {T} numbers (one per "
                         f"transition), got {p.shape[0]} lists of {p.shape[1]}")
    return profile_for_every_sample(p, B)  # [B, T, K]


register_scheme("step-moca")(objective_step_scheme(reward_gain_source))  # per-sample reward-gain profiles
register_scheme("profile-moca")(objective_step_scheme(profile_source))  # a fixed profile per objective
