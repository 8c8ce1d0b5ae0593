"""Credit assignment: who gets the reward, per denoising step (TCD) and per objective (MOCA).

Pure functions over fp32 tensors (group normalisation, TCD Eq. 6-8, MOCA Eq. 12-14 and Alg. 1, peer step
weights, reward-gain step weights and the objective-aware per-step fusion of docs/credit-schemes.md) and the
scheme registry the trainer calls: ``get_scheme(name)(CreditInputs(...), CreditConfig())``.
"""

from otca.credit.group import gdpo_advantages, group_normalize, normalize_then_sum, sum_then_normalize
from otca.credit.moca import (
    exploration_gate,
    exploration_signal,
    exploration_strength,
    moca_coefficients,
    moca_fuse,
    trajectory_score,
)
from otca.credit.reward_gain import (  # registers reward-gain, reward-gain-moca
    ema_profile,
    gain_profile,
    objective_step_weights,
    reward_gain_weights,
    reward_step_gains,
    scaled_step_gains,
)
from otca.credit.scale import scale_advantages, unit_mean_abs_factor
from otca.credit.schemes import (
    OPTIONAL_INPUTS,
    Aggregate,
    CreditConfig,
    CreditInputs,
    CreditOutput,
    CreditScheme,
    compose_scheme,
    credit_metrics,
    flow_grpo_aggregator,
    gdpo_aggregator,
    get_scheme,
    grpo_aggregator,
    linear_aggregator,
    moca_aggregator,
    pcpo_step_weights,
    register_scheme,
    requires,
    scheme_names,
    scheme_needs,
    tcd_step_weights,
    tempflow_step_weights,
    uniform_weights,
)
from otca.credit.stepwise import (  # registers step-moca, profile-moca
    objective_step_scheme,
    profile_source,
    reward_gain_source,
    stepwise_moca_fuse,
)
from otca.credit.tcd import eq8_weights, similarity_to_final, tcd_gains, tcd_weights, tcd_weights_from_gains
from otca.credit.weights import flow_sde_std, mean_one_over_mask, pcpo_native_weights, pcpo_weights, tempflow_weights

__all__ = [
    "OPTIONAL_INPUTS",
    "Aggregate",
    "compose_scheme",
    "credit_metrics",
    "CreditConfig",
    "CreditInputs",
    "CreditOutput",
    "CreditScheme",
    "ema_profile",
    "eq8_weights",
    "exploration_gate",
    "exploration_signal",
    "exploration_strength",
    "flow_grpo_aggregator",
    "flow_sde_std",
    "gain_profile",
    "gdpo_advantages",
    "gdpo_aggregator",
    "get_scheme",
    "group_normalize",
    "grpo_aggregator",
    "linear_aggregator",
    "mean_one_over_mask",
    "moca_aggregator",
    "moca_coefficients",
    "moca_fuse",
    "normalize_then_sum",
    "objective_step_scheme",
    "objective_step_weights",
    "pcpo_native_weights",
    "pcpo_step_weights",
    "pcpo_weights",
    "profile_source",
    "register_scheme",
    "requires",
    "reward_gain_source",
    "reward_gain_weights",
    "reward_step_gains",
    "scale_advantages",
    "scaled_step_gains",
    "scheme_names",
    "scheme_needs",
    "similarity_to_final",
    "stepwise_moca_fuse",
    "sum_then_normalize",
    "tcd_gains",
    "tcd_step_weights",
    "tcd_weights",
    "tcd_weights_from_gains",
    "tempflow_step_weights",
    "tempflow_weights",
    "trajectory_score",
    "uniform_weights",
    "unit_mean_abs_factor",
]
