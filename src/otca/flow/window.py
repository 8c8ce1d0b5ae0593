"""The SDE window of MixGRPO (arXiv 2507.21802) and Flow-GRPO-Fast: stochastic (SDE) transitions inside a window
of ``size`` consecutive steps, deterministic Euler (ODE) steps outside it, and only the window's steps trained.

The rollout's network calls stay the same; the update trains ``size`` of ``T`` steps, so its cost drops by about
``T / size``. The window moves with the iteration:

* ``sliding`` (MixGRPO's "progressive" strategy with roll-back, ``GRPOTrainingStates``): the start advances by
  ``shift`` every ``iters_per_shift`` iterations from ``lo`` and returns to ``lo`` once it would pass ``hi - 1``;
  as in MixGRPO the window is cut at ``hi``, so the last positions hold fewer than ``size`` steps.
* ``random`` (Flow-GRPO-Fast's ``sde_window_range``; MixGRPO's "random" strategy): one start per iteration drawn
  uniformly from ``lo .. hi - size`` with the given generator (the same on every rank when seeded by iteration).

``hi`` defaults to ``T - 1``: the last transition is never in the window (DanceGRPO and MixGRPO never train it;
under CPS it is deterministic). Step ``k`` is the transition ``latents[:, k] -> latents[:, k+1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from otca.flow.sde import Sigma, Transition, ode_step
from otca.registry import Registry


@dataclass(frozen=True)
class WindowSpec:
    """Where the window may lie: ``size`` steps inside ``[lo, hi)`` of ``num_steps``; a sliding window moves by
    ``shift`` every ``iters_per_shift`` iterations (MixGRPO defaults: size 4, shift 1, 25 iterations)."""

    num_steps: int
    size: int
    lo: int = 0
    hi: int | None = None  # None: num_steps - 1
    shift: int = 1
    iters_per_shift: int = 1

    @property
    def end(self) -> int:
        """The exclusive end of the candidate steps."""
        return self.num_steps - 1 if self.hi is None else self.hi

    def check(self) -> None:
        """One-line errors naming the field."""
        for name in ("num_steps", "size", "shift", "iters_per_shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sde window {name}: expected an int >= 1, got {value!r}")
        if not 0 <= self.lo < self.end <= self.num_steps:
            raise ValueError(
                f"sde window lo/hi: expected 0 <= lo < hi <= num_steps={self.num_steps}, "
                f"got lo={self.lo}, hi={self.end}"
            )
        if self.size > self.end - self.lo:
            raise ValueError(f"sde window size: expected at most hi - lo = {self.end - self.lo}, got {self.size}")


# (spec, iteration, generator) -> the window's first step
WindowStart = Callable[[WindowSpec, int, torch.Generator], int]

WINDOWS: Registry[WindowStart] = Registry("sde window mode")


@WINDOWS.register("sliding")
def sliding_start(spec: WindowSpec, iteration: int, generator: torch.Generator) -> int:
    """``lo + shift * ((iteration // iters_per_shift) mod n)`` over the ``n`` starts ``lo, lo + shift, ... <= hi - 1``
    (MixGRPO's progressive window with roll-back, written as a function of the iteration instead of a state)."""
    positions = (spec.end - 1 - spec.lo) // spec.shift + 1
    return spec.lo + spec.shift * ((iteration // spec.iters_per_shift) % positions)


@WINDOWS.register("random")
def random_start(spec: WindowSpec, iteration: int, generator: torch.Generator) -> int:
    """A start drawn uniformly from ``lo .. hi - size`` (Flow-GRPO-Fast; MixGRPO's random strategy)."""
    return int(torch.randint(spec.lo, spec.end - spec.size + 1, (1,), generator=generator))


def sde_window(spec: WindowSpec, mode: str, iteration: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``sde_steps [T]`` bool: True on the window's steps (SDE, trained), False elsewhere (ODE, not trained).

    ``generator`` is used by the ``random`` mode only (a fresh unseeded one when None)."""
    spec.check()
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration: expected an int >= 0, got {iteration!r}")
    start = WINDOWS.get(mode)(spec, iteration, generator if generator is not None else torch.Generator())
    steps = torch.zeros(spec.num_steps, dtype=torch.bool)  # [T]
    steps[start : min(start + spec.size, spec.end)] = True
    return steps


def window_train_mask(sde_steps: torch.Tensor, mask: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
    """The trained entries ``[n, T]`` bool: the window's steps for every sample, intersected with ``mask [n, T]``
    when given (a timestep-fraction selection); MixGRPO trains every window step of every sample."""
    if sde_steps.dim() != 1 or sde_steps.dtype != torch.bool:
        raise ValueError(f"sde_steps: expected a [T] bool tensor, got {sde_steps.dtype} {tuple(sde_steps.shape)}")
    if mask is None:
        if n is None:
            raise ValueError("window_train_mask: give mask [n, T] or n")
        return sde_steps[None, :].expand(n, -1).clone()  # [n, T]
    if mask.dim() != 2 or mask.shape[1] != sde_steps.shape[0] or mask.dtype != torch.bool:
        t = sde_steps.shape[0]
        raise ValueError(f"mask: expected a [n, {t}] bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    return mask & sde_steps[None, :]  # [n, T]


def mixed_step(
    transition: Transition,
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    *,
    stochastic: bool,
    eta: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rollout step under a window: ``transition`` where ``stochastic`` (inside the window), the Euler ODE
    step elsewhere. Same return as a :class:`~otca.flow.sde.Transition`; outside the window ``log_prob [B]`` is
    NaN (a deterministic step has no density: those steps must be masked out of the loss), ``mean`` is the
    next state in fp32 and ``std`` is 0. ``noise`` may be given either way (a rollout draws it for every step,
    so the window's steps see the same noise as a full SDE rollout of the same seed)."""
    if stochastic:
        return transition(x, v, sigma, sigma_next, eta=eta, noise=noise, generator=generator)
    x_next = ode_step(x, v, sigma, sigma_next)  # [B, *latent]
    log_prob = torch.full((x.shape[0],), math.nan, dtype=torch.float32, device=x.device)  # [B]
    std = torch.zeros((x.shape[0],) + (1,) * (x.dim() - 1), dtype=torch.float32, device=x.device)  # [B, 1, ..., 1]
    return x_next, log_prob, x_next.float(), std
