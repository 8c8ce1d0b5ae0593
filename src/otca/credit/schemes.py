"""Credit schemes: one registry, one signature ``fn(CreditInputs, CreditConfig) -> CreditOutput``.

A scheme turns one rollout's rewards ``[B, K]`` into per-step advantages ``[B, T]``. Every built-in scheme is
a temporal weighter (uniform, TCD, PCPO, TempFlow: ``[B, T]`` mean 1 over the trained steps) times a reward
aggregator (one advantage per sample), composed by :func:`compose_scheme`:

    per_sample = clamp(aggregate(rewards), -adv_clip, adv_clip)       # [B], clipped before the weights
    advantages = weights * per_sample[:, None]                        # [B, T], 0 outside the mask

so OTCA is ``A_tilde[i, k] = w_hat[i, k] * z_i`` and a scheme with all-one weights is the uniform broadcast of
DanceGRPO / Flow-GRPO. A user scheme is one decorated function (or one :func:`compose_scheme` call); the
trainer only ever calls ``get_scheme(name)(inputs, config)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from otca.credit.group import gdpo_advantages, group_normalize, normalize_then_sum, sum_then_normalize
from otca.credit.moca import exploration_strength, moca_fuse, trajectory_score
from otca.credit.tcd import eq8_weights, tcd_gains, tcd_weights_from_gains
from otca.credit.weights import pcpo_weights, tempflow_weights
from otca.registry import Registry


class CreditConfig(BaseModel):
    """Options of the credit math; every scheme reads the ones it uses. The run config embeds this model."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    adv_clip: float = Field(5.0, gt=0)
    """Clamp the fused per-sample advantage to [-adv_clip, adv_clip] before the temporal weights multiply it
    (DanceGRPO / Flow-GRPO adv_clip_max); clamping afterwards would undo the temporal redistribution."""
    w_min: float = Field(0.5, ge=0, le=1)
    """TCD floor on the mean-1 scale (paper Sec. 6.5): w_hat = w_min + (1 - w_min) * n_trained * w, so every
    trained step gets at least w_min; 1 gives the uniform broadcast."""
    eps_w: float = Field(1e-6, gt=0)
    """Epsilon of TCD Eq. 8, added to every clipped gain so that steps without gain keep a small weight."""
    eps_moca: float = Field(1e-6, gt=0)
    """Epsilon of MOCA Eq. 12 (std of q) and Eq. 14 (|sum of advantages|) (paper Sec. 6.5)."""
    tol: float = Field(1e-8, ge=0)
    """Tolerance of MOCA Alg. 1 for its all-equal (Case 1) and exact-match (Case 2) tests."""
    center_q: bool = False
    """MOCA Eq. 12 with |q - mean_group(q)| (the "deviation from the group average" of Sec. 6.2) instead of the
    paper's literal |q|; with shared initial noise |q| / std(q) is large and tanh(e) is then nearly always 1."""
    std: Literal["unbiased", "population"] | None = None
    """Std of the group normalisation; None = the scheme's peer convention: unbiased (torch.std, DanceGRPO) for
    grpo, gdpo, tcd, moca, otca, pcpo, tempflow; population (np.std, Flow-GRPO) for flow-grpo."""
    eps_std: float | None = Field(None, gt=0)
    """Epsilon added to the std; None = the scheme's peer value: 1e-8 (DanceGRPO) for grpo, tcd, moca, otca,
    pcpo, tempflow; 1e-4 for flow-grpo (Flow-GRPO) and gdpo (both of its normalisations)."""
    batch_std: bool = False
    """Divide by one std over the whole batch instead of each group's (Flow-GRPO global_std); means stay per
    group. Applies to every scheme's reward normalisation (not to MOCA's Eq. 12 std of q)."""
    adv_scale: Literal["none", "unit-mean-abs"] = "none"
    """Rescale each iteration's advantages after the scheme, identically for every scheme: 'unit-mean-abs'
    multiplies them by one number so that their mean |A| over the trained entries is 1 (equal step sizes across
    schemes, otca.credit.scale); 'none' leaves them as the scheme made them."""
    step_profile: tuple[tuple[float, ...], ...] | None = None
    """Per-objective step profile of the profile-moca scheme: K lists (one per reward, in the run's reward order)
    of T numbers (one per sampler transition), e.g. each objective's mean per-step reward gain of the clean
    prediction (otca.credit.gain_profile) measured on an earlier run; turned into mean-1 weights with the TCD
    floor (relu, eps_w, w_min). None: the scheme is unusable. Other schemes ignore it."""

    @field_validator("step_profile")
    @classmethod
    def _profile_rows(cls, v: tuple[tuple[float, ...], ...] | None) -> tuple[tuple[float, ...], ...] | None:
        if v is not None:
            lengths = {len(row) for row in v}
            if not v or len(lengths) != 1 or 0 in lengths or not all(math.isfinite(x) for row in v for x in row):
                raise ValueError(f"expected K >= 1 lists of the same length T >= 1 of finite numbers, got lengths "
                                 f"{[len(row) for row in v]}")
        return v


