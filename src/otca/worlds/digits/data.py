"""scikit-learn's bundled handwritten digits (no download), brought to 16x16 in [0, 1]."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16


@lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # ships inside scikit-learn

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0), torch.tensor(d.target, dtype=torch.long)


def load_digit_images(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 16, 16]`` in [0, 1] and labels ``[N]``.

    ``split``: 'all' (1797 images), 'train' (the first 80% of a fixed permutation) or 'test' (the rest).
    """
    return take_split(*_load(), split, "digits")


def take_split(x: torch.Tensor, y: torch.Tensor, split: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the rows of ``x [N, ...]`` and ``y [N]`` in ``split``: 'all', 'train' (the first 80% of a
    permutation seeded 0) or 'test' (the rest). Every world that draws on the digits uses this one split, so no
    test digit is trained on anywhere; ``what`` names the caller in the error."""
    if split == "all":
        return x.clone(), y.clone()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(y))
    idx = {"train": perm[:n_train], "test": perm[n_train:]}.get(split)
    if idx is None:
        raise ValueError(f"{what} split '{split}': expected 'all', 'train' or 'test'")
    return x[idx].clone(), y[idx].clone()
