"""The one interface every generator adapter implements (FLUX.1, SD3, Wan, the embedded tiny FLUX).

A policy is a velocity field plus the encoders around it. Nothing else leaks out: the rollout, the loss
and the evaluation only ever call these methods, so a new model family is one new adapter file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class FlowPolicy(torch.nn.Module, ABC):
    """A flow-matching generator seen as a policy over latents: an ``nn.Module`` (the trainer moves, wraps for
    DDP / FSDP2, saves and optimizes it as one) whose subclass implements the four abstract methods.

    Conventions (see docs/design.md): sigma in [0, 1], 1 = pure noise, 0 = data; the network predicts the
    velocity ``v = noise - x0`` so that an Euler step is ``x + (sigma_next - sigma) * v``.
    """

    @abstractmethod
    def encode(self, prompts: list[str]) -> Any:
        """Text conditioning for ``prompts`` (an adapter-specific object, batched over prompts)."""

    @abstractmethod
    def init_latents(self, n: int, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """``n`` initial noise latents ``[n, *latent]`` drawn from ``generator`` (one per sample if a list)."""

    @abstractmethod
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """Predicted velocity ``[B, *latent]`` at latents ``x [B, *latent]`` and noise level ``sigma [B]``.

        Guidance (FLUX distilled guidance, SD3 classifier-free guidance) happens inside.
        """

    @abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1]: ``[B, C, H, W]`` for images, ``[B, C, F, H, W]`` for video."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates: those that require grad (all of them, or only LoRA weights)."""
        return [p for p in self.parameters() if p.requires_grad]
