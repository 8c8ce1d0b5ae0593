"""Evaluation: ODE samples on fixed prompts and seeds, scored by every training reward and by eval-only metrics.

Eval-only metric suites are registered by name (``register_eval_suite``) and take
``(pixels [N, ...], prompts, group_ids [N]) -> {metric name: value}``; training never sees them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from otca.flow import make_sigmas
from otca.models.base import FlowPolicy
from otca.registry import Registry
from otca.rewards.base import RewardSet
from otca.rollout import initial_noise, sample_ode

EvalSuite = Callable[[torch.Tensor, Sequence[str], torch.Tensor], dict[str, float]]
EVAL_SUITES: Registry[EvalSuite] = Registry("eval metric suite")


def register_eval_suite(name: str) -> Callable[[EvalSuite], EvalSuite]:
    """Decorator for an eval-only metric suite ``(pixels, prompts, group_ids) -> {metric: value}``."""
    return EVAL_SUITES.register(name)


# Prompt sets by name, addressed as '<set>:<split>': a function split -> prompts (a world registers its own).
PromptSet = Callable[[str], list[str]]
PROMPT_SETS: Registry[PromptSet] = Registry("prompt set")


def register_prompt_set(name: str) -> Callable[[PromptSet], PromptSet]:
    """Decorator for a prompt set ``split -> prompts``, then addressed as ``'<name>:<split>'``."""
    return PROMPT_SETS.register(name)


def load_prompts(spec: str) -> list[str]:
    """'<set>:<split>' of a registered prompt set, or a text file with one prompt per line."""
    name, _, split = spec.partition(":")
    if split and name in PROMPT_SETS:
        return PROMPT_SETS.get(name)(split)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file '{path}' not found (expected a text file, one prompt per line, or one of "
            f"{', '.join(n + ':<split>' for n in PROMPT_SETS.names())})"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"prompt file '{path}' is unreadable (expected UTF-8 text: {e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file '{path}' has no prompts")
    return prompts


@dataclass
class EvalResult:
    metrics: dict[str, float]  # 'reward/<name>' for training rewards, suite names for eval-only metrics
    pixels: torch.Tensor  # [N, ...] in [0, 1]
    prompts: list[str]


@torch.no_grad()
def evaluate_policy(
    policy: FlowPolicy,
    rewards: RewardSet,
    prompts: Sequence[str],
    *,
    samples_per_prompt: int,
    num_steps: int,
    shift: float | str,
    seed: int,
    suite: str | None,
    micro_batch: int = 32,
    velocity: Callable | None = None,
    schedule: str = "shift",
) -> EvalResult:
    """Deterministic ODE samples (fixed seeds) for every prompt, then rewards and the eval-only suite."""
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    group_ids = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
    n = len(all_prompts)
    x = initial_noise(policy, seed, 0, range(n), group_ids.tolist(), same_per_group=False)
    cond = policy.encode(all_prompts)
    sigmas = make_sigmas(num_steps, shift, schedule, dynamic=getattr(policy, "dynamic_shift", None))  # [T+1]
    x = sample_ode(policy, cond, x, sigmas, micro_batch=micro_batch, velocity=velocity)
    pixels = policy.decode(x).float().clamp(0, 1)
    scores = rewards(pixels, all_prompts)  # [N, K]
    metrics = {f"reward/{name}": float(scores[:, k].mean()) for k, name in enumerate(rewards.names)}
    if suite is not None:
        metrics.update(EVAL_SUITES.get(suite)(pixels.cpu(), all_prompts, group_ids))
    return EvalResult(metrics, pixels.cpu(), all_prompts)
