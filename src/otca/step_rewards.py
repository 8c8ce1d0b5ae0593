"""The rewards of every state's decoded clean prediction, ``step_rewards [b, T+1, K]``, for credit schemes that
declare they need them (``"step_rewards" in otca.credit.scheme_needs(scheme)``).

State ``t`` of a trajectory (``latents[:, t]`` at ``sigmas[t]``) is shown to the rewards as its clean prediction
``x0_hat = x - sigma * v(x, sigma)`` (:func:`otca.flow.predict_x0`); at ``sigma = 0`` that is the state
itself. The rollout already evaluates ``v`` at states ``0..T-1``, so a trainer that keeps those predictions
pays only the decodes and reward calls; :func:`clean_predictions` recomputes them (``T`` more policy forwards)
for a caller that did not keep them. Both callables are passed in, so this module knows no policy or reward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from otca.flow import predict_x0

# velocity(x [n, *latent], sigma [n]) -> v [n, *latent], with the prompts' conditioning already bound
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# score(latents [n, *latent], prompts [n]) -> rewards [n, K]: decode, then every training reward
Score = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


@torch.no_grad()
def clean_predictions(velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x0_hat`` of every state ``[b, T+1, *latent]`` from ``latents [b, T+1, *latent]`` and ``sigmas [T+1]``;
    one ``velocity`` call per state with ``sigma > 0`` (a state at ``sigma = 0`` is its own clean prediction)."""
    if latents.dim() < 3 or latents.shape[1] != sigmas.shape[0]:
        raise ValueError(f"latents, sigmas: expected [b, T+1, *latent] and [T+1], got {list(latents.shape)} and "
                         f"{list(sigmas.shape)}")
    b = latents.shape[0]
    out = []
    for t, sigma in enumerate(sigmas.tolist()):
        x = latents[:, t]
        if sigma == 0:
            out.append(x)
            continue
        sig = torch.full((b,), sigma, device=x.device)  # [b]
        out.append(predict_x0(x, velocity(x, sig), sigma))  # [b, *latent]
    return torch.stack(out, 1)  # [b, T+1, *latent]


@torch.no_grad()
def score_states(
    views: torch.Tensor,
    prompts: Sequence[str],
    score: Score,
    *,
    known: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``step_rewards [b, S, K]``: ``score`` of each state's view ``views [b, S, *latent]`` (one call per state).

    ``known`` maps a state index to rewards ``[b, K]`` already computed (the final state the trainer scored),
    which are used as they are instead of being scored again.
    """
    b, S = views.shape[:2]
    if len(prompts) != b:
        raise ValueError(f"prompts: expected {b} (one per trajectory), got {len(prompts)}")
    known = known or {}
    rows = [known[t] if t in known else score(views[:, t], prompts) for t in range(S)]  # S x [b, K]
    return torch.stack([r.float() for r in rows], 1)  # [b, S, K]
