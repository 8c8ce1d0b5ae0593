"""What the reward-gain schemes' ``step_rewards [B, T+1, K]`` cost per iteration, against a normal iteration.

A normal iteration runs the trainer's phases (rollout, decode + rewards, credit, update, log). The extra work of
``reward-gain`` / ``step-moca`` is scoring the clean prediction of every other state: T decodes and T calls of
every reward per sample (states 0..T-2 and T; state T-1's prediction is the scored final when
``sampler.final_latent`` is ``x0``). Two ways to get those predictions are timed:

- *kept*: the rollout keeps the ``x0_hat`` it already computes at every step (a hook the trainer needs), so the
  extra is only decode + rewards;
- *recomputed*: the velocity is evaluated again at every state (T more policy forwards), as ``otca
  analyze-credit`` does today.

Plus the credit call itself (``step-moca`` vs ``otca``) and each scheme's mean |advantage| on the same rollouts
(the step size a scheme gives the update). Means over ``--iters`` iterations after ``--warmup``.

    OMP_NUM_THREADS=1 python benchmarks/step_rewards_cost.py [--config FILE] [--iters 5] [--warmup 1]
                                                             [--threads 1] [key=value ...]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from _bench import build_trainer, header, train_iteration
from otca.credit import CreditConfig, CreditInputs, get_scheme, tcd_gains
from otca.rollout import velocity_in_chunks
from otca.step_rewards import clean_predictions, score_states
from otca.weights import eval_mode

SIZE_OF = ("grpo", "tcd", "reward-gain", "moca", "otca", "reward-gain-moca", "step-moca")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (default: the embedded default)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    trainer = build_trainer(args.config, args.overrides)
    micro = trainer.cfg.train.micro_batch
    totals: dict[str, float] = defaultdict(float)
    size: dict[str, float] = defaultdict(float)
    last = 0.0

    def tick(phase: str) -> None:
        nonlocal last
        now = time.perf_counter()
        if measuring:
            totals[phase] += (now - last) / args.iters
        last = time.perf_counter()

    for it in range(args.warmup + args.iters):
        measuring = it >= args.warmup
        last = time.perf_counter()
        train_iteration(trainer, it, tick)

        # the extra work, on a fresh rollout of the same iteration (weights as after this iteration's update)
        batch = trainer.sample_prompts(it)
        traj, cond = trainer.rollout(batch, it)
        rewards = trainer.score(traj, batch)  # [b, K], the final the trainer scores anyway
        T = traj.sigmas.shape[0] - 1

        def velocity(x: torch.Tensor, sigma: torch.Tensor, cond=cond) -> torch.Tensor:
            return velocity_in_chunks(trainer.model, x, sigma, cond, micro)

        def score(latents: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
            return trainer.rewards(trainer.policy.decode(latents).float().clamp(0, 1), prompts)

        known = {T - 1: rewards} if trainer.cfg.sampler.final_latent == "x0" else {T: rewards}
        with eval_mode(trainer.policy):
            last = time.perf_counter()
            views = clean_predictions(velocity, traj.latents, traj.sigmas)  # [b, T+1, *latent]
            tick("extra: x0_hat recomputed (T policy forwards)")
            step_rewards = score_states(views, batch.prompts, score, known=known)  # [b, T+1, K]
            tick("extra: decode + rewards of T states")

        mask = torch.ones(len(batch.prompts), T, dtype=torch.bool)
        inputs = CreditInputs(rewards, batch.group_ids, mask, traj.sigmas, tcd_gains(traj.latents, traj.final),
                              step_rewards=step_rewards)
        for name in ("otca", "step-moca"):
            last = time.perf_counter()
            get_scheme(name)(inputs, CreditConfig())
            tick(f"credit: {name}")
        if measuring:  # step size of each scheme on this rollout (mean |advantage| over trained steps)
            for name in SIZE_OF:
                size[name] += get_scheme(name)(inputs, CreditConfig()).metrics["adv_abs_mean"] / args.iters

    iteration = sum(v for k, v in totals.items() if not k.startswith(("extra", "credit: ")))
    print(header(trainer))
    print(f"{'phase':<48}{'seconds':>9}{'of an iteration':>17}")
    for phase, sec in totals.items():
        print(f"{phase:<48}{sec:>9.4f}{sec / iteration:>17.1%}")
    print(f"{'normal iteration (the five phases above)':<48}{iteration:>9.4f}{1:>17.0%}")
    kept = totals["extra: decode + rewards of T states"]
    recomputed = kept + totals["extra: x0_hat recomputed (T policy forwards)"]
    for label, extra in (("rollout keeps x0_hat", kept), ("x0_hat recomputed", recomputed)):
        print(f"step_rewards every iteration, {label:<21}: +{extra:.3f} s = {extra / iteration:.1%} more per iteration"
              f"; every 4th iteration: +{extra / 4 / iteration:.1%}")
    print("mean |advantage| over trained steps (all steps here): "
          + ", ".join(f"{n} {v:.3f}" for n, v in size.items()))


if __name__ == "__main__":
    main()
