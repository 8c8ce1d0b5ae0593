"""The video world's three training rewards, VideoAlign's visual quality, motion quality and text alignment in
miniature. Each maps clips ``[B, 1, F, H, W]`` in [0, 1] (any device) and prompts to ``[B]`` float32 on CPU in
[0, 1]; :func:`video_rewards` returns all three as ``[B, 3]`` (VideoAlign's multi-objective output).

- visual quality (VQ): per-frame stroke clarity, averaged over frames: crisp ink (pixels near 0 or 1), no
  speckle, the right amount of ink, and the digit near the centre of the frame. It ignores the prompt and motion,
  and its centring term pays a still digit more than a quickly moving one: VQ and TA conflict, and a static crisp
  blob is VQ's loophole (the eval judges' dynamic degree and direction accuracy catch it).
- motion quality (MQ): a plausible, steady motion of one object: the centroid moves along a straight line at
  constant speed, the ink mass stays constant (no flicker or popping), and the shipped digit classifier reads the
  same digit in every frame (identity kept). A still clip also scores well: MQ does not ask for motion.
- text alignment (TA): the right digit (the digits world's shipped classifier on each frame, brought to its
  scale by :func:`~otca.worlds.video.tracking.canonical_frames`) times the right motion (the centroid track's
  displacement over the clip against the prompted direction and speed).

The rewards' recogniser (the digits world's CNN classifier) and tracker (centroids) are not those of the eval
judges (the digits world's MLP judge, block-matching shifts): see :mod:`otca.worlds.video.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from otca.rewards.options import WeightFreeOptions
from otca.rewards.registry import register_reward
from otca.worlds.digits.judges import ASSETS_DIR, load_classifier
from otca.worlds.digits.rewards import crispness, median3
from otca.worlds.video.data import SPEED_PX, UNIT
from otca.worlds.video.prompts import Motion, prompt_motion
from otca.worlds.video.tracking import as_clips, canonical_frames, centroid_track, centroids

INK_BAND = (0.07, 0.19)  # mean ink per frame of real clips is 0.086-0.163 on the test split; the band adds a margin
INK_FALLOFF = 0.07  # ink_balance falls linearly to 0 this far outside the band
SPECKLE_SCALE = 0.15  # real frames' speckle (3x3-median residual energy per unit ink) is ~0.044
CENTRE_SIGMA = 3.0  # px; a quick clip's first and last frames sit 2.8 px from the centre (VQ 0.65x there)
TRACK_SCALE = 1.0  # px; real clips' rms distance of the centroid from its fitted line is < 0.08 px, generated ~0.4
INK_CV_SCALE = 0.15  # real clips' coefficient of variation of ink mass over frames is < 0.03, generated ~0.08
MOTION_SIGMA = 1.4  # px on the displacement over the clip: half of the slow track's 2.8 px
REWARD_NAMES = ("video-visual-quality", "video-motion-quality", "video-text-alignment")


def prompted_motions(prompts: Sequence[str], batch: int, who: str) -> list[Motion]:
    """The motion each prompt asks for; a count other than ``batch`` is a one-line error and an unknown prompt
    raises :class:`~otca.worlds.video.prompts.UnknownPromptError`."""
    if len(prompts) != batch:
        raise ValueError(f"{who}: got {len(prompts)} prompts for {batch} clips")
    return [prompt_motion(p) for p in prompts]


def _frames(clips: torch.Tensor) -> torch.Tensor:
    """``[B, 1, F, H, W]`` -> ``[B*F, 1, H, W]``, frame-major within each clip."""
    b, c, f, h, w = clips.shape
    return clips.transpose(1, 2).reshape(b * f, c, h, w)


def frame_clarity(x: torch.Tensor) -> torch.Tensor:
    """Per-frame visual quality ``[N]`` in [0, 1] of frames ``x [N, 1, H, W]``: ``crispness^2 * exp(-speckle /
    SPECKLE_SCALE) * ink_balance * centring`` (each factor a necessary condition).

    crispness is the digits world's ``(1 - mean 4x(1-x))^2`` (squared again here: the small digits' thin strokes
    make blur cheaper than at 16x16); speckle is the energy a 3x3 median removes per unit of ink."""
    speckle = ((x - median3(x)) ** 2).sum(dim=(1, 2, 3)) / (x.sum(dim=(1, 2, 3)) + 1e-6)  # [N]
    ink = x.mean(dim=(1, 2, 3))  # [N]
    lo, hi = INK_BAND
    balance = (1 - ((lo - ink).clamp_min(0) + (ink - hi).clamp_min(0)) / INK_FALLOFF).clamp_min(0)  # [N]
    c, _ = centroids(x[:, :, None])  # [N, 1, 2]
    centring = torch.exp(-(c[:, 0] ** 2).sum(dim=-1) / (2 * CENTRE_SIGMA**2))  # [N]
    return crispness(x) ** 2 * torch.exp(-speckle / SPECKLE_SCALE) * balance * centring


def visual_quality(pixels: torch.Tensor) -> torch.Tensor:
    """VQ ``[B]``: the mean over frames of :func:`frame_clarity`."""
    clips = as_clips(pixels, "video visual quality")
    b, _, f = clips.shape[:3]
    return frame_clarity(_frames(clips)).reshape(b, f).mean(dim=1)


@torch.no_grad()
def _frame_probs(clips: torch.Tensor, assets_dir: Path) -> torch.Tensor:
    """The shipped digits classifier's distribution per frame ``[B, F, 10]``."""
    b, _, f = clips.shape[:3]
    logits: torch.Tensor = load_classifier(assets_dir)(canonical_frames(clips))  # [B*F, 10]
    return logits.softmax(dim=-1).reshape(b, f, -1)


