"""How a diffusers denoiser is called: the timestep in scheduler units and classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch

# SD3 and Wan take the timestep in scheduler units: FlowMatchEulerDiscreteScheduler sets
# timesteps = sigmas * num_train_timesteps with num_train_timesteps = 1000 for both families.
TIMESTEP_SCALE = 1000.0


def sigma_to_timestep(sigma: torch.Tensor, b: int, device: torch.device) -> torch.Tensor:
    """``sigma [B] (or scalar)`` in [0, 1] -> the transformer's timestep ``[B]`` in [0, 1000], kept in fp32
    (as the pipelines pass it: bf16 would round 1000 * sigma to steps of 4)."""
    return (sigma.to(device=device, dtype=torch.float32) * TIMESTEP_SCALE).reshape(-1).expand(b)  # [B]


def cfg_combine(v_cond: torch.Tensor, v_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6, velocity form of the diffusers pipelines):
    ``v = v_neg + s * (v_cond - v_neg)``, same shape as the inputs."""
    return v_neg + scale * (v_cond - v_neg)


def cfg_renorm(v_guided: torch.Tensor, v_cond: torch.Tensor) -> torch.Tensor:
    """The guided velocity rescaled to the conditional one's norm over the last axis (each token's channels):
    ``v * ||v_cond|| / ||v||`` (diffusers' ``QwenImagePipeline.__call__``, after its true-CFG combination);
    shapes ``[..., D]``."""
    return v_guided * (torch.linalg.vector_norm(v_cond, dim=-1, keepdim=True)
                       / torch.linalg.vector_norm(v_guided, dim=-1, keepdim=True))


def guided_forward(
    net: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    positive: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor] | None,
    scale: float,
    *,
    renorm: bool = False,
) -> torch.Tensor:
    """``net(x, t, **embeddings)`` with classifier-free guidance when ``scale > 1`` (the pipelines' rule).

    ``x [B, *latent]`` and ``t [B]`` already in the network's dtype / fp32; the conditional and unconditional
    passes run as one batch of 2B. Returns the guided output ``[B, *latent]`` in fp32 (the combination is fp32),
    rescaled by :func:`cfg_renorm` when ``renorm`` (Qwen-Image).
    """
    if scale <= 1.0:
        return net(x, t, **positive).float()
    if negative is None:
        raise ValueError(f"velocity: guidance scale {scale} > 1 needs a cond with negative-prompt embeddings")
    both = {k: torch.cat([positive[k], negative[k]]) for k in positive}  # {field: [2B, ...]}
    out = net(torch.cat([x, x]), torch.cat([t, t]), **both).float()  # [2B, *latent]
    v_cond, v_neg = out.chunk(2)  # [B, *latent] each
    v = cfg_combine(v_cond, v_neg, scale)
    return cfg_renorm(v, v_cond) if renorm else v