def _require(ok: bool, field_name: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"CreditInputs.{field_name}: expected {expected}, got {got}")


@dataclass(frozen=True, eq=False)
class CreditInputs:
    """What every credit scheme receives (one rollout, all samples of every group).

    ``gains`` are the TCD similarity gains of :func:`otca.credit.tcd.tcd_gains`; schemes that need them (tcd,
    moca, otca) raise without them. The trainer computes them per process and all-gathers them, so schemes
    never see latents. ``step_rewards`` are the rewards of the decoded clean prediction of every state (costly:
    T decodes and reward calls per sample), computed only when the scheme declares it needs them
    (:func:`scheme_needs`).
    """

    rewards: torch.Tensor  # [B, K] raw scores, one column per objective
    group_ids: torch.Tensor  # [B] integer; samples of one prompt share an id
    mask: torch.Tensor  # [B, T] bool: the trained steps
    sigmas: torch.Tensor  # [T+1] the sampler's schedule, decreasing from noise (1) to data (0)
    gains: torch.Tensor | None = None  # [B, T] TCD gains dS_k
    # [K] objective weights beta (linear aggregators: sum_k beta_k A_k; MOCA scales A_k by beta_k)
    reward_weights: torch.Tensor | None = None
    reward_names: tuple[str, ...] | None = None  # K names used in the metrics (share/<name>); default "0".."K-1"
    step_rewards: torch.Tensor | None = None  # [B, T+1, K] reward k of decode(x0_hat) at state t; t = T the final
    # [K, T] a per-objective step-gain profile shared by every sample (the run's running mean of the scaled gains of
    # step_rewards), given in place of step_rewards on iterations that do not measure them (docs/credit-schemes.md)
    gain_profile: torch.Tensor | None = None

    def __post_init__(self) -> None:
        r, m = self.rewards, self.mask
        _require(r.dim() == 2 and r.shape[1] >= 1 and r.is_floating_point(), "rewards", "a float [B, K] tensor",
                 f"{r.dtype} {list(r.shape)}")
        B, K = r.shape
        bad = (~torch.isfinite(r)).any(dim=0).nonzero().flatten().tolist()
        _require(not bad, "rewards", "finite values", f"NaN/inf in objective column(s) {bad}")
        _require(self.group_ids.shape == (B,) and not self.group_ids.is_floating_point(), "group_ids",
                 f"an integer [{B}] tensor", f"{self.group_ids.dtype} {list(self.group_ids.shape)}")
        _require(m.dim() == 2 and m.shape[0] == B and m.dtype == torch.bool, "mask", f"a bool [{B}, T] tensor",
                 f"{m.dtype} {list(m.shape)}")
        T = m.shape[1]
        s = self.sigmas
        _require(s.shape == (T + 1,), "sigmas", f"shape [{T + 1}] (T+1 for the mask's T)", list(s.shape))
        _require(bool((s[:-1] > s[1:]).all() & (s[0] <= 1) & (s[-1] >= 0)), "sigmas",
                 "strictly decreasing values in [0, 1]", s.tolist())
        if self.gains is not None:
            _require(self.gains.shape == (B, T), "gains", f"shape [{B}, {T}]", list(self.gains.shape))
            _require(bool(torch.isfinite(self.gains).all()), "gains", "finite values", "NaN/inf")
        if self.reward_weights is not None:
            w = self.reward_weights
            _require(w.shape == (K,) and bool((w >= 0).all() & (w.sum() > 0)), "reward_weights",
                     f"[{K}] values >= 0 with a positive sum", w.tolist())
        if self.reward_names is not None:
            _require(len(self.reward_names) == K, "reward_names", f"{K} names", list(self.reward_names))
        if self.step_rewards is not None:
            sr = self.step_rewards
            _require(sr.shape == (B, T + 1, K) and sr.is_floating_point(), "step_rewards",
                     f"a float [{B}, {T + 1}, {K}] tensor ([B, T+1, K])", f"{sr.dtype} {list(sr.shape)}")
            _require(bool(torch.isfinite(sr).all()), "step_rewards", "finite values", "NaN/inf")
        if self.gain_profile is not None:
            gp = self.gain_profile
            _require(gp.shape == (K, T) and gp.is_floating_point(), "gain_profile",
                     f"a float [{K}, {T}] tensor ([K, T])", f"{gp.dtype} {list(gp.shape)}")
            _require(bool(torch.isfinite(gp).all()), "gain_profile", "finite values", "NaN/inf")

    @classmethod
    def from_trajectory(
        cls,
        rewards: torch.Tensor,
        group_ids: torch.Tensor,
        latents: torch.Tensor,
        final: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        reward_weights: torch.Tensor | None = None,
        reward_names: tuple[str, ...] | None = None,
        step_rewards: torch.Tensor | None = None,
    ) -> CreditInputs:
        """Inputs with the TCD gains computed from ``latents [B, T+1, ...]`` and ``final [B, ...]``;
        ``mask`` defaults to every step."""
        gains = tcd_gains(latents, final)  # [B, T]
        if mask is None:
            mask = torch.ones(gains.shape, dtype=torch.bool, device=gains.device)
        return cls(rewards, group_ids, mask, sigmas, gains, reward_weights, reward_names, step_rewards)


