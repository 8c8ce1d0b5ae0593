"""Rollouts: sample trajectories with the core's SDE and keep what credit and loss need.

Every random draw is seeded from (run seed, iteration, stream, global index), never from the process
rank, so a run gives the same samples whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from otca.batching import micro_batches
from otca.flow import Transition, mixed_step, ode_step, predict_x0
from otca.models.base import FlowPolicy

# Independent random streams of one iteration.
STREAM_INIT_NOISE = 0
STREAM_SDE_NOISE = 1
STREAM_STEP_MASK = 2
STREAM_PROMPTS = 3
STREAM_SDE_WINDOW = 4  # where a random SDE window lies (one draw per iteration, index 0)


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed is a hash of the integer key (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class Trajectory:
    """A batch of sampled trajectories (denoising order, see the conventions in docs/design.md)."""

    latents: torch.Tensor  # [B, T+1, *latent]: index 0 = initial noise, k -> k+1 is transition k
    log_probs: torch.Tensor  # [B, T] fp32: log-density of transition k under the sampling policy
    final: torch.Tensor  # [B, *latent]: the latent that is decoded and scored
    sigmas: torch.Tensor  # [T+1] fp32
    means: torch.Tensor | None = None  # [B, T, *latent] fp32: transition means (kept for a ratio guard)
    x0_hats: torch.Tensor | None = None  # [B, T, *latent]: clean prediction of state k (kept for step_rewards)


def velocity_in_chunks(
    velocity: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Any,
    micro_batch: int,
) -> torch.Tensor:
    """``velocity`` over micro-batches of ``x [B, *latent]``, ``sigma [B]``; cond is sliced alongside.

    The update phase uses the same chunks, so a re-evaluated log-density equals the sampled one bit for bit.
    """
    return torch.cat([velocity(x[s], sigma[s], cond[s]) for s in micro_batches(x.shape[0], micro_batch)], dim=0)


def initial_noise(
    policy: FlowPolicy,
    seed: int,
    iteration: int,
    indices: Sequence[int],
    group_ids: Sequence[int],
    same_per_group: bool,
) -> torch.Tensor:
    """``[b, *latent]`` initial latents, one generator per sample (or per group when shared)."""
    keys = group_ids if same_per_group else indices
    gens = [seeded_generator(seed, iteration, STREAM_INIT_NOISE, int(k)) for k in keys]
    return policy.init_latents(len(gens), gens)


@torch.no_grad()
def sample_sde(
    policy: FlowPolicy,
    cond: Any,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    transition: Transition,
    eta: float,
    seed: int,
    iteration: int,
    indices: Sequence[int],
    final_latent: str = "x0",
    micro_batch: int = 16,
    velocity: Callable | None = None,
    sde_steps: torch.Tensor | None = None,
    keep_means: bool = False,
    keep_x0: bool = False,
) -> Trajectory:
    """Roll out ``x [b, *latent]`` through ``T = len(sigmas) - 1`` stochastic transitions.

    ``transition`` is the SDE step (``otca.flow.get_transition(cfg.sampler.sde)``): the trainer resolves it once
    and hands the same object to the rollout and the update, so the update re-evaluates exactly the sampled
    transition densities. ``indices`` are the samples' global indices: the SDE noise of sample i comes from
    its own generator. ``velocity`` defaults to ``policy.velocity`` (the trainer passes its DDP/FSDP-wrapped module).
    ``sde_steps [T]`` bool (an SDE window, :func:`otca.flow.sde_window`): ODE steps where False, with NaN
    log-probs there (never trained); None: every step stochastic. ``keep_means``: also keep each transition's
    mean (``Trajectory.means``, what a ratio guard with ``needs_geometry`` reads as the old policy's mean).
    ``keep_x0``: also keep each state's clean prediction (``Trajectory.x0_hats``, what a scheme that needs
    ``step_rewards`` scores; :mod:`otca.step_rewards`).
    """
    velocity = velocity or policy.velocity
    gens = [seeded_generator(seed, iteration, STREAM_SDE_NOISE, int(i)) for i in indices]
    b, T = x.shape[0], len(sigmas) - 1
    latents, log_probs, means, x0s = [x], [], [], []
    x0_hat = x
    for k in range(T):
        sig = sigmas[k].expand(b)  # [b]
        v = velocity_in_chunks(velocity, x, sig.to(x.device), cond, micro_batch)
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device, torch.float32)
        x0_hat = predict_x0(x, v, float(sigmas[k]))
        if keep_x0:
            x0s.append(x0_hat)
        stochastic = sde_steps is None or bool(sde_steps[k])
        s_k, s_next = float(sigmas[k]), float(sigmas[k + 1])
        x, logp, mean, _ = mixed_step(transition, x, v, s_k, s_next, stochastic=stochastic, eta=eta, noise=noise)
        if keep_means:
            means.append(mean)
        latents.append(x)
        log_probs.append(logp)
    final = x0_hat if final_latent == "x0" else x
    kept = torch.stack(means, 1) if keep_means else None
    x0_hats = torch.stack(x0s, 1) if keep_x0 else None
    return Trajectory(torch.stack(latents, 1), torch.stack(log_probs, 1), final, sigmas, kept, x0_hats)


@torch.no_grad()
def sample_ode(
    policy: FlowPolicy,
    cond: Any,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    micro_batch: int = 16,
    velocity: Callable | None = None,
) -> torch.Tensor:
    """Deterministic Euler sampling (evaluation): returns the final latent ``[b, *latent]``."""
    velocity = velocity or policy.velocity
    b = x.shape[0]
    for k in range(len(sigmas) - 1):
        v = velocity_in_chunks(velocity, x, sigmas[k].expand(b).to(x.device), cond, micro_batch)
        x = ode_step(x, v, float(sigmas[k]), float(sigmas[k + 1]))
    return x


def select_train_steps(
    n: int, T: int, *, fraction: float, mode: str, drop_last: bool, generator: torch.Generator
) -> torch.Tensor:
    """Trained-transition mask ``[n, T]`` bool.

    Candidates are transitions ``0..T-1`` (``0..T-2`` with ``drop_last``, as DanceGRPO); of those,
    ``max(1, floor(fraction * n_candidates))`` are trained: a random subset per sample (``mode='random'``,
    DanceGRPO's per-sample permutation) or the first ones (``'prefix'``, Flow-GRPO).
    """
    n_cand = T - 1 if drop_last and T > 1 else T
    n_train = max(1, int(fraction * n_cand))
    mask = torch.zeros(n, T, dtype=torch.bool)
    if mode == "prefix":
        mask[:, :n_train] = True
    elif mode == "random":
        scores = torch.rand(n, n_cand, generator=generator)  # [n, n_cand]
        chosen = scores.argsort(dim=1)[:, :n_train]
        mask[:, :n_cand] = torch.zeros(n, n_cand, dtype=torch.bool).scatter_(1, chosen, True)
    else:
        raise ValueError(f"timestep_selection '{mode}': expected 'random' or 'prefix'")
    return mask
