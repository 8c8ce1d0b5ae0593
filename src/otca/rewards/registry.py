"""Rewards by name: ``build_reward(name, **options)`` constructs one, ``build_reward_set(specs)`` the config's
objectives with their weights; modules register themselves on import.

A reward registers a factory ``(options) -> Reward`` together with its options class (a
:class:`~otca.rewards.options.RewardOptions`), which validates the options before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from otca.registry import Registry
from otca.rewards.base import Reward, RewardSet
from otca.rewards.options import RewardOptionError, RewardOptions, parse_reward_options

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


@dataclass(frozen=True)
class RewardFactory:
    """A registered reward: its options class and the function that builds it from validated options."""

    options: type[RewardOptions]
    build: Callable[[Any], Reward]


REWARDS: Registry[RewardFactory] = Registry("reward", providers=_PROVIDERS)


def register_reward(name: str, options: type[RewardOptions]) -> Callable[[Callable[[Any], Reward]], Any]:
    """Decorator for a factory ``(options: <options class>) -> Reward`` (a function or a class)."""

    def add(build: Callable[[Any], Reward]) -> Callable[[Any], Reward]:
        REWARDS.register(name)(RewardFactory(options, build))
        return build

    return add


def build_reward(name: str, **options: Any) -> Reward:
    """The reward ``name`` built from ``options``; an unknown or ill-typed option is a one-line error."""
    factory = REWARDS.get(name)
    return factory.build(parse_reward_options(name, factory.options, options))


def reward_options(name: str) -> type[RewardOptions]:
    """The options class of the reward ``name`` (its fields and docstrings are the reward's options)."""
    return REWARDS.get(name).options


def reward_names() -> list[str]:
    return REWARDS.names()


class RewardSpecLike(Protocol):
    """One configured objective (``otca.config.RewardSpec``)."""

    name: str
    weight: float | list[float]
    options: dict[str, Any]


def build_reward_set(specs: Sequence[RewardSpecLike]) -> RewardSet:
    """The configured rewards as one :class:`RewardSet` whose ``weights`` has one entry per column: a float
    ``weight`` applies to every column of its reward, a list gives one weight per column."""
    rewards = [build_reward(s.name, **s.options) for s in specs]
    weights: list[float] = []
    for spec, reward in zip(specs, rewards, strict=True):
        k = len(reward.names)
        if isinstance(spec.weight, int | float):
            weights += [float(spec.weight)] * k
        elif len(spec.weight) == k:
            weights += [float(w) for w in spec.weight]
        else:
            raise RewardOptionError(f"reward '{spec.name}': weight has {len(spec.weight)} values, expected {k} "
                                    f"(one per column: {', '.join(reward.names)}) or one number")
    return RewardSet(rewards, torch.tensor(weights, dtype=torch.float32))