def motion_quality(pixels: torch.Tensor, assets_dir: Path = ASSETS_DIR) -> torch.Tensor:
    """MQ ``[B]``: ``exp(-(rms track residual / TRACK_SCALE)^2) * exp(-ink cv / INK_CV_SCALE) * identity *
    presence``. identity is the mean over frames of ``p_f(k*)``, the classifier's probability that frame f shows
    the clip's digit ``k* = argmax_k mean_f p_f(k)`` (one confident digit throughout); presence is
    ``min(1, mean ink / INK_BAND[0])`` (an empty clip moves nothing, smoothly)."""
    clips = as_clips(pixels, "video motion quality")
    _, residual = centroid_track(clips)  # [B, F, 2]
    rms = residual.pow(2).sum(dim=-1).mean(dim=1).sqrt()  # [B]
    _, mass = centroids(clips)  # [B, F]
    cv = mass.std(dim=1) / (mass.mean(dim=1) + 1e-6)  # [B]
    p = _frame_probs(clips, assets_dir)  # [B, F, 10]
    k = p.mean(dim=1).argmax(dim=-1)  # [B] the clip's digit
    identity = p.gather(2, k[:, None, None].expand(*p.shape[:2], 1)).squeeze(2).mean(dim=1)  # [B]
    presence = (clips.mean(dim=(1, 2, 3, 4)) / INK_BAND[0]).clamp(max=1.0)  # [B]
    out: torch.Tensor = torch.exp(-((rms / TRACK_SCALE) ** 2)) * torch.exp(-cv / INK_CV_SCALE) * identity * presence
    return out


def target_displacement(motions: Sequence[Motion], frames: int) -> torch.Tensor:
    """The displacement ``[B, 2]`` px over a clip of ``frames`` frames that each motion asks for."""
    speed = torch.tensor([SPEED_PX[m.speed] for m in motions])  # [B]
    return UNIT[torch.tensor([m.direction for m in motions], dtype=torch.long)] * speed[:, None] * (frames - 1)


def text_alignment(pixels: torch.Tensor, prompts: Sequence[str], assets_dir: Path = ASSETS_DIR) -> torch.Tensor:
    """TA ``[B]``: ``mean_f p_f(prompted digit) * exp(-|d - d*|^2 / (2 MOTION_SIGMA^2))`` with d the centroid
    track's displacement over the clip (fitted velocity times F - 1) and d* the prompted one."""
    clips = as_clips(pixels, "video text alignment")
    b, _, f = clips.shape[:3]
    motions = prompted_motions(prompts, b, "video text alignment")
    digits = torch.tensor([m.digit for m in motions], dtype=torch.long)  # [B]
    p = _frame_probs(clips, assets_dir)  # [B, F, 10]
    p_digit = p.gather(2, digits[:, None, None].expand(b, f, 1)).squeeze(2).mean(dim=1)  # [B]
    velocity, _ = centroid_track(clips)  # [B, 2]
    miss = velocity * (f - 1) - target_displacement(motions, f)  # [B, 2]
    return p_digit * torch.exp(-miss.pow(2).sum(dim=-1) / (2 * MOTION_SIGMA**2))


def video_rewards(pixels: torch.Tensor, prompts: Sequence[str], assets_dir: Path = ASSETS_DIR) -> torch.Tensor:
    """``[B, 3]`` float32: VQ, MQ and TA in the order of REWARD_NAMES."""
    return torch.stack([visual_quality(pixels), motion_quality(pixels, assets_dir),
                        text_alignment(pixels, prompts, assets_dir)], dim=1)


class VideoReward:
    """One of the three rewards as a ``Reward`` (``name``, ``__call__(pixels, prompts) -> [B]``); ``which`` is one
    of REWARD_NAMES. ``assets_dir``: where the digits classifier lives (default: the shipped one)."""

    def __init__(self, which: str, assets_dir: str | None = None):
        if which not in REWARD_NAMES:
            raise ValueError(f"video reward {which!r}: expected one of {', '.join(REWARD_NAMES)}")
        self.name = which
        self.names = (which,)
        self.assets_dir = Path(assets_dir) if assets_dir else ASSETS_DIR

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if self.name == REWARD_NAMES[0]:
            return visual_quality(pixels)
        if self.name == REWARD_NAMES[1]:
            return motion_quality(pixels, self.assets_dir)
        return text_alignment(pixels, prompts, self.assets_dir)


class VideoAlignOptions(WeightFreeOptions):
    """Options of ``video-align``: its formulas are fixed; only the digit classifier's folder can change."""

    assets_dir: str | None = None
    """A folder written by the digits world's ``train_judges`` holding the classifier (default: the shipped one)."""


class VideoAlignRewards:
    """The three rewards as one multi-objective reward: ``__call__(pixels, prompts) -> [B, 3]`` (VQ, MQ, TA), the
    columns named by REWARD_NAMES. Registered as ``video-align`` (VideoAlign's one model, three scores)."""

    name = "video-align"
    names: tuple[str, ...] = REWARD_NAMES
    objectives = REWARD_NAMES

    def __init__(self, assets_dir: str | None = None):
        self.assets_dir = Path(assets_dir) if assets_dir else ASSETS_DIR

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return video_rewards(pixels, prompts, self.assets_dir)


@register_reward("video-align", VideoAlignOptions)
def build_video_align(options: VideoAlignOptions) -> VideoAlignRewards:
    """The registered factory of ``video-align``."""
    return VideoAlignRewards(options.assets_dir)
