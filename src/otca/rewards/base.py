"""The reward interface: pixels and prompts in, float32 scores out, one column per objective.

A reward scores one objective (``[B]``) or several (``[B, k]``, as VideoAlign's visual quality, motion quality
and text alignment come from one model run); ``names`` names its columns. A :class:`RewardSet` stacks the
columns of its rewards to the ``[B, K]`` matrix the credit schemes take. A reward that fails (raises, returns
the wrong shape or a non-finite score) fails the step loudly: it never silently becomes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


class RewardError(RuntimeError):
    """A reward model failed or returned something other than its ``[B]`` / ``[B, k]`` finite scores."""


@runtime_checkable
class Reward(Protocol):
    """k objectives. ``pixels``: ``[B, C, H, W]`` (or ``[B, C, F, H, W]`` for video) in [0, 1]."""

    name: str
    """The registered name (errors name it)."""
    names: tuple[str, ...]
    """Names of the k score columns; ``(name,)`` for a single-objective reward."""

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores, higher is better: ``[B]`` float32 when k = 1, ``[B, k]`` when k > 1."""


def _expected_shape(b: int, k: int) -> tuple[int, ...]:
    return (b,) if k == 1 else (b, k)


class RewardSet:
    """Rewards evaluated together: ``__call__(pixels, prompts) -> [B, K]`` float32, K the total number of
    columns, named by ``names`` in order; ``weights`` ``[K]`` (default all 1) are the objective weights of the
    linear aggregators.

    Checks every reward's output: a wrong shape or a NaN/inf score raises :class:`RewardError` naming the reward
    (and the column).
    """

    def __init__(self, rewards: Sequence[Reward], weights: torch.Tensor | None = None):
        if not rewards:
            raise ValueError("RewardSet: needs at least one reward")
        names = [n for r in rewards for n in r.names]
        for r in rewards:
            if not r.names:
                raise ValueError(f"RewardSet: reward '{r.name}' names no score column")
        if len(set(names)) != len(names):
            raise ValueError(f"RewardSet: duplicate reward names {names}")
        self.rewards = list(rewards)
        self.names = names
        k = len(names)
        weights = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (k,) or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"RewardSet: weights must be {k} finite numbers (one per column {names}), "
                             f"got {weights.tolist()}")
        self.weights = weights.float()  # [K]

    def __len__(self) -> int:
        """K, the number of score columns."""
        return len(self.names)

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
            expect = _expected_shape(b, len(r.names))
            if s.shape != expect:
                raise RewardError(f"reward '{r.name}' returned shape {tuple(s.shape)}, expected {expect} "
                                  f"(columns {', '.join(r.names)})")
            s = s.detach().to(torch.float32).cpu().reshape(b, len(r.names))  # [B, k]
            bad = ~torch.isfinite(s)
            if bad.any():
                i, j = (int(v) for v in bad.nonzero()[0])
                raise RewardError(
                    f"reward '{r.name}' returned {int(bad.sum())} non-finite score(s) of {s.numel()} "
                    f"(first at sample {i}, column '{r.names[j]}')"
                )
            cols.append(s)
        return torch.cat(cols, dim=1)  # [B, K]
