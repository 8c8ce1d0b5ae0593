"""Small pieces shared by the embedding-based rewards: the Linear-stack scoring head and L2 normalization."""

from __future__ import annotations

from pathlib import Path

import torch


def linear_chain(reward: str, path: Path, state: dict[str, torch.Tensor], prefix: str) -> torch.nn.Sequential:
    """The ``{prefix}layers.{i}.{weight,bias}`` Linear stack as one Sequential, in index order.

    The LAION aesthetic v2 head and ImageReward's head are Linear 768-1024-128-64-16-1 with Dropout between
    and no activation (improved-aesthetic-predictor simple_inference.py; ImageReward.py ``MLP``); at eval the
    dropouts are identities, so the Linear layers applied in order are the whole head.
    """
    idx = sorted({int(k[len(prefix) :].split(".")[1]) for k in state if k.startswith(prefix + "layers.")})
    if not idx:
        raise ValueError(f"reward '{reward}': '{path}' has no '{prefix}layers.N.weight' entries")
    layers: list[torch.nn.Linear] = []
    for i in idx:
        w, b = state[f"{prefix}layers.{i}.weight"], state[f"{prefix}layers.{i}.bias"]
        if layers and w.shape[1] != layers[-1].out_features:
            raise ValueError(f"reward '{reward}': '{path}' layer {i} takes {w.shape[1]} inputs, previous gives "
                             f"{layers[-1].out_features}")
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        lin.load_state_dict({"weight": w.float(), "bias": b.float()})
        layers.append(lin)
    if layers[-1].out_features != 1:
        raise ValueError(f"reward '{reward}': '{path}' head ends in {layers[-1].out_features} outputs, expected 1")
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``[B, D]`` scaled to unit L2 norm (in fp32)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
