"""Rewards by name: ``build_reward(name, **options)`` constructs one; modules register themselves on import."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from otca.registry import Registry
from otca.rewards.base import Reward

REWARDS: Registry[Callable[..., Reward]] = Registry("reward")

# Modules that register rewards, imported on first use so that heavy backbones load only when asked for.
_PROVIDERS = (
    "otca.rewards.jpeg",
    "otca.worlds.digits.rewards",
    "otca.rewards.clip",
    "otca.rewards.pickscore",
    "otca.rewards.aesthetic",
    "otca.rewards.hps",
    "otca.rewards.imagereward",
    "otca.rewards.videoalign",
)


def _load_providers() -> None:
    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a provider that exists but is broken must fail loudly
                raise


def register_reward(name: str):
    """Decorator for a factory ``(**options) -> Reward``."""
    return REWARDS.register(name)


def build_reward(name: str, **options: Any) -> Reward:
    _load_providers()
    return REWARDS.get(name)(**options)


def reward_names() -> list[str]:
    _load_providers()
    return REWARDS.names()
