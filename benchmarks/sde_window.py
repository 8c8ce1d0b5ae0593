"""Seconds per iteration with and without an SDE window (MixGRPO / Flow-GRPO-Fast) on the embedded default.

The window is wired into the trainer here by wrapping two of its phases, which is also the hook the trainer
needs: the rollout gets ``sde_steps`` (ODE outside the window) and the credit phase's mask is intersected with
the window (only its steps are trained).

    OMP_NUM_THREADS=1 python benchmarks/sde_window.py [--size 4] [--mode sliding] [--iters 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _bench import build_trainer, header, train_iteration
from otca.flow import WindowSpec, sde_window, window_train_mask
from otca.rollout import seeded_generator

STREAM_WINDOW = 4  # a random stream of its own (rollout.py numbers 0-3)


def add_window(trainer, size: int, mode: str) -> None:
    """Wrap ``trainer.rollout`` and ``trainer.assign_credit`` with the window of each iteration."""
    T = trainer.cfg.sampler.num_steps
    spec = WindowSpec(num_steps=T, size=size)
    windows: dict[int, torch.Tensor] = {}

    def window(it: int) -> torch.Tensor:
        if it not in windows:
            windows[it] = sde_window(spec, mode, it, seeded_generator(trainer.cfg.seed, it, STREAM_WINDOW, 0))
        return windows[it]

    from otca import rollout as rollout_module

    sample_sde = rollout_module.sample_sde
    rollout, assign_credit = trainer.rollout, trainer.assign_credit

    def windowed_rollout(batch, it):
        rollout_module.sample_sde = lambda *a, **k: sample_sde(*a, **k, sde_steps=window(it))
        try:
            import otca.trainer as trainer_module

            trainer_module.sample_sde = rollout_module.sample_sde
            return rollout(batch, it)
        finally:
            rollout_module.sample_sde = trainer_module.sample_sde = sample_sde

    def windowed_credit(traj, rewards, batch, it):
        import otca.trainer as trainer_module

        select = trainer_module.select_train_steps
        trainer_module.select_train_steps = lambda n, T, **k: window_train_mask(window(it), select(n, T, **k))
        try:
            return assign_credit(traj, rewards, batch, it)
        finally:
            trainer_module.select_train_steps = select

    trainer.rollout, trainer.assign_credit = windowed_rollout, windowed_credit


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
    windowed = build_trainer(args.config, args.overrides)
    add_window(windowed, args.size, args.mode)
    t_win, p_win = seconds_per_iteration(windowed, args.iters)
    for name, t, p in (("full SDE", t_full, p_full), (f"window {args.size} ({args.mode})", t_win, p_win)):
        print(f"{name:22s} {t:7.2f} s/iter  " + "  ".join(f"{k} {v:.2f}" for k, v in p.items()))
    print(f"speed-up per iteration: {t_full / t_win:.2f}x (update phase {p_full['update'] / p_win['update']:.2f}x)")


if __name__ == "__main__":
    main()
