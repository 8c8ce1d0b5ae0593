"""Moving-digit clips rendered from scikit-learn's bundled handwritten digits (no download).

A clip is ``FRAMES`` frames of ``CANVAS x CANVAS`` pixels in [0, 1], layout ``[C=1, F, H, W]``. Each frame samples
the bilinear surface of one 8x8 digit, scaled to ``DIGIT_SIZE`` pixels, at a sub-pixel position that moves at a
constant velocity: ``SPEED_PX[speed]`` pixels per frame along the direction (right = +x, down = +y, image
coordinates). The track is centred on the canvas along the motion (the quick track then spans the free margin),
with a random offset across it, and along it where the slow track leaves room. Sampling the continuous surface
(rather than shifting an already resampled image) keeps the stroke equally sharp in every frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from otca.worlds.digits.data import take_split
from otca.worlds.video.prompts import DIRECTIONS, SPEEDS, Motion, phrasings

CANVAS = 16
DIGIT_SIZE = 10
FRAMES = 8
SOURCE_SIZE = 8  # scikit-learn's digits are 8x8
SPEED_PX = (0.4, 0.8)  # pixels per frame for SPEEDS ("slow", "quick"): 2.8 and 5.6 px over the clip
UNIT = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # DIRECTIONS as (dx, dy): [4, 2]
MARGIN = (CANVAS - DIGIT_SIZE) / 2 - 0.2  # px the digit's box centre may move from the canvas centre
ACROSS_JITTER = 1.0  # px, the largest random offset across the motion


@lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # ships inside scikit-learn

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    return x, torch.tensor(d.target, dtype=torch.long)


def load_source_digits(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 digits ``[N, 1, 8, 8]`` in [0, 1] and labels ``[N]``; the splits are the digits world's (the first
    80% of a permutation seeded 0 for 'train', the rest for 'test'), so no test digit is ever trained on."""
    return take_split(*_load(), split, "video digits")


def track_centres(direction: torch.Tensor, speed: torch.Tensor, offset: torch.Tensor, frames: int = FRAMES
                  ) -> torch.Tensor:
    """Box centres in px from the canvas centre, ``[N, F, 2]`` as (x, y): ``offset + (f - (F-1)/2) * v * u``
    for frame f, speed v = SPEED_PX[speed] and unit direction u; ``direction, speed [N]`` long, ``offset [N, 2]``."""
    v = torch.tensor(SPEED_PX)[speed]  # [N]
    u = UNIT[direction]  # [N, 2]
    f = torch.arange(frames, dtype=torch.float32) - (frames - 1) / 2  # [F]
    return offset[:, None, :] + f[None, :, None] * (v[:, None, None] * u[:, None, :])  # [N, F, 2]


def render_clips(digits: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Clips ``[N, 1, F, CANVAS, CANVAS]`` of 8x8 digits ``[N, 1, 8, 8]`` whose DIGIT_SIZE box is centred at
    ``centres [N, F, 2]`` (px from the canvas centre, x right, y down).

    Output pixel p (normalised coordinate ``(p + 0.5) / CANVAS * 2 - 1``) reads the source at
    ``(p_px - centre) / DIGIT_SIZE * 2`` in the source's normalised frame (grid_sample, align_corners=False,
    zeros outside the digit)."""
    n, f = centres.shape[:2]
    scale = CANVAS / DIGIT_SIZE  # canvas units per source unit
    theta = torch.zeros(n * f, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = -centres.reshape(n * f, 2) * 2 / DIGIT_SIZE  # the shift in source-normalised units
    grid = F.affine_grid(theta, [n * f, 1, CANVAS, CANVAS], align_corners=False)  # [N*F, H, W, 2]
    src = digits.repeat_interleave(f, dim=0)  # [N*F, 1, 8, 8]
    frames = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return frames.reshape(n, f, 1, CANVAS, CANVAS).transpose(1, 2).clamp(0.0, 1.0)  # [N, 1, F, H, W]


@dataclass(frozen=True)
class ClipBatch:
    """Rendered clips ``[N, 1, F, H, W]`` with what they show: digit, direction and speed ``[N]`` long."""

    clips: torch.Tensor
    digit: torch.Tensor
    direction: torch.Tensor
    speed: torch.Tensor

    def motions(self) -> list[Motion]:
        return [Motion(int(d), int(k), int(s)) for d, k, s in zip(self.digit, self.direction, self.speed,
                                                                   strict=True)]

    def prompts(self, generator: torch.Generator, split: str = "all") -> list[str]:
        """A random phrasing (from ``split``) of each clip's motion."""
        by_motion = phrasings(split)
        pick = torch.randint(0, 1 << 30, (len(self.digit),), generator=generator)  # [N]
        return [by_motion[m][int(k) % len(by_motion[m])] for m, k in zip(self.motions(), pick, strict=True)]


def random_offsets(direction: torch.Tensor, speed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Track offsets ``[N, 2]`` px: uniform in +-ACROSS_JITTER across the motion and in whatever room the track
    leaves along it (none for the quick track); ``direction, speed [N]`` long."""
    u = UNIT[direction]  # [N, 2]
    across = torch.stack([u[:, 1], u[:, 0]], dim=1).abs()  # [N, 2] the axis across the motion
    along_room = (MARGIN - (FRAMES - 1) / 2 * torch.tensor(SPEED_PX)[speed]).clamp_min(0)  # [N] px
    r = torch.rand(len(direction), 2, generator=generator) * 2 - 1  # [N, 2] uniform in [-1, 1]
    return across * (r[:, :1] * ACROSS_JITTER) + u.abs() * (r[:, 1:] * along_room[:, None])  # [N, 2]


def sample_clips(n: int, generator: torch.Generator, split: str = "train") -> ClipBatch:
    """``n`` random clips of ``split``'s digits: a random digit image, direction, speed and track offset each,
    all drawn from ``generator`` (same generator state, same clips)."""
    x, y = load_source_digits(split)
    idx = torch.randint(0, len(y), (n,), generator=generator)  # [N]
    direction = torch.randint(0, len(DIRECTIONS), (n,), generator=generator)  # [N]
    speed = torch.randint(0, len(SPEEDS), (n,), generator=generator)  # [N]
    offset = random_offsets(direction, speed, generator)  # [N, 2]
    return ClipBatch(render_clips(x[idx], track_centres(direction, speed, offset)), y[idx], direction, speed)


def clips_for(motions: list[Motion], generator: torch.Generator, split: str = "test") -> ClipBatch:
    """One real clip per requested motion: a random ``split`` image of its digit, the requested direction and
    speed and a random offset (the reference "real moving digits" of the eval metrics)."""
    x, y = load_source_digits(split)
    digit = torch.tensor([m.digit for m in motions], dtype=torch.long)  # [N]
    direction = torch.tensor([m.direction for m in motions], dtype=torch.long)  # [N]
    speed = torch.tensor([m.speed for m in motions], dtype=torch.long)  # [N]
    pools = [(y == d).nonzero().squeeze(1) for d in range(10)]
    idx = torch.stack([pools[int(d)][torch.randint(0, len(pools[int(d)]), (1,), generator=generator)[0]]
                       for d in digit])  # [N]
    offset = random_offsets(direction, speed, generator)  # [N, 2]
    return ClipBatch(render_clips(x[idx], track_centres(direction, speed, offset)), digit, direction, speed)
