"""The flow-matching core: the sigma schedule, the sampler transitions with their log-densities, and the
policy loss. Pure tensor functions in fp32; nothing here knows about models, files or configs."""

from otca.flow.loss import OBJECTIVES, Objective, clipped_surrogate, log_hinge, policy_loss
from otca.flow.schedule import make_sigmas, shift_sigmas
from otca.flow.sde import (
    KL_FORMS,
    TRANSITIONS,
    KlScale,
    NoiseScale,
    Transition,
    dance_noise_scale,
    dance_sde_step,
    flow_noise_scale,
    flow_sde_step,
    gaussian_log_prob,
    get_transition,
    kl_to_reference,
    ode_step,
    predict_x0,
)

__all__ = [
    "OBJECTIVES",
    "Objective",
    "clipped_surrogate",
    "log_hinge",
    "policy_loss",
    "make_sigmas",
    "shift_sigmas",
    "KL_FORMS",
    "TRANSITIONS",
    "KlScale",
    "NoiseScale",
    "Transition",
    "dance_noise_scale",
    "dance_sde_step",
    "flow_noise_scale",
    "flow_sde_step",
    "gaussian_log_prob",
    "get_transition",
    "kl_to_reference",
    "ode_step",
    "predict_x0",
]
