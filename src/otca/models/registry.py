"""Generator adapters by name: ``build_policy(model_config, device)`` -> a FlowPolicy.

A builder takes the run's ``ModelConfig`` (kind, local path, options, LoRA, dtype) and the device. Heavy
imports happen inside the builder, so only the chosen model family is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from otca.models.base import FlowPolicy
from otca.registry import Registry

if TYPE_CHECKING:
    from otca.config import ModelConfig

# Modules that register more adapters, imported on first look-up (each imports its heavy modules lazily).
_PROVIDERS = ("otca.models.flux", "otca.models.sd3", "otca.models.wan")

POLICIES: Registry[Callable[[ModelConfig, torch.device], FlowPolicy]] = Registry("model kind", providers=_PROVIDERS)


def register_policy(name: str):
    """Decorator for a builder ``(model_config, device) -> FlowPolicy``."""
    return POLICIES.register(name)


def build_policy(cfg: ModelConfig, device: torch.device) -> FlowPolicy:
    return POLICIES.get(cfg.kind)(cfg, device)


def policy_kinds() -> list[str]:
    return POLICIES.names()


@register_policy("digits-flux")
def _digits_flux(cfg: ModelConfig, device: torch.device) -> FlowPolicy:
    """The embedded default: the tiny FLUX on digits, from the weights shipped in the package."""
    from otca.worlds.digits.policy import load_digits_policy

    if cfg.path is not None:
        cfg_opts = {**cfg.options, "assets_dir": cfg.path}
    else:
        cfg_opts = dict(cfg.options)
    policy = load_digits_policy(**cfg_opts, device=device, dtype=getattr(torch, cfg.dtype))
    if cfg.lora is not None:
        from otca.models.lora import add_lora

        add_lora(policy, cfg.lora)
    return policy
