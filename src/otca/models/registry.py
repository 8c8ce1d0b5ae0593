"""Generator adapters by name: ``build_policy(model_config, device)`` -> a FlowPolicy.

A builder takes the run's ``ModelConfig`` (kind, local path, options, LoRA, dtype) and the device. Heavy
imports happen inside the builder, so only the chosen model family is imported. The diffusers families register
here; a world registers its own kinds (see :mod:`otca.registry`).
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
_PROVIDERS = ("otca.models.flux", "otca.models.sd3", "otca.models.wan", "otca.models.qwen_image",
              "otca.models.flux2")

PolicyBuilder = Callable[["ModelConfig", torch.device], FlowPolicy]
POLICIES: Registry[PolicyBuilder] = Registry("model kind", providers=_PROVIDERS)


def register_policy(name: str) -> Callable[[PolicyBuilder], PolicyBuilder]:
    """Decorator for a builder ``(model_config, device) -> FlowPolicy``."""
    return POLICIES.register(name)


def build_policy(cfg: ModelConfig, device: torch.device) -> FlowPolicy:
    return POLICIES.get(cfg.kind)(cfg, device)


def policy_kinds() -> list[str]:
    return POLICIES.names()

