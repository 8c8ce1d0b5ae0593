"""Rewards by name: ``build_reward(name, **options)`` constructs one; modules register themselves on import."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from otca.registry import Registry
from otca.rewards.base import Reward

# Modules that register rewards, imported on first look-up so that heavy backbones load only when asked for.
_PROVIDERS = (
    "otca.rewards.jpeg",
    "otca.rewards.clip",
    "otca.rewards.pickscore",
    "otca.rewards.aesthetic",
    "otca.rewards.hps",
    "otca.rewards.imagereward",
    "otca.rewards.videoalign",
)

REWARDS: Registry[Callable[..., Reward]] = Registry("reward", providers=_PROVIDERS)


def register_reward(name: str):
    """Decorator for a factory ``(**options) -> Reward``."""
    return REWARDS.register(name)


def build_reward(name: str, **options: Any) -> Reward:
    return REWARDS.get(name)(**options)


def reward_names() -> list[str]:
    return REWARDS.names()
