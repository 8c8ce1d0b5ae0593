"""Every figure otca draws: a run's reward curves and credit-weight heatmap, sample grids, a comparison's reward
curves, and the credit analysis's example trajectories.

The functions take plain numbers and tensors (no run directory, trainer or config), use matplotlib's file
backend (no display needed) and are called by the main process only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def pyplot() -> Any:
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict[str, float]], keys: Sequence[str], out_dir: Path, prefix: str = "curve") -> list[Path]:
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


def save_grid(pixels: torch.Tensor, prompts: Sequence[str], path: Path, per_row: int, title: str = "") -> list[Path]:
    """Sample figures of ``pixels`` in [0, 1], by rank: images ``[N, C, H, W]`` -> a grid PNG at ``path``, one prompt
    per row; videos ``[N, C, F, H, W]`` -> an animated GIF grid at ``path`` with suffix ``.gif``
    (:func:`save_video_grid`) and a frame-strip PNG at ``path`` (:func:`save_frame_strip`). Returns the files."""
    if pixels.dim() == 5:
        gif = Path(path).with_suffix(".gif")
        save_video_grid(pixels, gif, per_row)
        save_frame_strip(pixels[::per_row] if pixels.shape[0] > per_row else pixels,
                         list(prompts)[::per_row] if pixels.shape[0] > per_row else prompts, path, title=title)
        return [gif, Path(path)]
    if pixels.dim() != 4:
        raise ValueError(f"save_grid: expected pixels [N, C, H, W] or [N, C, F, H, W], got {tuple(pixels.shape)}")
    plt = pyplot()
    n = pixels.shape[0]
    rows = math.ceil(n / per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 0.9, rows * 0.95), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = pixels[i].permute(1, 2, 0).float().numpy()
        gray = img.shape[-1] == 1
        ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1)
        if i % per_row == 0:
            ax.set_title(prompts[i], fontsize=5, loc="left")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [Path(path)]


def video_grid_frames(pixels: torch.Tensor, per_row: int, scale: int = 3, gap: int = 1) -> torch.Tensor:
    """The frames of a video grid as uint8 ``[F, rows * (H*scale + gap) - gap, per_row * (W*scale + gap) - gap,
    C]``: clip i of ``pixels [N, C, F, H, W]`` in [0, 1] at row ``i // per_row``, column ``i % per_row``, each
    pixel a ``scale x scale`` block, clips ``gap`` grey pixels apart (grey also fills unused cells)."""
    n, c, f, h, w = pixels.shape
    rows = math.ceil(n / per_row)
    ch, cw = h * scale + gap, w * scale + gap
    canvas = torch.full((f, rows * ch - gap, per_row * cw - gap, c), 0.5)  # [F, Hg, Wg, C]
    big = pixels.float().clamp(0, 1).repeat_interleave(scale, 3).repeat_interleave(scale, 4)  # [N, C, F, Hs, Ws]
    for i in range(n):
        r, col = divmod(i, per_row)
        canvas[:, r * ch:r * ch + h * scale, col * cw:col * cw + w * scale] = big[i].permute(1, 2, 3, 0)
    return (canvas * 255).round().to(torch.uint8)


def save_video_grid(pixels: torch.Tensor, path: Path, per_row: int, frame_ms: int = 150, scale: int = 3) -> None:
    """An animated GIF (looping, ``frame_ms`` per frame) of the clips ``[N, C, F, H, W]`` in [0, 1] on a grid of
    ``per_row`` columns (:func:`video_grid_frames`); grey for one channel, RGB for three."""
    from PIL import Image

    frames = video_grid_frames(pixels, per_row, scale).numpy()  # [F, Hg, Wg, C]
    images = [Image.fromarray(fr[..., 0] if fr.shape[-1] == 1 else fr) for fr in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def save_frame_strip(pixels: torch.Tensor, prompts: Sequence[str], path: Path, title: str = "",
                     max_clips: int = 16) -> None:
    """A PNG with one row per clip (the first ``max_clips`` of ``pixels [N, C, F, H, W]`` in [0, 1]), its frames left
    to right, titled with its prompt."""
    plt = pyplot()
    n, _, f = pixels.shape[:3]
    n = min(n, max_clips)
    fig, axes = plt.subplots(n, f, figsize=(f * 0.7, n * 0.8), dpi=100, squeeze=False)
    for i in range(n):
        for k in range(f):
            ax = axes[i][k]
            ax.axis("off")
            img = pixels[i, :, k].permute(1, 2, 0).float().numpy()
            gray = img.shape[-1] == 1
            ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=1)
        axes[i][0].set_title(prompts[i], fontsize=5, loc="left")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reward_curves(
    curves: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]], out_dir: Path, smooth: int
) -> list[Path]:
    """``curves_iteration.png`` and ``curves_wall.png`` of a comparison: one panel per objective, one line per
    scheme (mean over seeds, band = ± std).

    ``curves[scheme][reward name] = (y [seeds, n], wall [seeds, n])``: the already smoothed reward (trailing mean
    over ``smooth`` iterations, named in the title) and the wall seconds of each row.
    """
    plt = pyplot()
    reward_names = list(next(iter(curves.values())))
    paths = []
    wall_label = "training wall time after iteration 0 (s, mean over seeds)"
    for axis, label in (("iteration", "iteration"), ("wall", wall_label)):
        fig, axes = plt.subplots(1, len(reward_names), figsize=(4.2 * len(reward_names), 3.2), dpi=100, squeeze=False)
        for ax, name in zip(axes[0], reward_names, strict=True):
            for scheme, per_reward in curves.items():
                y, wall = per_reward[name]  # [seeds, n] each
                m = y.mean(0)  # [n]
                sd = y.std(0) if y.shape[0] > 1 else torch.zeros_like(m)  # [n]
                # wall time from the end of iteration 0: the eval before training and warm-up are left out
                x = torch.arange(m.shape[0]) if axis == "iteration" else (wall - wall[:, :1]).mean(0)  # [n]
                ax.plot(x, m, lw=1.3, label=scheme)
                ax.fill_between(x, m - sd, m + sd, alpha=0.15)
            ax.set_title(f"reward/{name}", fontsize=9)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"training reward (mean over seeds ± std, trailing mean over {smooth} iterations)", fontsize=9)
        fig.tight_layout()
        path = Path(out_dir) / f"curves_{axis}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_pareto(
    points: Mapping[str, torch.Tensor], names: Sequence[str], path: Path, base: torch.Tensor | None = None
) -> None:
    """A comparison's eval-time trade-off: one panel per pair of objectives, every run of each scheme as a dot
    (``points[scheme] [seeds, M]``, objectives ``names [M]``, all maximised), the scheme's mean as a cross, the
    base model (``base [M]``) as a star; the runs on the Pareto front of all runs are ringed."""
    from otca.stats import pareto_front

    plt = pyplot()
    M = len(names)
    pairs = [(i, j) for i in range(M) for j in range(i + 1, M)] or [(0, 0)]
    everything = torch.cat([p for p in points.values()]).double()  # [N, M]
    front = torch.as_tensor(pareto_front(everything.numpy()))  # [N]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), dpi=100, squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        for n, (scheme, p) in enumerate(points.items()):
            color = f"C{n % 10}"
            ax.scatter(p[:, i], p[:, j], s=18, color=color, alpha=0.7, label=scheme)
            ax.scatter(p[:, i].mean(), p[:, j].mean(), s=60, marker="x", color=color)
        ax.scatter(everything[front, i], everything[front, j], s=80, facecolors="none", edgecolors="k", lw=0.8)
        if base is not None:
            ax.scatter(base[i], base[j], s=90, marker="*", color="k", label="base")
        ax.set_xlabel(names[i], fontsize=8)
        ax.set_ylabel(names[j], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("eval-time trade-off (dots: runs, x: scheme mean, rings: Pareto front of all runs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_examples(
    dS: torch.Tensor, dR: torch.Tensor, r: torch.Tensor, prompts: Sequence[str], path: Path, examples: int = 6
) -> None:
    """The credit analysis's Fig. 6: ``dS [N, steps]`` and the z-scored reward gain ``dR [N, steps]`` against the
    step for ``examples`` trajectories evenly spaced through the N (so different prompts; not hand-picked),
    each titled with its prompt and per-trajectory correlation ``r [N]``, plus a scatter of every (dS, dR) pair."""
    plt = pyplot()
    n = min(examples, dS.shape[0])
    cols = 3
    rows = math.ceil((n + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=100, squeeze=False)
    steps = torch.arange(dS.shape[1])
    picks = torch.linspace(0, dS.shape[0] - 1, n).round().long().tolist()  # [n] trajectory indices
    for i, ax in enumerate(axes.flat):
        if i > n:
            ax.axis("off")
            continue
        if i == n:
            ax.scatter(dS.flatten(), dR.flatten(), s=4, alpha=0.4)
            ax.set_xlabel("dS (TCD similarity gain)")
            ax.set_ylabel("dR (z-scored reward gain)")
            ax.set_title(f"all {dS.shape[0]} trajectories", fontsize=8)
            continue
        j = picks[i]
        ax.plot(steps, dS[j], "o-", ms=3, color="tab:blue", label="dS")
        ax.set_ylabel("dS", color="tab:blue")
        twin = ax.twinx()
        twin.plot(steps, dR[j], "s--", ms=3, color="tab:orange", label="dR")
        twin.set_ylabel("dR (z-sum)", color="tab:orange")
        ax.set_xlabel("step k (0 = from noise)")
        ax.set_title(f"#{j} {prompts[j][:32]}  r={float(r[j]):.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
