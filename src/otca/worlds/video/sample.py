"""Sampling the video policy by the probability-flow ODE (what the eval of a run does), and the base-model
report: the eval judges and the training rewards on the held-out prompts.

``python -m otca.worlds.video.sample [assets_dir] [--guidance 2.0 ...]`` prints the report of the shipped (or
given) weights; the figures in docs/ come from it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from otca.flow.schedule import make_sigmas
from otca.flow.sde import ode_step

if TYPE_CHECKING:
    from otca.models.wan import WanPolicy

EVAL_STEPS = 16  # the config's eval_steps default
EVAL_SHIFT = 3.0  # the config's flow.shift default


@torch.no_grad()
def sample_clips_ode(policy: WanPolicy, prompts: Sequence[str], seed: int = 0, steps: int = EVAL_STEPS,
                     shift: float = EVAL_SHIFT) -> torch.Tensor:
    """Clips ``[B, 1, F, H, W]`` in [0, 1] for ``prompts``: Euler steps of the ODE from noise drawn per sample from
    ``seed + i`` along ``make_sigmas(steps, shift)`` (the eval sampler)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    x = policy.init_latents(len(prompts), gens)  # [B, C, f, h, w]
    cond = policy.encode(list(prompts))
    sigmas = make_sigmas(steps, shift)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        sig = s.expand(len(prompts))
        v = policy.velocity(x, sig, cond)  # type: ignore[arg-type]  # encode returns the policy's WanCond
        x = ode_step(x, v, sig, s_next.expand(len(prompts)))
    clips: torch.Tensor = policy.decode(x)
    return clips


def base_report(assets_dir: str | None = None, guidance: float = 2.0, per_prompt: int = 2, seed: int = 0
                ) -> dict[str, float]:
    """The eval metrics and the mean training rewards of ``per_prompt`` samples of each held-out prompt."""
    from otca.worlds.video.metrics import evaluate_video
    from otca.worlds.video.policy import load_video_policy
    from otca.worlds.video.prompts import all_prompts
    from otca.worlds.video.rewards import REWARD_NAMES, video_rewards

    policy = load_video_policy(assets_dir, guidance_scale=guidance)
    prompts = [p for p in all_prompts("eval") for _ in range(per_prompt)]
    group_ids = torch.arange(len(prompts)) // per_prompt
    clips = sample_clips_ode(policy, prompts, seed=seed)
    report = evaluate_video(clips, prompts, group_ids)
    rewards = video_rewards(clips, prompts).mean(dim=0)
    report.update({f"reward/{n}": float(r) for n, r in zip(REWARD_NAMES, rewards, strict=True)})
    return report


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m otca.worlds.video.sample", description=base_report.__doc__)
    parser.add_argument("assets_dir", nargs="?", default=None, help="weights folder (default: the shipped ones)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--per-prompt", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = base_report(args.assets_dir, args.guidance, args.per_prompt, args.seed)
    print(" ".join(f"{k}={v:.3f}" for k, v in report.items()))
    return report


if __name__ == "__main__":
    main()
