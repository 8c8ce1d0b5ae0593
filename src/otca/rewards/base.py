"""The reward interface: pixels and prompts in, one float32 score per sample out.

A :class:`RewardSet` stacks K rewards to the ``[B, K]`` matrix the credit schemes take. A reward that
fails (raises, or returns a non-finite score) fails the step loudly: it never silently becomes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


class RewardError(RuntimeError):
    """A reward model failed or returned something other than ``[B]`` finite scores."""


@runtime_checkable
class Reward(Protocol):
    """One objective. ``pixels``: ``[B, C, H, W]`` (or ``[B, C, F, H, W]`` for video) in [0, 1]."""

    name: str

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores ``[B]`` float32, higher is better."""


class RewardSet:
    """K rewards evaluated together: ``__call__(pixels, prompts) -> [B, K]`` float32.

    Checks every column: a wrong shape or a NaN/inf score raises :class:`RewardError` naming the reward.
    """

    def __init__(self, rewards: Sequence[Reward]):
        names = [r.name for r in rewards]
        if not rewards:
            raise ValueError("RewardSet: needs at least one reward")
        if len(set(names)) != len(names):
            raise ValueError(f"RewardSet: duplicate reward names {names}")
        self.rewards = list(rewards)
        self.names = names

    def __len__(self) -> int:
        return len(self.rewards)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b = pixels.shape[0]
        cols = []
        for r in self.rewards:
            try:
                s = r(pixels, prompts)
            except Exception as e:  # re-raised with the reward's name so the failing objective is obvious
                raise RewardError(f"reward '{r.name}' failed: {type(e).__name__}: {e}") from e
            s = torch.as_tensor(s)
            if s.shape != (b,):
                raise RewardError(f"reward '{r.name}' returned shape {tuple(s.shape)}, expected ({b},)")
            s = s.detach().to(torch.float32).cpu()
            bad = ~torch.isfinite(s)
            if bad.any():
                raise RewardError(
                    f"reward '{r.name}' returned {int(bad.sum())} non-finite score(s) of {b} "
                    f"(first at sample {int(bad.nonzero()[0])})"
                )
            cols.append(s)
        return torch.stack(cols, dim=1)  # [B, K]
