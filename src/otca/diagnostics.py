"""Credit diagnostics and run artefacts: reward curves, the per-step weight heatmap, sample grids.

Plots use matplotlib's file backend and are written by the main process only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from otca.credit.group import group_center


def zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> int:
    """Number of groups whose every objective is constant within the group (they get zero advantage).

    rewards: [B, K]; group_ids: [B]. Uses the credit core's own constant-group test.
    """
    constant = group_center(rewards, group_ids)[2].all(dim=1)  # [B]: the sample's group is constant in every column
    return int(group_ids[constant].unique().numel())


def step_weight_profile(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean temporal weight of each step over the samples that train it: weights, mask [B, T] -> [T]."""
    m = mask.float()
    return (weights * m).sum(0) / m.sum(0).clamp_min(1.0)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict], keys: Sequence[str], out_dir: Path, prefix: str = "curve") -> list[Path]:
    """One PNG per key: value against iteration (from the metrics.jsonl rows)."""
    plt = pyplot()
    paths = []
    for key in keys:
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        it, val = zip(*pts, strict=True)
        ax.plot(it, val, lw=1.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{prefix}_{key.replace('/', '_')}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_weight_heatmap(profiles: list[list[float]], path: Path) -> None:
    """Iterations x steps heatmap of the mean temporal weight (mean 1 = uniform broadcast)."""
    if not profiles:
        return
    plt = pyplot()
    data = torch.tensor(profiles)  # [iters, T]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("denoising step k (0 = from pure noise)")
    ax.set_ylabel("iteration")
    ax.set_title("mean temporal credit weight per step")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_grid(pixels: torch.Tensor, prompts: Sequence[str], path: Path, per_row: int, title: str = "") -> None:
    """A grid of images ``[N, C, H, W]`` in [0, 1] (video: the middle frame), one prompt per row."""
    plt = pyplot()
    if pixels.dim() == 5:  # [N, C, F, H, W]
        pixels = pixels[:, :, pixels.shape[2] // 2]
    n = pixels.shape[0]
    rows = math.ceil(n / per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 0.9, rows * 0.95), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = pixels[i].permute(1, 2, 0).float().numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
        if i % per_row == 0:
            ax.set_title(prompts[i], fontsize=5, loc="left")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
