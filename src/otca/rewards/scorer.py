"""How the image rewards score a batch: :class:`ImageModelReward` (checked input, chunks of ``batch_size``,
eval without gradients) and :class:`FrameMean` (an image reward over the frames of videos, ``options.frames``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from otca.rewards.loading import positive_int
from otca.rewards.preprocess import check_images, check_videos


class FrameMean:
    """An image reward applied to videos: ``[B, C, F, H, W]`` -> the mean over the F frames of the per-frame
    scores ``[B]`` float32, each frame scored with its video's prompt. Images ``[B, C, H, W]`` pass through.

    This is how VBench scores videos with image models (aesthetic and imaging quality: per-frame mean) and
    how CLIPSIM measures video-text alignment; it ignores motion, which only a video model can judge.
    """

    def __init__(self, reward: Any):
        self.reward = reward
        self.name = reward.name
        self.names = (reward.name,)  # one objective: the per-frame scores are [B*F]

    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if pixels.ndim != 5:
            return self.reward(pixels, prompts)
        x = check_videos(self.name, pixels, prompts)  # [B, 3, F, H, W]
        b, c, f, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * f, c, h, w)  # [B*F, 3, H, W], video-major
        scores = self.reward(frames, [p for p in prompts for _ in range(f)])  # [B*F]
        return scores.view(b, f).mean(dim=1)  # [B]


def per_frame(reward: Any, frames: bool) -> Any:
    """``reward``, wrapped in :class:`FrameMean` when ``frames`` (the rewards' ``frames`` option)."""
    return FrameMean(reward) if frames else reward


class ImageModelReward:
    """Base of the image rewards that run a model: ``(pixels [B, C, H, W] in [0, 1], prompts) -> [B]`` float32 on
    CPU, the input checked (:func:`check_images`), ``batch_size`` samples at a time, in eval without gradients.

    Each chunk is preprocessed by ``prep`` in fp32 on the model's device, cast to the model's dtype (both read
    from ``model``'s parameters), and scored by the subclass's :meth:`score`.
    """

    def __init__(
        self, name: str, model: torch.nn.Module, prep: Callable[[torch.Tensor], torch.Tensor], batch_size: int
    ):
        self.name = name
        self.names = (name,)
        self.prep = prep
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.batch_size = positive_int(name, "batch_size", batch_size)

    def score(self, x: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores ``[b]`` of preprocessed pixels ``x [b, 3, S, S]`` (model device and dtype) and their prompts."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x, n = check_images(self.name, pixels, prompts), self.batch_size
        out = [self._chunk(x[i : i + n], list(prompts[i : i + n])) for i in range(0, x.shape[0], n)]
        return torch.cat(out)  # [B]

    def _chunk(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = self.prep(pixels.to(self.device)).to(self.dtype)  # [b, 3, S, S]; fp32 preprocessing
        return self.score(x, prompts).float().cpu()  # [b]
