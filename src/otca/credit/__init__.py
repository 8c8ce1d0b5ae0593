"""Credit assignment: who gets the reward, per denoising step (TCD) and per objective (MOCA).

Pure functions over fp32 tensors (group normalisation, TCD Eq. 6-8, MOCA Eq. 12-14 and Alg. 1, peer step
weights) and the scheme registry the trainer calls: ``get_scheme(name)(CreditInputs(...), CreditConfig())``.
"""

from otca.credit.group import gdpo_advantages, group_normalize, normalize_then_sum, sum_then_normalize
from otca.credit.moca import exploration_strength, moca_coefficients, moca_fuse, trajectory_score
from otca.credit.schemes import (
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
    scheme_names,
    tcd_step_weights,
    tempflow_step_weights,
    uniform_weights,
)
from otca.credit.tcd import eq8_weights, similarity_to_final, tcd_gains, tcd_weights, tcd_weights_from_gains
from otca.credit.weights import flow_sde_std, mean_one_over_mask, pcpo_native_weights, pcpo_weights, tempflow_weights

__all__ = [
    "Aggregate",
    "CreditConfig",
    "CreditInputs",
    "CreditOutput",
    "CreditScheme",
    "compose_scheme",
    "credit_metrics",
    "eq8_weights",
    "exploration_strength",
    "flow_grpo_aggregator",
    "flow_sde_std",
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
    "pcpo_native_weights",
    "pcpo_step_weights",
    "pcpo_weights",
    "register_scheme",
    "scheme_names",
    "similarity_to_final",
    "sum_then_normalize",
    "tcd_gains",
    "tcd_step_weights",
    "tcd_weights",
    "tcd_weights_from_gains",
    "tempflow_step_weights",
    "tempflow_weights",
    "trajectory_score",
    "uniform_weights",
]
