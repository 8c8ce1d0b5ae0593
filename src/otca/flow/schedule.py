"""The sigma schedule of a sampler: an explicit tensor ``sigmas [T+1]`` from 1 (noise) down to 0 (data)."""

from __future__ import annotations

import math

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift ``s * sigma / (1 + (s - 1) * sigma)`` (SD3 / FLUX / diffusers' static shift).

    It keeps 0 and 1 fixed and, for ``s > 1``, spends more of the steps at high noise.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def make_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``sigmas [T+1]`` float32, strictly decreasing from exactly 1 to exactly 0 (T = ``num_steps``).

    ``linspace(1, 0, T+1)`` then :func:`shift_sigmas`, the DanceGRPO / diffusers convention. The arithmetic is
    done in float64 and rounded once, so every entry is the correctly rounded float32 of the exact value.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift: expected a finite number > 0, got {shift!r}")
    linear = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)  # [T+1]
    return shift_sigmas(linear, float(shift)).to(torch.float32)  # [T+1]
