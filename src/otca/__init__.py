"""otca: GRPO post-training for flow-matching generators with per-step and per-objective credit.

The pure core lives in :mod:`otca.credit` (advantages, TCD, MOCA, credit schemes) and :mod:`otca.flow`
(sigma schedule, SDE transitions and their log-densities, the policy loss). Everything else (models,
rewards, rollout, trainer, CLI) is a thin shell around it.
"""

__version__ = "0.1.0"
