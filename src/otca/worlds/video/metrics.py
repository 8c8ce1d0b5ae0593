"""Eval-only metrics of the video world, VBench's dimensions in miniature, computed by judges that training
never sees: the digits world's MLP judge (the rewards ask its CNN classifier) and block-matching shifts between
frames (the rewards track centroids). Reward hacking and collapse show here: a still, crisp clip that
maximises visual quality scores ~0 dynamic degree and fails direction accuracy.

- ``eval/subject_consistency``: mean cosine similarity of the judge's features of each frame to the first and to
  the previous frame (VBench's subject consistency with DINO features, Huang et al. 2024, Sec. 3.2).
- ``eval/motion_smoothness``: how well each inner frame is predicted by interpolating its neighbours along the
  measured shift (VBench's frame-interpolation test): ``1 - E|pred - frame| / E|frame|``, clipped to [0, 1].
- ``eval/dynamic_degree``: the share of clips whose measured path length exceeds DYNAMIC_THRESHOLD px
  (VBench: the share of videos with large optical flow).
- ``eval/temporal_flicker``: ``1 - E|shift(prev) - frame| / E|frame|``, the change between consecutive frames
  that the measured motion does not explain, clipped to [0, 1] (higher = less flicker, as VBench reports it).
- ``eval/digit_accuracy``: the judge's most likely digit (mean log-probability over frames) is the prompted one.
- ``eval/direction_accuracy``, ``eval/speed_accuracy``: the measured displacement points the prompted way
  (a still clip counts as wrong), and its length is nearer the prompted speed's than the other's.
- ``eval/fvd``: a Fréchet distance between clip features (judge features averaged over frames, and the
  per-frame shifts) of generated clips and real test-split clips (FVD's analogue, Unterthiner et al. 2018).
- ``eval/diversity``: mean pairwise pixel distance within each prompt group (mode collapse drives it to 0).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache

import torch

from otca.worlds.digits.judges import load_judge
from otca.worlds.digits.metrics import FeatureStats, frechet_distance, group_diversity
from otca.worlds.video.data import FRAMES, SPEED_PX, UNIT, sample_clips
from otca.worlds.video.rewards import prompted_motions
from otca.worlds.video.tracking import as_clips, canonical_frames, correlation_shifts, shift_frames

DYNAMIC_THRESHOLD = 1.0  # px of path length over the clip; the slow track moves 2.8 px
SHIFT_FEATURE_SCALE = 4.0  # per-frame shifts (px) are scaled to the judge features' spread in the FVD features
FD_EVAL_SIZE = 80  # generated clips per Fréchet distance (compare values only at equal N)
FD_REFERENCE_SIZE = 720  # real test-split clips of the reference statistics


@torch.no_grad()
def _judge(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The judge's log-probabilities ``[B, F, 10]`` and features ``[B, F, D]`` of every canonical frame."""
    b, _, f = clips.shape[:3]
    judge = load_judge()
    feats = judge.features(canonical_frames(clips))  # [B*F, D]
    return judge.head(feats).log_softmax(dim=-1).reshape(b, f, -1), feats.reshape(b, f, -1)


def subject_consistency(pixels: torch.Tensor) -> torch.Tensor:
    """``[B]``: mean over frames f >= 1 of ``(cos(h_0, h_f) + cos(h_{f-1}, h_f)) / 2`` on the judge's features."""
    _, h = _judge(as_clips(pixels, "subject_consistency"))  # [B, F, D]
    h = torch.nn.functional.normalize(h, dim=-1)
    first = (h[:, :1] * h[:, 1:]).sum(dim=-1)  # [B, F-1]
    prev = (h[:, :-1] * h[:, 1:]).sum(dim=-1)  # [B, F-1]
    return ((first + prev) / 2).mean(dim=1)


def _relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - sum|pred - target| / sum|target|`` per clip, clipped to [0, 1]; inputs ``[B, n, H, W]``."""
    err = (pred - target).abs().sum(dim=(1, 2, 3)) / (target.abs().sum(dim=(1, 2, 3)) + 1e-6)  # [B]
    return (1 - err).clamp(0, 1)


def motion_smoothness(pixels: torch.Tensor) -> torch.Tensor:
    """``[B]``: frame f predicted as the mean of frame f-1 moved by half the measured shift from f-1 to f+1 and
    frame f+1 moved back by the other half, scored by :func:`_relative_error` over the inner frames."""
    clips = as_clips(pixels, "motion_smoothness")
    x = clips[:, 0]  # [B, F, H, W]
    b, f, h, w = x.shape
    s = correlation_shifts(clips)  # [B, F-1, 2]
    half = (s[:, :-1] + s[:, 1:]) / 2  # [B, F-2, 2] half the shift from f-1 to f+1
    before = shift_frames(x[:, :-2].reshape(-1, 1, h, w), half.reshape(-1, 2))  # [B*(F-2), 1, H, W]
    after = shift_frames(x[:, 2:].reshape(-1, 1, h, w), -half.reshape(-1, 2))
    pred = ((before + after) / 2).reshape(b, f - 2, h, w)
    return _relative_error(pred, x[:, 1:-1])


def temporal_flicker(pixels: torch.Tensor) -> torch.Tensor:
    """``[B]``: each frame f >= 1 predicted as frame f-1 moved by the measured shift, scored by
    :func:`_relative_error` (1 = every change between frames is explained by motion)."""
    clips = as_clips(pixels, "temporal_flicker")
    x = clips[:, 0]  # [B, F, H, W]
    b, f, h, w = x.shape
    s = correlation_shifts(clips)  # [B, F-1, 2]
    pred = shift_frames(x[:, :-1].reshape(-1, 1, h, w), s.reshape(-1, 2)).reshape(b, f - 1, h, w)
    return _relative_error(pred, x[:, 1:])


def measured_motion(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-matching displacement over the clip ``[B, 2]`` (the sum of the shifts) and path length ``[B]``."""
    s = correlation_shifts(as_clips(pixels, "measured_motion"))  # [B, F-1, 2]
    return s.sum(dim=1), s.norm(dim=-1).sum(dim=1)


