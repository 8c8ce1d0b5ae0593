"""Videos as Qwen2-VL sees them: frame sampling, resizing to the patch grid, and patches.

Reproduced from KwaiVGI/VideoAlign at 219ab9d, vision_process.py (``fetch_video`` / ``smart_nframes`` /
``smart_resize``, after Qwen2-VL's qwen-vl-utils): ``nframes`` from the video length, its fps and the target
fps (or a fixed frame count), uniform ``linspace(...).round()`` indices, bicubic antialiased resize of uint8
frames to multiples of 28 with a bounded pixel count; then the Qwen2-VL image processor's patch layout
(temporal patch 2, patch 14, 2x2 merge groups contiguous).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# vision_process.py constants that VideoAlign's model_config.json does not carry.
VIDEO_MIN_PIXELS = 128 * 28 * 28
_FRAME_FACTOR = 2
_FPS_MIN_FRAMES = 4
_FPS_MAX_FRAMES = 768
_MAX_RATIO = 200


def round_by_factor(x: float, factor: int) -> int:
    return round(x / factor) * factor


def ceil_by_factor(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def floor_by_factor(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Frame size with both sides multiples of ``factor`` and area in [min_pixels, max_pixels], aspect kept
    as well as possible (vision_process.py ``smart_resize``)."""
    if max(h, w) / min(h, w) > _MAX_RATIO:
        raise ValueError(f"videoalign: aspect ratio {max(h, w) / min(h, w):.1f} exceeds {_MAX_RATIO}")
    hb, wb = max(factor, round_by_factor(h, factor)), max(factor, round_by_factor(w, factor))
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = floor_by_factor(h / beta, factor), floor_by_factor(w / beta, factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = ceil_by_factor(h * beta, factor), ceil_by_factor(w * beta, factor)
    return hb, wb


def smart_nframes(total: int, video_fps: float, fps: float | None, num_frames: int | None) -> int:
    """Frames fed to the model (vision_process.py ``smart_nframes``): ``num_frames`` rounded to even, or
    ``total / video_fps * fps`` clamped to [4, min(768, total)] and rounded to even; at most ``total``."""
    if num_frames is not None:
        n = round_by_factor(num_frames, _FRAME_FACTOR)
    elif fps is None:
        raise ValueError("smart_nframes: give num_frames or fps")
    else:
        lo = ceil_by_factor(_FPS_MIN_FRAMES, _FRAME_FACTOR)
        hi = floor_by_factor(min(_FPS_MAX_FRAMES, total), _FRAME_FACTOR)
        n = round_by_factor(min(max(total / video_fps * fps, lo), hi), _FRAME_FACTOR)
    n = min(n, total)
    if not _FRAME_FACTOR <= n <= total:
        raise ValueError(f"videoalign: {n} frames to sample from a {total}-frame video, need 2..{total}")
    return n


def frame_indices(total: int, n: int) -> list[int]:
    """Uniform sampling: ``linspace(0, total - 1, n).round()``."""
    return torch.linspace(0, total - 1, n).round().long().tolist()


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[T, 3, H, W]`` in [0, 1] -> ``[T, 3, *size]`` in [0, 1] on uint8 levels.

    The reference decodes uint8 frames and resizes them with torchvision (bicubic, antialias), which
    computes in float and rounds back to uint8: both roundings are kept.
    """
    x = (frames * 255).round()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).round().clamp(0, 255)
    return x / 255


def patchify(frames: torch.Tensor, temporal: int, patch: int, merge: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Qwen2-VL patches of normalized frames ``[T, C, H, W]`` -> ``([gt*gh*gw, C*temporal*patch*patch],
    (gt, gh, gw))``; the last frame is repeated up to a multiple of ``temporal``, and patches are ordered
    so that each 2x2 merge group is contiguous (transformers' Qwen2-VL image processor layout)."""
    t, c, h, w = frames.shape
    if t % temporal:
        frames = torch.cat([frames, frames[-1:].expand(temporal - t % temporal, -1, -1, -1)])
    gt, gh, gw = frames.shape[0] // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, temporal, p, p]
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)
