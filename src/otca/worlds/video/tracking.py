"""Where the digit is in each frame, measured two independent ways, and each frame brought back to a digit image.

- :func:`centroid_track`: the ink centroid per frame and a least-squares constant-velocity fit to it. The training
  rewards use it (fast, differentiable in spirit, fooled by anything that moves ink mass).
- :func:`correlation_shifts`: the shift between consecutive frames that maximises their cross-correlation,
  refined to sub-pixel precision by a parabola through the peak and its neighbours (the classic block-matching
  estimate of optical flow, one block per frame). Only the eval judges use it, so a policy that learns to move the
  centroid without moving the digit is caught there.
- :func:`canonical_frames`: each frame resampled around its ink centroid at the scale of the digits world's
  16x16 images, so that world's shipped classifier (training reward) and judge (eval) can read it.

All take clips ``[B, 1, F, H, W]`` in [0, 1] on any device and compute on CPU in float32. Positions are in
pixels from the canvas centre, as (x, y) with x right and y down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from otca.worlds.video.data import DIGIT_SIZE

MAX_SHIFT = 3  # px, the block-matching search radius between consecutive frames (quick motion: 0.8 px/frame)


def as_clips(pixels: torch.Tensor, who: str) -> torch.Tensor:
    """``pixels [B, 1, F, H, W]`` on any device -> the same on CPU in float32; another rank or channel count is a
    one-line error naming ``who``."""
    if pixels.ndim != 5 or pixels.shape[1] != 1 or pixels.shape[2] < 2:
        raise ValueError(f"{who}: pixels must be clips [B, 1, F >= 2, H, W] in [0, 1], got shape "
                         f"{tuple(pixels.shape)}")
    return pixels.detach().to("cpu", torch.float32)


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates from the canvas centre: x ``[1, W]`` and y ``[H, 1]``."""
    x = torch.arange(w, dtype=torch.float32)[None, :] - (w - 1) / 2
    y = torch.arange(h, dtype=torch.float32)[:, None] - (h - 1) / 2
    return x, y


def centroids(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ink centroid ``[B, F, 2]`` (x, y) and ink mass ``[B, F]`` of ``clips [B, 1, F, H, W]``; an empty frame's
    centroid is the canvas centre."""
    x = clips[:, 0]  # [B, F, H, W]
    gx, gy = _grid(*x.shape[-2:])
    mass = x.sum(dim=(-2, -1))  # [B, F]
    m = mass + 1e-6
    cx = (x * gx).sum(dim=(-2, -1)) / m  # [B, F]
    cy = (x * gy).sum(dim=(-2, -1)) / m  # [B, F]
    return torch.stack([cx, cy], dim=-1), mass


def centroid_track(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares constant-velocity fit to the centroids: velocity ``[B, 2]`` px/frame (the slope of each
    coordinate over frame index) and residual ``[B, F, 2]`` (centroid minus the fitted line)."""
    c, _ = centroids(clips)  # [B, F, 2]
    f = torch.arange(c.shape[1], dtype=torch.float32) - (c.shape[1] - 1) / 2  # [F], centred
    velocity = (c * f[None, :, None]).sum(dim=1) / (f**2).sum()  # [B, 2]
    fitted = c.mean(dim=1, keepdim=True) + f[None, :, None] * velocity[:, None, :]  # [B, F, 2]
    return velocity, c - fitted


def correlation_shifts(clips: torch.Tensor, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Shift ``[B, F-1, 2]`` (x, y) px from each frame to the next: the integer shift s in ``[-max_shift,
    max_shift]^2`` maximising ``sum_p a(p) b(p + s)`` (zeros outside the canvas), plus a parabolic sub-pixel
    correction per axis, clipped to +-0.5 px. Frames without ink give shift 0."""
    x = clips[:, 0]  # [B, F, H, W]
    a, b = x[:, :-1], x[:, 1:]  # [B, F-1, H, W]
    bsz, n, h, w = a.shape
    r = max_shift
    bp = F.pad(b, (r, r, r, r))  # [B, F-1, H+2r, W+2r]
    scores = torch.stack([
        torch.stack([(a * bp[..., r + dy: r + dy + h, r + dx: r + dx + w]).sum(dim=(-2, -1))
                     for dx in range(-r, r + 1)], dim=-1)
        for dy in range(-r, r + 1)
    ], dim=-2)  # [B, F-1, 2r+1 (dy), 2r+1 (dx)]
    flat = scores.flatten(start_dim=-2).argmax(dim=-1)  # [B, F-1]
    iy, ix = flat // (2 * r + 1), flat % (2 * r + 1)  # [B, F-1] each

    def refine(line: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Vertex offset of the parabola through ``line[i-1], line[i], line[i+1]`` (0 at the border)."""
        lo, hi = (i - 1).clamp(min=0), (i + 1).clamp(max=2 * r)
        y0, y1, y2 = line.gather(-1, lo[..., None]), line.gather(-1, i[..., None]), line.gather(-1, hi[..., None])
        denom = y0 - 2 * y1 + y2
        off = torch.where(denom.abs() > 1e-9, 0.5 * (y0 - y2) / denom, torch.zeros_like(denom)).squeeze(-1)
        inside = (i > 0) & (i < 2 * r)
        return torch.where(inside, off.clamp(-0.5, 0.5), torch.zeros_like(off))

    row = scores.gather(-2, iy[..., None, None].expand(bsz, n, 1, 2 * r + 1)).squeeze(-2)  # [B, F-1, 2r+1]
    col = scores.gather(-1, ix[..., None, None].expand(bsz, n, 2 * r + 1, 1)).squeeze(-1)  # [B, F-1, 2r+1]
    sx = ix.float() - r + refine(row, ix)
    sy = iy.float() - r + refine(col, iy)
    empty = (a.sum(dim=(-2, -1)) < 1e-3) | (b.sum(dim=(-2, -1)) < 1e-3)  # [B, F-1]
    return torch.stack([sx, sy], dim=-1).masked_fill(empty[..., None], 0.0)  # [B, F-1, 2]


def shift_frames(frames: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Frames ``[N, 1, H, W]`` translated by ``shift [N, 2]`` px (x, y), bilinear, zeros entering."""
    n, _, h, w = frames.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -shift[:, 0] * 2 / w
    theta[:, 1, 2] = -shift[:, 1] * 2 / h
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def canonical_frames(clips: torch.Tensor, out_size: int = 16) -> torch.Tensor:
    """Every frame as a digits-world image ``[B*F, 1, out_size, out_size]``: the ``DIGIT_SIZE`` box around the
    frame's ink centroid resampled (bilinear, zeros outside) to fill the image, as the digits world's 8x8 -> 16x16
    upsampling fills it. Frame-major within each clip."""
    b, _, f, h, w = clips.shape
    c, _ = centroids(clips)  # [B, F, 2]
    frames = clips.transpose(1, 2).reshape(b * f, 1, h, w)  # [B*F, 1, H, W]
    theta = torch.zeros(b * f, 2, 3)
    theta[:, 0, 0] = DIGIT_SIZE / w
    theta[:, 1, 1] = DIGIT_SIZE / h
    theta[:, 0, 2] = c.reshape(-1, 2)[:, 0] * 2 / w
    theta[:, 1, 2] = c.reshape(-1, 2)[:, 1] * 2 / h
    grid = F.affine_grid(theta, [b * f, 1, out_size, out_size], align_corners=False)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0.0, 1.0)
