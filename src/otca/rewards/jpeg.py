"""JPEG compressibility: DDPO's weight-free reward (Black et al. 2023), for any image or video model.

Units: kilobytes (1 kB = 1000 bytes) of the image saved by Pillow as JPEG at quality 95 with Pillow's other
defaults, negated, so higher is better and a blank frame scores highest. A 16x16 grayscale digit costs about
0.4 kB, most of it the fixed JPEG header; GRPO normalises per group, so the offset does not matter. Byte counts
can change with the libjpeg build that Pillow ships: compare scores within one environment.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from pydantic import Field

from otca.rewards.options import WeightFreeOptions
from otca.rewards.registry import register_reward

CHANNELS = (1, 3)  # grayscale ('L') or RGB


def jpeg_kilobytes(frame: torch.Tensor, quality: int = 95) -> float:
    """Size in kB of one ``frame [C, H, W]`` (C = 1 or 3) in [0, 1], quantised to uint8 as DDPO does."""
    u8 = (frame * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, C]
    img = Image.fromarray(u8[:, :, 0] if u8.shape[2] == 1 else u8)  # Pillow infers 'L' or 'RGB' from the shape
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegOptions(WeightFreeOptions):
    quality: int = Field(default=95, ge=1, le=100)
    """JPEG quality Pillow saves at (DDPO: 95)."""


@register_reward("jpeg-compressibility", JpegOptions)
class JpegCompressibility:
    """``-(JPEG size in kB)`` per sample: ``[B, C, H, W]`` images, or ``[B, C, F, H, W]`` videos scored by the
    mean over their F frames; C = 1 (grayscale) or 3 (RGB). Returns ``[B]`` float32 on CPU."""

    name = "jpeg-compressibility"
    names: tuple[str, ...] = (name,)

    def __init__(self, options: JpegOptions = JpegOptions()):  # noqa: B008 (frozen: safe to share)
        self.quality = options.quality

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if pixels.ndim not in (4, 5) or pixels.shape[1] not in CHANNELS:
            raise ValueError(f"{self.name}: pixels must be [B, C, H, W] or [B, C, F, H, W] with C in (1, 3), "
                             f"got shape {tuple(pixels.shape)}")
        x = pixels.detach().to("cpu", torch.float32)
        videos = x if x.ndim == 5 else x.unsqueeze(2)  # [B, C, F, H, W], F = 1 for images
        sizes = [[jpeg_kilobytes(v[:, f], self.quality) for f in range(v.shape[1])] for v in videos]
        return -torch.tensor(sizes, dtype=torch.float32).mean(dim=1)  # [B]
