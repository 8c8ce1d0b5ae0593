"""Reward models behind the :class:`~otca.rewards.base.Reward` interface."""

from otca.rewards.base import Reward, RewardError, RewardSet

__all__ = ["Reward", "RewardError", "RewardSet"]
