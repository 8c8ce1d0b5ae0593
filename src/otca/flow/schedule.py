"""The sigma schedule of a sampler: an explicit tensor ``sigmas [T+1]`` from 1 (noise) down to 0 (data).

Two grids, by name in :data:`SCHEDULES`, both under the time shift ``s * sigma / (1 + (s - 1) * sigma)``:

* ``"shift"``: ``linspace(1, 0, T+1)`` shifted (DanceGRPO's ``sd3_time_shift``; diffusers' ``FluxPipeline``, which
  passes ``sigmas = linspace(1, 1/T, T)`` to its scheduler and appends the final 0);
* ``"diffusers"``: what diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(T)`` gives without
  custom sigmas (``StableDiffusion3Pipeline``'s default, used by Flow-GRPO for SD3): the scheduler shifts its
  1000 training sigmas once at construction, then ``set_timesteps`` spaces T points linearly between the largest
  and smallest of those and shifts them again, so the last step ends at a small sigma (0.0089 for T = 10,
  s = 3) before the final 0.

The shift ``s`` is a number, or comes from the model: FLUX's resolution-dependent (dynamic) shift
(:class:`DynamicShift`), ``mu`` by linear interpolation in the image sequence length (diffusers'
``calculate_shift`` in ``pipelines/flux/pipeline_flux.py``) and the exponential time shift
``exp(mu) / (exp(mu) + (1/sigma - 1))`` of ``FlowMatchEulerDiscreteScheduler.time_shift``, which is the static
shift with ``s = exp(mu)`` (multiply through by ``sigma``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from otca.registry import Registry

# (num_steps T, shift s) -> sigmas [T+1] float64, from 1 down to 0
Schedule = Callable[[int, float], torch.Tensor]

SCHEDULES: Registry[Schedule] = Registry("sigma schedule")

# The training grid of diffusers' flow-matching schedulers (``num_train_timesteps`` of SD3 and FLUX.1).
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift ``s * sigma / (1 + (s - 1) * sigma)`` (SD3 / FLUX / diffusers' static shift).

    It keeps 0 and 1 fixed and, for ``s > 1``, spends more of the steps at high noise.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@SCHEDULES.register("shift")
def linear_shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """``shift_sigmas(linspace(1, 0, T+1), s)`` in float64 ``[T+1]`` (DanceGRPO; FluxPipeline's grid)."""
    linear = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)  # [T+1]
    return shift_sigmas(linear, shift)  # [T+1]


@SCHEDULES.register("diffusers")
def diffusers_default_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """diffusers' ``FlowMatchEulerDiscreteScheduler(shift=s)`` then ``set_timesteps(T)``, float64 ``[T+1]``.

    The scheduler's training sigmas are ``shift_sigmas(linspace(1, 1/N, N), s)`` (N = 1000); ``set_timesteps``
    takes ``linspace(max, min, T)`` of those and shifts it again (``scheduling_flow_match_euler_discrete.py``),
    then appends 0.
    """
    sigma_min = float(shift_sigmas(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64), shift))
    spaced = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)  # [T]
    return torch.cat([shift_sigmas(spaced, shift), spaced.new_zeros(1)])  # [T+1]


def dynamic_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's ``mu``: the line through ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)`` at
    ``image_seq_len`` (diffusers' ``calculate_shift``; defaults are FLUX.1's scheduler config)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


@dataclass(frozen=True)
class DynamicShift:
    """A model's resolution-dependent shift: its image token count and its scheduler config's
    ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift`` (FLUX.1's by default).
    ``shift = exp(mu)`` is the static shift that gives the same sigmas (module docstring)."""

    image_seq_len: int
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @property
    def mu(self) -> float:
        return dynamic_shift_mu(
            self.image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift
        )

    @property
    def shift(self) -> float:
        return math.exp(self.mu)


def resolve_shift(shift: float | str, dynamic: DynamicShift | None = None) -> float:
    """The static shift to use: ``shift`` itself, or for ``"auto"`` the model's dynamic shift ``exp(mu)``."""
    if shift == "auto":
        if dynamic is None:
            raise ValueError(
                "sampler.shift: 'auto' needs a model with dynamic shifting (FLUX.1's scheduler config); "
                "this model has none, set a number"
            )
        return dynamic.shift
    if isinstance(shift, bool) or not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift: expected a finite number > 0 or 'auto', got {shift!r}")
    return float(shift)


def make_sigmas(
    num_steps: int, shift: float | str = 1.0, schedule: str = "shift", *, dynamic: DynamicShift | None = None
) -> torch.Tensor:
    """``sigmas [T+1]`` float32, strictly decreasing from exactly 1 to exactly 0 (T = ``num_steps``).

    ``schedule`` names the grid in :data:`SCHEDULES` (``"shift"``: ``linspace(1, 0, T+1)`` shifted, the DanceGRPO /
    FluxPipeline convention; ``"diffusers"``: the SD3 scheduler's default); ``shift`` a number or ``"auto"``
    (the model's ``dynamic`` shift, :func:`resolve_shift`). The arithmetic is done in float64 and rounded once.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an int >= 1, got {num_steps!r}")
    grid = SCHEDULES.get(schedule)
    if shift == "auto" and schedule != "shift":
        # diffusers' dynamic-shifting schedulers do not shift at construction, so the double shift of the
        # "diffusers" grid would not be theirs; FluxPipeline itself passes the "shift" grid.
        raise ValueError(
            f"sampler.shift: 'auto' (FluxPipeline's dynamic shift) needs sampler.schedule 'shift', got {schedule!r}"
        )
    return grid(num_steps, resolve_shift(shift, dynamic)).to(torch.float32)  # [T+1]
