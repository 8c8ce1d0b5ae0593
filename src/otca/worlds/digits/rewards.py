"""The digits world's training rewards, shaped like the paper's CLIP-T and aesthetic scores.

- ``digit-alignment`` (the CLIP-T analogue): the shipped classifier's probability of the prompted digit.
- ``stroke-quality`` (the aesthetic analogue): a hand-made score of how clean a stroke image looks.

With ``jpeg-compressibility`` (:mod:`otca.rewards.jpeg`) they partly conflict: compressibility prefers blank
frames, stroke quality prefers a clean centred mass of ink whether or not it is a digit (a thick blob scores
higher than a real digit), and alignment prefers whatever the classifier reads as the prompted digit.
Every reward reads ``[B, 1, 16, 16]`` pixels in [0, 1] on any device and returns ``[B]`` float32 on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from otca.rewards.options import WeightFreeOptions
from otca.rewards.registry import register_reward
from otca.worlds.digits.judges import ASSETS_DIR, as_digit_pixels, load_classifier, prompted_probability

INK_BAND = (0.15, 0.45)  # mean ink of real digits is 0.22-0.42 on the test split; the band adds a margin
INK_FALLOFF = 0.15  # ink_balance falls linearly to 0 this far outside the band
SPECKLE_SCALE = 0.03  # real digits' speckle is ~0.005 (smoothness ~0.84), uniform noise's ~0.16
CENTRE_SIGMA = 2.0  # pixels; real digits' centroids sit ~1 px from the centre


class DigitAlignmentOptions(WeightFreeOptions):
    assets_dir: str | None = None
    """A folder written by ``train_judges`` holding the classifier (default: the shipped weights)."""


@register_reward("digit-alignment", DigitAlignmentOptions)
class DigitAlignment:
    """``p(prompted digit | pixels)`` under the shipped classifier, in [0, 1]. An unknown prompt raises
    :class:`~otca.worlds.digits.prompts.UnknownPromptError` (the step fails loudly)."""

    name = "digit-alignment"
    names: tuple[str, ...] = (name,)

    def __init__(self, options: DigitAlignmentOptions):
        self.model = load_classifier(Path(options.assets_dir) if options.assets_dir else ASSETS_DIR)

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return prompted_probability(self.model, pixels, prompts, self.name)  # [B]


def crispness(x: torch.Tensor) -> torch.Tensor:
    """``(1 - mean 4x(1-x))^2``: 1 when every pixel is 0 or 1, 0 when all are 0.5; ``[B, 1, H, W]`` -> ``[B]``.

    Squared so that blur (which greys the stroke edges) costs more than the speckle term pays for it."""
    return (1 - (4 * x * (1 - x)).mean(dim=(1, 2, 3))) ** 2  # [B]


def median3(x: torch.Tensor) -> torch.Tensor:
    """3x3 median filter with replicate padding; ``[B, 1, H, W]`` -> same."""
    patches = F.pad(x, (1, 1, 1, 1), mode="replicate").unfold(2, 3, 1).unfold(3, 3, 1)  # [B, 1, H, W, 3, 3]
    return patches.flatten(start_dim=-2).median(dim=-1).values  # [B, 1, H, W]


def smoothness(x: torch.Tensor) -> torch.Tensor:
    """``exp(-speckle / SPECKLE_SCALE)`` with ``speckle = sum (x - median3(x))^2 / sum x``: the energy a 3x3
    median removes (isolated pixels, salt-and-pepper) per unit of ink. A median keeps straight edges and
    strokes, so a crisp digit is not penalised for its edges the way total variation would; ``[B]``."""
    speckle = ((x - median3(x)) ** 2).sum(dim=(1, 2, 3)) / (x.sum(dim=(1, 2, 3)) + 1e-6)  # [B]
    return torch.exp(-speckle / SPECKLE_SCALE)


def ink_balance(x: torch.Tensor) -> torch.Tensor:
    """1 when the mean pixel value lies in INK_BAND, falling linearly to 0 at INK_FALLOFF outside it: empty
    and filled frames score 0; ``[B, 1, H, W]`` -> ``[B]``."""
    ink = x.mean(dim=(1, 2, 3))  # [B]
    lo, hi = INK_BAND
    outside = (lo - ink).clamp_min(0) + (ink - hi).clamp_min(0)  # [B]
    return (1 - outside / INK_FALLOFF).clamp_min(0)


def centring(x: torch.Tensor) -> torch.Tensor:
    """``exp(-d^2 / (2 CENTRE_SIGMA^2))`` with d the distance in pixels from the ink's centroid to the image
    centre; an empty frame counts as centred; ``[B, 1, H, W]`` -> ``[B]``."""
    h, w = x.shape[-2:]
    mass = x[:, 0] + 1e-6  # [B, H, W]; the epsilon puts an empty frame's centroid at the centre
    rows = torch.arange(h, dtype=x.dtype)[:, None] - (h - 1) / 2  # [H, 1]
    cols = torch.arange(w, dtype=x.dtype)[None, :] - (w - 1) / 2  # [1, W]
    total = mass.sum(dim=(1, 2))  # [B]
    dy, dx = (mass * rows).sum(dim=(1, 2)) / total, (mass * cols).sum(dim=(1, 2)) / total  # [B], [B]
    return torch.exp(-(dy**2 + dx**2) / (2 * CENTRE_SIGMA**2))


def stroke_quality(x: torch.Tensor) -> torch.Tensor:
    """``crispness * smoothness * ink_balance * centring``, each in [0, 1], so each is a necessary condition;
    ``x [B, 1, H, W]`` in [0, 1] -> ``[B]`` in [0, 1].

    Real test digits score ~0.24 on average, Gaussian-blurred ones ~0.18 (sigma 1 px) and ~0.14 (1.5 px),
    uniform noise ~0.0005, empty and full frames 0; a crisp centred disk with the right amount of ink scores 1
    (the score's intended loophole)."""
    return crispness(x) * smoothness(x) * ink_balance(x) * centring(x)  # [B]


@register_reward("stroke-quality", WeightFreeOptions)
class StrokeQuality:
    """How clean and well-formed the stroke image looks, in [0, 1], ignoring the prompt: see
    :func:`stroke_quality` for the formula."""

    name = "stroke-quality"
    names: tuple[str, ...] = (name,)

    def __init__(self, options: WeightFreeOptions = WeightFreeOptions()):  # noqa: B008 (frozen: safe to share)
        """No options: the formula is fixed."""

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return stroke_quality(as_digit_pixels(pixels, self.name))  # [B]
