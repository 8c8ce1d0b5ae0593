"""Eval-only metrics of the digits world: what training never sees, so that hacking and collapse show.

- judge alignment / accuracy: the out-of-domain judge's reading of the prompted digit (a policy that fools the
  training classifier should not fool the judge as well);
- fidelity: a Fréchet distance between the judge's penultimate features of generated and real test digits;
- diversity: the mean pairwise pixel distance within each prompt group (mode collapse drives it to 0).

All take ``pixels [B, 1, 16, 16]`` in [0, 1] on any device.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from otca.worlds.digits.data import load_digit_images
from otca.worlds.digits.judges import as_digit_pixels, load_judge, prompted_digits, prompted_probability

# Generated samples per Fréchet distance (the estimate's bias depends on it): the default eval's 20 held-out
# prompts x 4 samples. Real train digits against the test stats give ~4 at 80 samples, ~0.9 at 1437.
FD_EVAL_SIZE = 80


def judge_alignment(pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The judge's ``p(prompted digit | pixels)``: ``[B]`` float32 on CPU."""
    return prompted_probability(load_judge(), pixels, prompts, "judge_alignment")


def judge_accuracy(pixels: torch.Tensor, prompts: Sequence[str]) -> float:
    """Share of samples whose most likely digit under the judge is the prompted one."""
    x = as_digit_pixels(pixels, "judge_accuracy")  # [B, 1, 16, 16]
    digits = prompted_digits(prompts, x.shape[0], "judge_accuracy")  # [B]
    with torch.no_grad():
        return (load_judge()(x).argmax(dim=-1) == digits).float().mean().item()


@dataclass(frozen=True)
class FeatureStats:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of judge features over ``n`` images."""

    mean: torch.Tensor
    cov: torch.Tensor
    n: int


def feature_stats(pixels: torch.Tensor) -> FeatureStats:
    """Judge penultimate-feature statistics of ``pixels [N, 1, 16, 16]`` (unbiased covariance; N >= 2)."""
    x = as_digit_pixels(pixels, "feature_stats")
    if x.shape[0] < 2:
        raise ValueError(f"feature_stats: needs at least 2 images for a covariance, got {x.shape[0]}")
    with torch.no_grad():
        f = load_judge().features(x).double()  # [N, D]
    return FeatureStats(mean=f.mean(dim=0), cov=torch.cov(f.T), n=f.shape[0])


@lru_cache(maxsize=1)
def real_test_stats() -> FeatureStats:
    """Judge-feature statistics of the 360 real test-split digits (computed once per process)."""
    return feature_stats(load_digit_images("test")[0])


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix ``[D, D]`` by eigendecomposition; tiny negative
    eigenvalues from round-off are clipped to 0."""
    vals, vecs = torch.linalg.eigh(a)  # [D], [D, D]
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T  # [D, D]


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Squared Fréchet (2-Wasserstein) distance between Gaussians (Dowson & Landau 1982; FID, Heusel et al.
    2017, Eq. 6): ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``.

    The symmetric form ``S_a^1/2 S_b S_a^1/2`` has the same trace root as FID's ``(S_a S_b)^1/2`` but stays
    symmetric PSD, so an eigendecomposition suffices."""
    root_a = _sqrtm_psd(a.cov)  # [D, D]
    cross = _sqrtm_psd(root_a @ b.cov @ root_a)  # [D, D]
    d = ((a.mean - b.mean) ** 2).sum() + a.cov.trace() + b.cov.trace() - 2 * cross.trace()
    return max(float(d), 0.0)


def fidelity_distance(pixels: torch.Tensor, real: torch.Tensor | FeatureStats | None = None) -> float:
    """Fréchet distance between the judge features of generated ``pixels [N, 1, 16, 16]`` and real digits:
    ``real`` as pixels, as precomputed :class:`FeatureStats`, or by default the cached real test split.

    The estimate is biased upwards by roughly ``O(D / N)`` (Chong & Forsyth 2020, "Effectively unbiased FID"):
    compare values only at equal N, which is why :func:`evaluate_digits` uses a fixed FD_EVAL_SIZE samples."""
    if real is None:
        real = real_test_stats()
    ref = real if isinstance(real, FeatureStats) else feature_stats(real)
    return frechet_distance(feature_stats(pixels), ref)


def group_diversity(pixels: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Mean pairwise L2 pixel distance within each group, averaged over groups with at least 2 members
    (0 for identical samples); ``pixels [B, ...]``, ``group_ids [B]``. NaN when no group has 2 members:
    diversity is then undefined, and 0 would read as collapse."""
    x = pixels.detach().to("cpu", torch.float64).flatten(start_dim=1)  # [B, P]
    ids = torch.as_tensor(group_ids).cpu()
    if ids.shape != (x.shape[0],):
        raise ValueError(f"group_diversity: group_ids must be [{x.shape[0]}], got {tuple(ids.shape)}")
    per_group = [torch.pdist(x[ids == g]).mean() for g in ids.unique() if int((ids == g).sum()) >= 2]
    if not per_group:
        return float("nan")
    return torch.stack(per_group).mean().item()


def evaluate_digits(pixels: torch.Tensor, prompts: Sequence[str], group_ids: torch.Tensor, *,
                    fd_size: int = FD_EVAL_SIZE) -> dict[str, float]:
    """Every eval metric under a stable name: ``eval/judge_alignment`` (mean), ``eval/judge_accuracy``,
    ``eval/diversity``, ``eval/fidelity_fd`` (against the real test split) and ``eval/fidelity_n``, the number
    of samples the distance used.

    The distance uses ``fd_size`` samples evenly spaced through the batch (so every prompt group is
    represented), which keeps it comparable between evals of any size >= fd_size. A smaller batch is used
    whole, with a warning: its distance is biased upwards and comparable only to others at the same N."""
    n = pixels.shape[0]
    if n < fd_size:
        warnings.warn(f"evaluate_digits: {n} samples < fd_size={fd_size}: eval/fidelity_fd is biased upwards "
                      f"and comparable only to distances from {n} samples", stacklevel=2)
    keep = torch.linspace(0, n - 1, min(n, fd_size)).round().long()  # [min(N, fd_size)], evenly spaced
    return {
        "eval/judge_alignment": judge_alignment(pixels, prompts).mean().item(),
        "eval/judge_accuracy": judge_accuracy(pixels, prompts),
        "eval/diversity": group_diversity(pixels, group_ids),
        "eval/fidelity_fd": fidelity_distance(pixels[keep.to(pixels.device)]),
        "eval/fidelity_n": float(len(keep)),
    }
