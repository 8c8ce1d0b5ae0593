"""Reward inputs as the reference pipelines see them: pixel checks and the CLIP-family preprocessing.

Preprocessing works on ``[B, 3, H, W]`` float tensors in [0, 1] with torch ops only (differentiable, any
device), reproducing the reference PIL/torchvision pipelines up to resampling round-off.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from otca.rewards.crop import CropRounding, crop_offset
from otca.rewards.loading import require_dir

# OpenAI CLIP pixel statistics: CLIP, HPS, PickScore, the LAION aesthetic head and ImageReward all use them.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resample codes as stored in transformers' preprocessor_config.json -> torch interpolate modes.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


# ------------------------------------------------------------------------------------------------- input checks


def _check_pixels(reward: str, pixels: torch.Tensor, prompts: Sequence[str], layout: str) -> torch.Tensor:
    """Validated float32 RGB pixels in [0, 1] of the given layout; one channel is repeated (PIL's L -> RGB)."""
    kind = "images" if layout == "[B, C, H, W]" else "videos"
    if pixels.ndim != len(layout.split(",")) or pixels.shape[1] not in (1, 3):
        raise ValueError(f"reward '{reward}': expects {kind} {layout} with C in (1, 3), got {tuple(pixels.shape)}")
    if len(prompts) != pixels.shape[0]:
        raise ValueError(f"reward '{reward}': {pixels.shape[0]} {kind} but {len(prompts)} prompts")
    x = pixels.detach().to(torch.float32)
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:  # a [-1, 1] tensor passed by mistake would silently score garbage
        raise ValueError(f"reward '{reward}': pixels must lie in [0, 1], got range [{lo:.3f}, {hi:.3f}]")
    return x.clamp(0, 1).expand(-1, 3, *pixels.shape[2:])


def check_images(reward: str, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Validated float32 RGB images ``[B, 3, H, W]`` in [0, 1]."""
    return _check_pixels(reward, pixels, prompts, "[B, C, H, W]")


def check_videos(reward: str, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Validated float32 RGB videos ``[B, 3, F, H, W]`` in [0, 1]."""
    return _check_pixels(reward, pixels, prompts, "[B, C, F, H, W]")


# ---------------------------------------------------------------------------------------------- preprocessing


def _resize(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Antialiased resize ``[B, C, H, W] -> [B, C, *size]``: torch's antialiased kernels follow PIL's (a=-0.5)."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels, size=size, mode=mode, antialias=True, align_corners=False)


def shortest_edge_size(h: int, w: int, short: int) -> tuple[int, int]:
    """Output (h, w) when the short side becomes ``short``: the long side is truncated, as in transformers'
    ``get_resize_output_image_size`` and torchvision's ``Resize(int)``."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def center_crop(pixels: torch.Tensor, crop: tuple[int, int], rounding: CropRounding = "floor") -> torch.Tensor:
    """Center crop ``[B, C, H, W] -> [B, C, *crop]``; an odd margin rounds as ``rounding`` says
    (:func:`~otca.rewards.crop.crop_offset`: "floor" = transformers, "half-even" = torchvision's CenterCrop)."""
    h, w = pixels.shape[-2:]
    ch, cw = crop
    if ch > h or cw > w:
        raise ValueError(f"center_crop: crop {crop} larger than image {(h, w)}")
    top, left = crop_offset(h, ch, rounding), crop_offset(w, cw, rounding)
    return pixels[..., top : top + ch, left : left + cw]


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` on ``[B, 3, H, W]``."""
    m = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - m) / s


@dataclass(frozen=True)
class CropPrep:
    """CLIP-style preprocessing: resize the shortest edge, center crop, normalize.

    The tensor twin of transformers' ``CLIPImageProcessor`` (``rounding="floor"``) and of torchvision's
    ``Resize(n, bicubic) + CenterCrop(n) + Normalize`` (``rounding="half-even"``) used by ImageReward and the
    LAION aesthetic predictor: the two place the crop of an odd margin differently (:mod:`otca.rewards.crop`).
    The reference pipelines resample uint8 PIL images, so values agree to ~1/255 before normalization.
    """

    shortest_edge: int
    crop: tuple[int, int]
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    mode: str = "bicubic"
    rounding: CropRounding = "floor"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, *crop]`` normalized."""
        size = shortest_edge_size(pixels.shape[-2], pixels.shape[-1], self.shortest_edge)
        x = _resize(pixels, size, self.mode).clamp(0, 1)  # PIL saturates to uint8: bicubic overshoot is cut
        return normalize(center_crop(x, self.crop, self.rounding), self.mean, self.std)


@dataclass(frozen=True)
class LetterboxPrep:
    """HPS-style preprocessing: resize the *longest* edge to ``size``, pad the rest with 0 (black), normalize.

    The tensor twin of HPSv2's ``ResizeMaxSize(size, bicubic, fill=0)`` (hpsv2/src/open_clip/transform.py),
    which runs on tensors after ``ToTensor``: new side = round(side * size / max(H, W)), padding split
    floor/ceil (left/top get the floor), no crop, and no clamping of the bicubic overshoot.
    """

    size: int
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    mode: str = "bicubic"
    rounding: CropRounding = "floor"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, size, size]`` normalized."""
        h, w = pixels.shape[-2:]
        scale = self.size / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        x = _resize(pixels, (nh, nw), self.mode)
        ph, pw = self.size - nh, self.size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)  # [B, 3, size, size]
        return normalize(x, self.mean, self.std)


def _size_field(reward: str, path: Path, cfg: dict, field: str, keys: Sequence[str]) -> tuple[int, ...]:
    v = cfg.get(field)
    if isinstance(v, int):
        return (v,) * len(keys)
    if isinstance(v, dict) and all(k in v for k in keys):
        return tuple(int(v[k]) for k in keys)
    raise ValueError(f"reward '{reward}': '{path}' field '{field}'={v!r}, expected an int or a dict with {list(keys)}")


def crop_prep_from_processor(reward: str, directory: str | Path | None, option: str) -> CropPrep:
    """A :class:`CropPrep` from a transformers ``preprocessor_config.json`` (CLIP image processor format).

    Only the CLIP pipeline (resize shortest edge, center crop, rescale 1/255, normalize) is supported; any
    other flag setting is an error rather than a silently different preprocessing.
    """
    path = require_dir(reward, directory, option, "processor directory", needs=("preprocessor_config.json",))
    path = path / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    for flag in ("do_resize", "do_center_crop", "do_normalize"):
        if not cfg.get(flag, True):
            raise ValueError(f"reward '{reward}': '{path}' sets {flag}=false; only the CLIP pipeline is supported")
    resample = cfg.get("resample", 3)
    if resample not in _RESAMPLE:
        raise ValueError(f"reward '{reward}': '{path}' resample={resample}, expected one of {sorted(_RESAMPLE)}")
    (short,) = _size_field(reward, path, cfg, "size", ("shortest_edge",))
    crop = _size_field(reward, path, cfg, "crop_size", ("height", "width"))
    return CropPrep(
        shortest_edge=short,
        crop=(crop[0], crop[1]),
        mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
        mode=_RESAMPLE[resample],
    )
