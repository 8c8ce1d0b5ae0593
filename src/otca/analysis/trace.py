"""Traces of sampled trajectories for the credit analysis: the trainer's own rollouts, and the rewards of a decoded
*view* of every state (:data:`VIEWS`: the clean prediction ``x0`` or the noisy ``state``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from otca.analysis.metrics import ZSUM, reward_gains, zscore_sum
from otca.registry import Registry
from otca.weights import eval_mode

# view(velocity, x [b, *latent], sigma, cond, micro_batch) -> the latent [b, *latent] that is decoded and scored;
# velocity(x, sigma [b], cond) is the one the rollout used
View = Callable[[Callable, torch.Tensor, float, Any, int], torch.Tensor]
VIEWS: Registry[View] = Registry("decoded view")


@VIEWS.register("x0")
def clean_prediction_view(
    velocity: Callable, x: torch.Tensor, sigma: float, cond: Any, micro_batch: int
) -> torch.Tensor:
    """``x0_hat = x - sigma * v(x, sigma)`` (the policy's clean prediction at this state)."""
    from otca.flow import predict_x0
    from otca.rollout import velocity_in_chunks

    sig = torch.full((x.shape[0],), sigma, device=x.device)  # [b]
    return predict_x0(x, velocity_in_chunks(velocity, x, sig, cond, micro_batch), sigma)  # [b, *latent]


@VIEWS.register("state")
def state_view(velocity: Callable, x: torch.Tensor, sigma: float, cond: Any, micro_batch: int) -> torch.Tensor:
    """The noisy state itself (the paper's literal reading of Sec. 6.1)."""
    return x


@dataclass
class CreditTrace:
    """What the analysis needs from sampled trajectories (all on CPU, fp32)."""

    gains: torch.Tensor  # [N, T] TCD similarity gains dS
    scores: torch.Tensor  # [N, T+1, K] reward of the decoded view of every state
    reward_names: list[str]  # [K]
    prompts: list[str]  # [N]
    steps: int  # transitions analysed: the first `steps` of T (T, or T-1 when the run drops the last)
    view: str  # what was decoded (a name in VIEWS)

    def targets(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{reward name or 'z-sum': (dS [N, steps], dR [N, steps])}``."""
        dS = self.gains[:, : self.steps]  # [N, steps]
        per = {n: reward_gains(self.scores[..., j])[:, : self.steps] for j, n in enumerate(self.reward_names)}
        per[ZSUM] = reward_gains(zscore_sum(self.scores))[:, : self.steps].float()  # [N, steps]
        return {name: (dS, dR) for name, dR in per.items()}


@torch.no_grad()
def trace_trajectories(trainer: Any, n: int, view: str = "x0") -> CreditTrace:
    """Sample ``n`` trajectories with the trainer's own phases (its prompts, sampler, seeds and weights) and
    score the decoded ``view`` of every state with its rewards.

    Batches are the trainer's iterations ``0, 1, ...`` (one global batch each); the first ``n`` samples are kept.
    """
    from otca.credit import tcd_gains

    see = VIEWS.get(view)
    gains: list[torch.Tensor] = []
    scores: list[torch.Tensor] = []
    prompts: list[list[str]] = []
    micro = trainer.cfg.train.micro_batch
    it = 0
    while sum(len(p) for p in prompts) < n:
        batch = trainer.sample_prompts(it)
        traj, cond = trainer.rollout(batch, it)
        per_state = []
        with eval_mode(trainer.policy):
            for k, sigma in enumerate(traj.sigmas.tolist()):  # T+1 states
                shown = see(trainer.model, traj.latents[:, k], sigma, cond, micro)  # [b, *latent]
                pixels = trainer.policy.decode(shown).float().clamp(0, 1)
                per_state.append(trainer.rewards(pixels, batch.prompts))  # [b, K]
        scores.append(torch.stack(per_state, 1))  # [b, T+1, K]
        gains.append(tcd_gains(traj.latents, traj.final).cpu())  # [b, T]
        prompts.append(batch.prompts)
        it += 1
    T = gains[0].shape[1]
    steps = T - 1 if trainer.cfg.train.drop_last_step and T > 1 else T
    return CreditTrace(
        gains=torch.cat(gains)[:n],
        scores=torch.cat(scores)[:n],
        reward_names=list(trainer.rewards.names),
        prompts=[p for ps in prompts for p in ps][:n],
        steps=steps,
        view=view,
    )
