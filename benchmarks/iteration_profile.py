"""Where one GRPO iteration's time goes: rollout, decode + rewards, credit, update, log, and one eval; how much
of it is the policy network's forward and backward, and the process's peak memory.

Forward time is every ``policy.velocity`` call, backward time every ``Tensor.backward`` call, both timed by
wrapping them in this process only. Means over ``--iters`` iterations after ``--warmup``.

    OMP_NUM_THREADS=1 python benchmarks/iteration_profile.py [--config FILE] [--iters 5] [--warmup 1]
                                                             [--threads 1] [key=value ...]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from _bench import build_trainer, header, peak_rss_mb, train_iteration


class PolicyClock:
    """Seconds spent in the policy's forward (``velocity``) and in backward passes, since the last ``take``."""

    def __init__(self, trainer):
        self.fwd = self.bwd = 0.0
        velocity, backward = trainer.policy.velocity, torch.Tensor.backward

        def timed_velocity(*args, **kwargs):
            t = time.perf_counter()
            try:
                return velocity(*args, **kwargs)
            finally:
                self.fwd += time.perf_counter() - t

        def timed_backward(tensor, *args, **kwargs):
            t = time.perf_counter()
            try:
                return backward(tensor, *args, **kwargs)
            finally:
                self.bwd += time.perf_counter() - t

        trainer.policy.velocity = timed_velocity  # an instance attribute: the rollout, update and eval all see it
        torch.Tensor.backward = timed_backward

    def take(self) -> tuple[float, float]:
        out = (self.fwd, self.bwd)
        self.fwd = self.bwd = 0.0
        return out


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
    clock = PolicyClock(trainer)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # phase -> [wall, fwd, bwd]

    def tick(phase: str) -> None:
        nonlocal last
        now = time.perf_counter()
        fwd, bwd = clock.take()
        if measuring:
            for i, v in enumerate((now - last, fwd, bwd)):
                totals[phase][i] += v / args.iters
        last = time.perf_counter()

    for it in range(args.warmup + args.iters):
        measuring = it >= args.warmup
        clock.take()
        last = time.perf_counter()
        train_iteration(trainer, it, tick)
    measuring = True
    clock.take()
    last = time.perf_counter()
    trainer.evaluate(None)
    tick("eval (one, all eval prompts)")

    iteration = sum(v[0] for k, v in totals.items() if not k.startswith("eval"))
    eval_s = totals["eval (one, all eval prompts)"][0]
    print(header(trainer))
    # share: of one iteration's time (eval included for scale, though it is not part of an iteration)
    print(f"{'phase':<30}{'seconds':>9}{'share':>8}{'policy fwd':>12}{'policy bwd':>12}{'outside':>9}")
    for phase, (wall, fwd, bwd) in totals.items():
        print(f"{phase:<30}{wall:>9.3f}{wall / iteration:>8.1%}{fwd:>12.3f}{bwd:>12.3f}{1 - (fwd + bwd) / wall:>9.1%}")
    it_fwd = sum(v[1] for k, v in totals.items() if not k.startswith("eval"))
    it_bwd = sum(v[2] for k, v in totals.items() if not k.startswith("eval"))
    print(f"{'iteration (without eval)':<30}{iteration:>9.3f}{1:>8.0%}{it_fwd:>12.3f}{it_bwd:>12.3f}"
          f"{1 - (it_fwd + it_bwd) / iteration:>9.1%}")
    n = trainer.cfg.train.iterations
    print(f"a run of {n} iterations with an eval before and after: eval is "
          f"{2 * eval_s / (2 * eval_s + n * iteration):.1%} of its time")
    print(f"peak RSS: {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