@dataclass(frozen=True, eq=False)
class CreditOutput:
    """A scheme's result. ``advantages = weights * per_sample[:, None]``, 0 outside the mask."""

    advantages: torch.Tensor  # [B, T] fed to the loss
    weights: torch.Tensor  # [B, T] temporal weights, mean 1 over each row's trained steps, 0 outside
    per_sample: torch.Tensor  # [B] fused advantage, clipped to +-adv_clip, before the temporal weights
    objective_advantages: torch.Tensor  # [B, K] the per-objective advantages the aggregator combined
    coefficients: torch.Tensor  # [B, K] aggregation coefficients c (MOCA Alg. 1, or normalised beta)
    metrics: dict[str, float]  # credit diagnostics (see credit_metrics)


@dataclass(frozen=True, eq=False)
class Aggregate:
    """A reward aggregator's result: ``fused [B]`` (before the clip), the ``objective_advantages [B, K]`` it
    combined, their ``coefficients [B, K]`` on the simplex (MOCA's Alg. 1 ``c``; ``beta / sum beta`` for the
    linear aggregators), and extra scalar metrics."""

    fused: torch.Tensor
    objective_advantages: torch.Tensor
    coefficients: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


CreditScheme = Callable[[CreditInputs, CreditConfig], CreditOutput]
TemporalWeighter = Callable[[CreditInputs, CreditConfig], torch.Tensor]  # -> [B, T]
Aggregator = Callable[[CreditInputs, CreditConfig], Aggregate]

SCHEMES: Registry[CreditScheme] = Registry("credit scheme")


def register_scheme(name: str) -> Callable[[CreditScheme], CreditScheme]:
    """Decorator adding ``fn(inputs, config) -> CreditOutput`` under ``name``; a duplicate name raises."""
    return SCHEMES.register(name)


def get_scheme(name: str) -> CreditScheme:
    """The scheme registered under ``name``; an unknown name is an error listing the known ones."""
    return SCHEMES.get(name)


def scheme_names() -> list[str]:
    """The registered scheme names, sorted."""
    return SCHEMES.names()


# ---- optional inputs: a scheme (or one of its parts) declares the ones it reads ----

OPTIONAL_INPUTS = frozenset({"gains", "step_rewards"})
"""The :class:`CreditInputs` fields a caller computes only for a scheme that asks for them."""

F = TypeVar("F", bound=Callable[..., object])


def requires(*names: str) -> Callable[[F], F]:
    """Decorator: ``fn`` reads the optional inputs ``names`` (of :data:`OPTIONAL_INPUTS`); sets ``fn.needs``.

    The trainer asks :func:`scheme_needs` which inputs to compute (``step_rewards`` costs T decodes and reward
    calls per sample), so it never has to know a scheme by its name.
    """
    unknown = sorted(set(names) - OPTIONAL_INPUTS)
    if unknown:
        raise ValueError(f"requires: unknown optional input(s) {unknown}; known are {sorted(OPTIONAL_INPUTS)}")

    def mark(fn: F) -> F:
        # setattr: a plain `fn.needs = ...` does not type-check on a Callable
        setattr(fn, "needs", scheme_needs(fn) | frozenset(names))  # noqa: B010
        return fn

    return mark


def scheme_needs(fn: object) -> frozenset[str]:
    """The optional inputs a scheme, weighter or aggregator declared with :func:`requires` (none if it did not)."""
    needs: object = getattr(fn, "needs", frozenset())
    return frozenset(needs) if isinstance(needs, (set, frozenset)) else frozenset()


