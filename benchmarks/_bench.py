"""Helpers shared by the benchmark scripts: timing, peak memory, a Trainer on any config, a least-squares line.

Not a test suite: the scripts print figures for docs/results.md. Run them from the repository root, e.g.
``OMP_NUM_THREADS=1 python benchmarks/iteration_profile.py``.
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


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


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def build_trainer(config: str | None, overrides: Sequence[str]):
    """A Trainer on ``config`` + ``overrides`` writing to a fresh temporary folder (no progress bar)."""
    from otca.config import load_config
    from otca.trainer import Trainer

    out = Path(tempfile.mkdtemp(prefix="otca-bench-"))
    cfg = load_config(config, [*overrides, f"out_dir={out}", "progress=false"])
    trainer = Trainer(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    return trainer


def train_iteration(trainer, it: int, clock: Callable[[str], None] = lambda phase: None) -> None:
    """One GRPO iteration through the trainer's phases (as ``Trainer.train`` runs them, without eval or
    checkpoint); ``clock(phase)`` is called after each phase."""
    batch = trainer.sample_prompts(it)
    traj, cond = trainer.rollout(batch, it)
    clock("rollout")
    rewards = trainer.score(traj, batch)
    clock("decode + rewards")
    credit = trainer.assign_credit(traj, rewards, batch, it)
    clock("credit")
    stats = trainer.update(traj, cond, credit)
    clock("update")
    trainer.runlog.append(trainer.log_row(it, credit, stats, 0.0))
    clock("log")


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: returns ``(a, b, R^2)``."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((yi - a - b * xi) ** 2 for xi, yi in zip(x, y, strict=True))
    ss_tot = sum((yi - my) ** 2 for yi in y)
    return a, b, 1 - ss_res / ss_tot if ss_tot > 0 else 1.0


def header(trainer=None) -> str:
    """One line saying what the figures were measured on (commit, torch, threads, the run's batch shape)."""
    from otca.compare import provenance

    p = provenance()
    line = f"commit {p['commit']}  torch {p['torch']}  threads {torch.get_num_threads()}  cpus {p['cpu_count']}"
    if trainer is not None:
        t, s = trainer.cfg.train, trainer.cfg.sampler
        line += f"  | {t.prompts_per_iter} prompts x G={t.group_size}, T={s.num_steps}, micro_batch {t.micro_batch}"
    return line
