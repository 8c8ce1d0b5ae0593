"""Seconds per iteration with and without an SDE window (MixGRPO / Flow-GRPO-Fast) on the embedded default.

The window is the config's ``sampler.sde_window`` (SDE steps inside it, ODE outside, only its steps trained);
both trainers are built from the same config and overrides, the second with the window on.

    OMP_NUM_THREADS=1 python benchmarks/sde_window.py [--size 4] [--mode sliding] [--iters 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _bench import build_trainer, header, train_iteration


def seconds_per_iteration(trainer, iters: int) -> tuple[float, dict[str, float]]:
    phases: dict[str, list[float]] = {}
    totals = []
    train_iteration(trainer, 0)  # warm-up
    for it in range(1, iters + 1):
        last = start = time.perf_counter()

        def clock(phase: str) -> None:
            nonlocal last
            now = time.perf_counter()
            phases.setdefault(phase, []).append(now - last)
            last = now

        train_iteration(trainer, it, clock)
        totals.append(time.perf_counter() - start)
    return statistics.median(totals), {k: statistics.median(v) for k, v in phases.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4)
    ap.add_argument("--mode", default="sliding")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    full = build_trainer(args.config, args.overrides)
    print(header(full))
    t_full, p_full = seconds_per_iteration(full, args.iters)
    window = [f"sampler.sde_window.size={args.size}", f"sampler.sde_window.mode={args.mode}"]
    windowed = build_trainer(args.config, [*args.overrides, *window])
    t_win, p_win = seconds_per_iteration(windowed, args.iters)
    for name, t, p in (("full SDE", t_full, p_full), (f"window {args.size} ({args.mode})", t_win, p_win)):
        print(f"{name:22s} {t:7.2f} s/iter  " + "  ".join(f"{k} {v:.2f}" for k, v in p.items()))
    print(f"speed-up per iteration: {t_full / t_win:.2f}x (update phase {p_full['update'] / p_win['update']:.2f}x)")


if __name__ == "__main__":
    main()