# ---- temporal weighters: [B, T], mean 1 over each row's trained steps, 0 outside ----


def _gains(inputs: CreditInputs) -> torch.Tensor:
    if inputs.gains is None:
        raise ValueError(
            "CreditInputs.gains: this scheme needs the TCD similarity gains [B, T]; build the inputs with "
            "CreditInputs.from_trajectory(...) or pass gains=tcd_gains(latents, final)"
        )
    return inputs.gains


def uniform_weights(inputs: CreditInputs, config: CreditConfig) -> torch.Tensor:
    """Every trained step weight 1: the uniform broadcast of DanceGRPO / Flow-GRPO."""
    return inputs.mask.float()  # [B, T]


@requires("gains")
def tcd_step_weights(inputs: CreditInputs, config: CreditConfig) -> torch.Tensor:
    """TCD Eq. 8 with the ``w_min`` floor, from ``inputs.gains``."""
    return tcd_weights_from_gains(_gains(inputs), inputs.mask, config.eps_w, config.w_min)  # [B, T]


def pcpo_step_weights(inputs: CreditInputs, config: CreditConfig) -> torch.Tensor:
    """PCPO's proportional (Flow-SDE) step weights over ``inputs.sigmas``."""
    return pcpo_weights(inputs.sigmas, inputs.mask)  # [B, T]


def tempflow_step_weights(inputs: CreditInputs, config: CreditConfig) -> torch.Tensor:
    """TempFlow's noise-aware step weights ``Norm(sigma_t sqrt(dt))`` over ``inputs.sigmas``."""
    return tempflow_weights(inputs.sigmas, inputs.mask)  # [B, T]


# ---- reward aggregators: one advantage per sample ----


def _reward_weights(inputs: CreditInputs, config: CreditConfig) -> torch.Tensor:
    """``beta [K]``: the inputs' objective weights (the run config's per-reward ``weight``), else all ones."""
    if inputs.reward_weights is not None:
        return inputs.reward_weights.float()
    return inputs.rewards.new_ones(inputs.rewards.shape[1], dtype=torch.float32)


def _normalization(config: CreditConfig, std: str, eps: float) -> dict[str, Any]:
    """Group-normalisation options: the config's where set, else the scheme's peer convention."""
    return {
        "std": config.std or std,
        "eps": eps if config.eps_std is None else config.eps_std,
        "scope": "batch" if config.batch_std else "group",
    }


def linear_aggregator(
    combine: Callable[..., tuple[torch.Tensor, torch.Tensor]], *, std: str, eps: float
) -> Aggregator:
    """An aggregator from ``combine(rewards, group_ids, beta, std=, eps=, scope=) -> (z [B], A [B, K])`` (see
    :mod:`otca.credit.group`) with the peer's default ``std`` and ``eps``; its coefficients are ``beta / sum beta``."""

    def aggregate(inputs: CreditInputs, config: CreditConfig) -> Aggregate:
        beta = _reward_weights(inputs, config)  # [K]
        z, A = combine(inputs.rewards, inputs.group_ids, beta, **_normalization(config, std, eps))  # [B], [B, K]
        return Aggregate(z, A, (beta / beta.sum()).expand_as(A))

    return aggregate


grpo_aggregator = linear_aggregator(normalize_then_sum, std="unbiased", eps=1e-8)  # DanceGRPO / MixGRPO
flow_grpo_aggregator = linear_aggregator(sum_then_normalize, std="population", eps=1e-4)  # Flow-GRPO
gdpo_aggregator = linear_aggregator(gdpo_advantages, std="unbiased", eps=1e-4)  # GDPO


@requires("gains")
def moca_aggregator(inputs: CreditInputs, config: CreditConfig) -> Aggregate:
    """MOCA (Eq. 12-14, Alg. 1) over ``beta``-scaled per-objective group advantages (DanceGRPO conventions).

    ``q`` uses Eq. 8 weights over the whole trajectory: it describes the sampled path, whichever steps are
    trained this time.
    """
    norm = _normalization(config, "unbiased", 1e-8)
    A = group_normalize(inputs.rewards, inputs.group_ids, **norm) * _reward_weights(inputs, config)  # [B, K]
    dS = _gains(inputs)  # [B, T]
    q = trajectory_score(dS, eq8_weights(dS, None, config.eps_w))  # [B], Eq. 12
    lam = exploration_strength(A, q, inputs.group_ids, eps=config.eps_moca, center=config.center_q, std=norm["std"])
    z, c = moca_fuse(A, lam, tol=config.tol)  # [B], [B, K]
    return Aggregate(z, A, c, {"lambda_mean": lam.mean()})