def dynamic(pixels: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: the clip's measured path length exceeds DYNAMIC_THRESHOLD px."""
    moving: torch.Tensor = measured_motion(pixels)[1] > DYNAMIC_THRESHOLD
    return moving


def judged_direction(pixels: torch.Tensor) -> torch.Tensor:
    """``[B]`` long: the index into DIRECTIONS the measured displacement points to most, or -1 for a still clip
    (path length <= DYNAMIC_THRESHOLD)."""
    disp, path = measured_motion(pixels)
    k = (disp @ UNIT.T).argmax(dim=-1)  # [B]
    return torch.where(path > DYNAMIC_THRESHOLD, k, torch.full_like(k, -1))


def judged_speed(pixels: torch.Tensor) -> torch.Tensor:
    """``[B]`` long: 1 (quick) when the measured displacement's length is nearer the quick track's than the slow
    one's, else 0."""
    disp, _ = measured_motion(pixels)
    frames = pixels.shape[2]
    slow, quick = (v * (frames - 1) for v in SPEED_PX)
    quick_: torch.Tensor = disp.norm(dim=-1) > (slow + quick) / 2
    return quick_.long()


def judged_digit(pixels: torch.Tensor) -> torch.Tensor:
    """``[B]`` long: the judge's digit with the highest mean log-probability over frames."""
    logp, _ = _judge(as_clips(pixels, "judged_digit"))
    return logp.mean(dim=1).argmax(dim=-1)


def clip_features(pixels: torch.Tensor) -> torch.Tensor:
    """FVD-analogue features ``[B, D + 2(F-1)]``: the judge's features averaged over frames, and the per-frame
    shifts times SHIFT_FEATURE_SCALE (appearance and motion)."""
    clips = as_clips(pixels, "clip_features")
    _, h = _judge(clips)  # [B, F, D]
    return torch.cat([h.mean(dim=1), correlation_shifts(clips).flatten(start_dim=1) * SHIFT_FEATURE_SCALE], dim=1)


def feature_stats(pixels: torch.Tensor) -> FeatureStats:
    """Mean and (unbiased) covariance in float64 of :func:`clip_features` over ``N >= 2`` clips."""
    if pixels.shape[0] < 2:
        raise ValueError(f"feature_stats: needs at least 2 clips for a covariance, got {pixels.shape[0]}")
    f = clip_features(pixels).double()  # [N, D']
    return FeatureStats(mean=f.mean(dim=0), cov=torch.cov(f.T), n=f.shape[0])


@lru_cache(maxsize=1)
def real_test_stats() -> FeatureStats:
    """Feature statistics of FD_REFERENCE_SIZE real clips of test-split digits (fixed seed; once per process)."""
    return feature_stats(sample_clips(FD_REFERENCE_SIZE, torch.Generator().manual_seed(12345), "test").clips)


def fvd(pixels: torch.Tensor, real: FeatureStats | None = None) -> float:
    """Fréchet distance between the clip features of ``pixels [N, 1, F, H, W]`` and real clips (default: the
    cached test-split reference); biased upwards by ~O(D/N), so compare only at equal N."""
    return frechet_distance(feature_stats(pixels), real if real is not None else real_test_stats())


def evaluate_video(pixels: torch.Tensor, prompts: Sequence[str], group_ids: torch.Tensor, *,
                   fd_size: int = FD_EVAL_SIZE) -> dict[str, float]:
    """Every eval metric of the module docstring under its stable name, plus ``eval/fvd_n`` (the clips the
    distance used: ``fd_size`` evenly spaced through the batch, or all of a smaller batch, with a warning)."""
    clips = as_clips(pixels, "evaluate_video")
    n, frames = clips.shape[0], clips.shape[2]
    if frames != FRAMES:
        raise ValueError(f"evaluate_video: expected clips of {FRAMES} frames, got {frames}")
    motions = prompted_motions(prompts, n, "evaluate_video")
    digit = torch.tensor([m.digit for m in motions])
    direction = torch.tensor([m.direction for m in motions])
    speed = torch.tensor([m.speed for m in motions])
    if n < fd_size:
        warnings.warn(f"evaluate_video: {n} clips < fd_size={fd_size}: eval/fvd is biased upwards and comparable "
                      f"only to distances from {n} clips", stacklevel=2)
    keep = torch.linspace(0, n - 1, min(n, fd_size)).round().long()
    return {
        "eval/subject_consistency": subject_consistency(clips).mean().item(),
        "eval/motion_smoothness": motion_smoothness(clips).mean().item(),
        "eval/dynamic_degree": dynamic(clips).float().mean().item(),
        "eval/temporal_flicker": temporal_flicker(clips).mean().item(),
        "eval/digit_accuracy": (judged_digit(clips) == digit).float().mean().item(),
        "eval/direction_accuracy": (judged_direction(clips) == direction).float().mean().item(),
        "eval/speed_accuracy": (judged_speed(clips) == speed).float().mean().item(),
        "eval/fvd": fvd(clips[keep]) if len(keep) >= 2 else float("nan"),
        "eval/fvd_n": float(len(keep)),
        "eval/diversity": group_diversity(clips, group_ids),
    }
