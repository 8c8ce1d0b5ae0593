"""Cost of every registered credit scheme, with and without computing the TCD gains from the latents.

Defaults are the paper's FLUX setting: B = 48 samples (4 prompts x 12), T = 16 steps, 16x64x64 latents, K = 3
rewards. Times are the median of ``--repeats`` runs after one warm-up, in milliseconds. ``--sweep`` instead
varies B and T (x1/4 .. x2) and the latent's height and width (/8 .. x1) one at a time around those values
and prints the cost of the TCD gains and of the otca and grpo schemes, with each axis's log-log slope
(1 = linear).

    python benchmarks/credit_cost.py [--B 48] [--T 16] [--latent 16x64x64] [--K 3] [--group 12]
                                     [--device cpu] [--threads N] [--repeats 7] [--sweep]
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import torch

from _bench import fit_line, median_ms
from otca.credit import CreditConfig, CreditInputs, get_scheme, scheme_names, tcd_gains
from otca.flow.schedule import make_sigmas


def synthetic_rollout(B: int, T: int, latent: tuple[int, ...], K: int, group: int, device: torch.device):
    """A noisy path drifting towards its end point, stored like a rollout: ``latents [B, T+1, *latent]``,
    ``final [B, *latent]``, ``rewards [B, K]``, ``group_ids [B]``, ``sigmas [T+1]``."""
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(B, T + 1, *latent, generator=g, device=device).cumsum(1)
    final = latents[:, -1] + 0.1 * torch.randn(B, *latent, generator=g, device=device)
    rewards = torch.randn(B, K, generator=g, device=device)
    group_ids = torch.arange(B, device=device) // group
    return latents, final, rewards, group_ids, make_sigmas(T, shift=3.0).to(device)


def sweep(args, latent: tuple[int, ...], device: torch.device) -> None:
    """Cost of the gains and of otca / grpo against B, T and the latent's spatial size, one at a time."""
    schemes = {"tcd_gains": None, "otca": get_scheme("otca"), "grpo": get_scheme("grpo")}
    # the last two latent dims (height, width) divided by 8, 4, 2, 1; repeated sizes of a tiny latent dropped
    sizes = dict.fromkeys((*latent[:-2], max(1, latent[-2] // f), max(1, latent[-1] // f)) for f in (8, 4, 2, 1))
    axes = {
        "B": [(b, (b, args.T, latent)) for b in (max(1, args.B // 4), max(1, args.B // 2), args.B, 2 * args.B)],
        "T": [(t, (args.B, t, latent)) for t in (max(1, args.T // 4), max(1, args.T // 2), args.T, 2 * args.T)],
        "latent elements": [(math.prod(lat), (args.B, args.T, lat)) for lat in sizes],
    }
    print(f"{'axis':<16}{'value':>9}" + "".join(f"{n:>14}" for n in schemes) + "   (ms)")
    for axis, points in axes.items():
        costs = {n: [] for n in schemes}
        for value, (B, T, lat) in points:
            latents, final, rewards, group_ids, sigmas = synthetic_rollout(B, T, lat, args.K, args.group, device)
            inputs = CreditInputs.from_trajectory(rewards, group_ids, latents, final, sigmas)
            for n, scheme in schemes.items():
                if scheme is None:
                    fn = partial(tcd_gains, latents, final)
                else:
                    fn = partial(scheme, inputs, CreditConfig())
                costs[n].append(median_ms(fn, args.repeats, device))
            print(f"{axis:<16}{value:>9}" + "".join(f"{costs[n][-1]:>14.3f}" for n in schemes))
        xs = [math.log(v) for v, _ in points]
        slopes = [fit_line(xs, [math.log(max(t, 1e-6)) for t in costs[n]])[1] for n in schemes]
        print(f"{axis:<16}{'slope':>9}" + "".join(f"{s:>14.2f}" for s in slopes))


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
    p.add_argument("--sweep", action="store_true", help="vary B, T and the latent size around the given values")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    latent = tuple(int(d) for d in args.latent.lower().split("x"))
    device = torch.device(args.device)

    print(f"B={args.B} T={args.T} latent={'x'.join(map(str, latent))} K={args.K} group={args.group} "
          f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    if args.sweep:
        sweep(args, latent, device)
        return
    latents, final, rewards, group_ids, sigmas = synthetic_rollout(args.B, args.T, latent, args.K, args.group, device)
    inputs = CreditInputs.from_trajectory(rewards, group_ids, latents, final, sigmas)
    config = CreditConfig()
    gains_ms = median_ms(lambda: tcd_gains(latents, final), args.repeats, device)
    print(f"tcd_gains from latents {list(latents.shape)}: {gains_ms:8.2f} ms")
    print(f"{'scheme':<12}{'credit only (ms)':>18}{'with gains (ms)':>18}")
    for name in scheme_names():
        scheme = get_scheme(name)
        alone = median_ms(partial(scheme, inputs, config), args.repeats, device)
        whole = median_ms(
            lambda s=scheme: s(CreditInputs.from_trajectory(rewards, group_ids, latents, final, sigmas), config),
            args.repeats,
            device,
        )
        print(f"{name:<12}{alone:>18.2f}{whole:>18.2f}")


if __name__ == "__main__":
    main()
