"""The one interface every generator adapter implements (FLUX.1, SD3, Wan, the embedded tiny FLUX).

A policy is a velocity field plus the encoders around it. Nothing else leaks out: the rollout, the loss
and the evaluation only ever call these methods, so a new model family is one new adapter file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class FlowPolicy(Protocol):
    """A flow-matching generator seen as a policy over latents.

    Conventions (see docs/design.md): sigma in [0, 1], 1 = pure noise, 0 = data; the network predicts the
    velocity ``v = noise - x0`` so that an Euler step is ``x + (sigma_next - sigma) * v``.
    """

    def encode(self, prompts: list[str]) -> Any:
        """Text conditioning for ``prompts`` (an adapter-specific object, batched over prompts)."""

    def init_latents(self, n: int, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """``n`` initial noise latents ``[n, *latent]`` drawn from ``generator`` (one per sample if a list)."""

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """Predicted velocity ``[B, *latent]`` at latents ``x [B, *latent]`` and noise level ``sigma [B]``.

        Guidance (FLUX distilled guidance, SD3 classifier-free guidance) happens inside.
        """

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1]: ``[B, C, H, W]`` for images, ``[B, C, F, H, W]`` for video."""

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters the optimizer updates (all of them, or only LoRA weights)."""
