"""Cost of every registered credit scheme, with and without computing the TCD gains from the latents.

Defaults are the paper's FLUX setting: B = 48 samples (4 prompts x 12), T = 16 steps, 16x64x64 latents, K = 3
rewards. Times are the median of ``--repeats`` runs after one warm-up, in milliseconds.

    python benchmarks/credit_cost.py [--B 48] [--T 16] [--latent 16x64x64] [--K 3] [--group 12]
                                     [--device cpu] [--threads N] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from otca.credit import CreditConfig, CreditInputs, get_scheme, scheme_names, tcd_gains
from otca.flow.schedule import make_sigmas


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` runs, after one warm-up run."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=48, help="samples per rollout")
    p.add_argument("--T", type=int, default=16, help="sampler steps")
    p.add_argument("--latent", default="16x64x64", help="latent shape, e.g. 16x64x64")
    p.add_argument("--K", type=int, default=3, help="reward objectives")
    p.add_argument("--group", type=int, default=12, help="samples per prompt group")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    latent = tuple(int(d) for d in args.latent.lower().split("x"))
    device = torch.device(args.device)

    g = torch.Generator(device=device).manual_seed(0)
    # a noisy path drifting towards its end point, stored like a rollout: [B, T+1, *latent]
    latents = torch.randn(args.B, args.T + 1, *latent, generator=g, device=device).cumsum(1)
    final = latents[:, -1] + 0.1 * torch.randn(args.B, *latent, generator=g, device=device)
    rewards = torch.randn(args.B, args.K, generator=g, device=device)
    group_ids = torch.arange(args.B, device=device) // args.group
    sigmas = make_sigmas(args.T, shift=3.0).to(device)
    inputs = CreditInputs.from_trajectory(rewards, group_ids, latents, final, sigmas)
    config = CreditConfig()

    print(f"B={args.B} T={args.T} latent={'x'.join(map(str, latent))} K={args.K} group={args.group} "
          f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    gains_ms = median_ms(lambda: tcd_gains(latents, final), args.repeats, device)
    print(f"tcd_gains from latents {list(latents.shape)}: {gains_ms:8.2f} ms")
    print(f"{'scheme':<12}{'credit only (ms)':>18}{'with gains (ms)':>18}")
    for name in scheme_names():
        scheme = get_scheme(name)
        alone = median_ms(lambda: scheme(inputs, config), args.repeats, device)
        whole = median_ms(
            lambda: scheme(CreditInputs.from_trajectory(rewards, group_ids, latents, final, sigmas), config),
            args.repeats,
            device,
        )
        print(f"{name:<12}{alone:>18.2f}{whole:>18.2f}")


if __name__ == "__main__":
    main()
