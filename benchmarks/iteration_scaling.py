"""How one GRPO iteration's cost grows with the group size G and the number of steps T: is it linear?

For each G (at the config's T) and each T (at the config's G) the median time of ``--repeats`` iterations
(rollout, decode + rewards, credit, update; no eval) after one warm-up; then a least-squares line
``seconds = a + b x`` with its R^2, and the log-log slope (1 = linear, below 1 = a fixed overhead dominates).

    OMP_NUM_THREADS=1 python benchmarks/iteration_scaling.py [--G 2,4,8,16] [--T 4,8,16,32] [--repeats 3]
                                                             [--threads 1] [--config FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from _bench import build_trainer, fit_line, header, train_iteration


def iteration_seconds(config: str | None, overrides: list[str], repeats: int) -> float:
    trainer = build_trainer(config, overrides)
    times = []
    for it in range(repeats + 1):
        t = time.perf_counter()
        train_iteration(trainer, it)
        if it:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def sweep(name: str, key: str, values: list[int], config: str | None, overrides: list[str], repeats: int) -> None:
    secs = [iteration_seconds(config, [*overrides, f"{key}={v}"], repeats) for v in values]
    for v, s in zip(values, secs, strict=True):
        print(f"  {name}={v:<4} {s:8.3f} s/iteration")
    a, b, r2 = fit_line(values, secs)
    slope = fit_line([math.log(v) for v in values], [math.log(s) for s in secs])[1]
    print(f"  fit: seconds = {a:.3f} + {b:.4f} * {name}   (R^2 = {r2:.4f}; log-log slope {slope:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--G", default="2,4,8,16", help="group sizes")
    p.add_argument("--T", default="4,8,16,32", help="sampler steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(header(build_trainer(args.config, args.overrides)))
    print("iteration cost against the group size G:")
    sweep("G", "train.group_size", [int(v) for v in args.G.split(",")], args.config, args.overrides, args.repeats)
    print("iteration cost against the sampler steps T:")
    sweep("T", "sampler.num_steps", [int(v) for v in args.T.split(",")], args.config, args.overrides, args.repeats)


if __name__ == "__main__":
    main()