# ---- composition and diagnostics ----


def credit_metrics(
    aggregate: Aggregate,
    per_sample: torch.Tensor,
    weights: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    names: tuple[str, ...],
) -> dict[str, float]:
    """Credit diagnostics as floats (one host sync), from an aggregate, the clipped ``per_sample [B]``, the
    ``weights [B, T]`` and ``advantages [B, T]`` (0 outside ``mask [B, T]``) and the K objective ``names``.

    Over samples: ``frac_mixed_sign`` (objectives disagree in sign), ``frac_fused_zero`` (fused to exactly 0:
    no gradient), ``frac_clipped``, ``share/<name>`` (objective k's share ``sum_i |c_ik A_ik| / sum_ik |c_ik A_ik|``).
    Over trained steps: ``weight_max``, ``weight_min``, ``adv_mean``, ``adv_std``, ``adv_abs_mean``. Plus the
    aggregator's own (MOCA: ``lambda_mean``).
    """
    A, c = aggregate.objective_advantages, aggregate.coefficients  # [B, K] each
    m = mask.float()  # [B, T]
    n = m.sum().clamp_min(1)
    any_step = mask.any()
    adv_mean = advantages.sum() / n
    contrib = (c * A).abs()  # [B, K]
    share = contrib.sum(dim=0) / contrib.sum().clamp_min(torch.finfo(torch.float32).tiny)  # [K]
    values = {
        "frac_mixed_sign": ((A > 0).any(dim=1) & (A < 0).any(dim=1)).float().mean(),
        "frac_fused_zero": (per_sample == 0).float().mean(),
        "frac_clipped": (per_sample != aggregate.fused).float().mean(),
        "weight_max": torch.where(any_step, torch.where(mask, weights, -torch.inf).max(), 0.0),
        "weight_min": torch.where(any_step, torch.where(mask, weights, torch.inf).min(), 0.0),
        "adv_mean": adv_mean,
        "adv_std": (((advantages - adv_mean) ** 2 * m).sum() / n).sqrt(),
        "adv_abs_mean": advantages.abs().sum() / n,
        **{f"share/{name}": share[k] for k, name in enumerate(names)},
        **aggregate.metrics,
    }
    return dict(zip(values, torch.stack([v.float().reshape(()) for v in values.values()]).tolist(), strict=True))


def compose_scheme(weighter: TemporalWeighter, aggregator: Aggregator) -> CreditScheme:
    """The scheme ``advantages = weighter(...) * clamp(aggregator(...).fused, +-adv_clip)[:, None]``; it needs
    the optional inputs its two parts need (:func:`scheme_needs`)."""

    def scheme(inputs: CreditInputs, config: CreditConfig) -> CreditOutput:
        agg = aggregator(inputs, config)
        per_sample = agg.fused.clamp(-config.adv_clip, config.adv_clip)  # [B], clipped before the weights
        weights = weighter(inputs, config)  # [B, T], 0 outside the mask
        advantages = weights * per_sample.unsqueeze(1)  # [B, T]
        names = inputs.reward_names or tuple(str(k) for k in range(inputs.rewards.shape[1]))
        metrics = credit_metrics(agg, per_sample, weights, advantages, inputs.mask, names)
        return CreditOutput(advantages, weights, per_sample, agg.objective_advantages, agg.coefficients, metrics)

    return requires(*(scheme_needs(weighter) | scheme_needs(aggregator)))(scheme)


# The built-in schemes: a temporal weighter times a reward aggregator.
register_scheme("grpo")(compose_scheme(uniform_weights, grpo_aggregator))  # DanceGRPO
register_scheme("flow-grpo")(compose_scheme(uniform_weights, flow_grpo_aggregator))  # Flow-GRPO
register_scheme("gdpo")(compose_scheme(uniform_weights, gdpo_aggregator))  # GDPO
register_scheme("tcd")(compose_scheme(tcd_step_weights, grpo_aggregator))  # OTCA ablation: TCD only
register_scheme("moca")(compose_scheme(uniform_weights, moca_aggregator))  # OTCA ablation: MOCA only
register_scheme("otca")(compose_scheme(tcd_step_weights, moca_aggregator))  # OTCA, Alg. 2
register_scheme("pcpo")(compose_scheme(pcpo_step_weights, grpo_aggregator))  # PCPO proportional step weights
register_scheme("tempflow")(compose_scheme(tempflow_step_weights, grpo_aggregator))  # TempFlow noise-aware weights
