"""What the video world provides, registered on import: model kind ``video-wan``, prompt set ``video``
(``video:train``, ``video:eval``, ``video:all``), eval suite ``video``, the multi-objective reward ``video-align``
(``[B, 3]``: visual quality, motion quality, text alignment) and the pretrainer ``video``.

The core finds this module through the ``otca.worlds`` entry point in pyproject.toml (see :mod:`otca.registry`);
heavy modules are imported only when a registered entry is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import otca.worlds.video.rewards  # noqa: F401  (registers video-align)
from otca.evaluate import register_eval_suite, register_prompt_set
from otca.models.base import FlowPolicy
from otca.models.registry import register_policy
from otca.pretraining import register_pretrainer
from otca.worlds.video.prompts import all_prompts

if TYPE_CHECKING:
    from otca.config import ModelConfig

register_prompt_set("video")(all_prompts)


@register_policy("video-wan")
def _video_wan(cfg: ModelConfig, device: torch.device) -> FlowPolicy:
    """The tiny Wan behind the real Wan adapter (:func:`otca.worlds.video.policy.build_video_wan`)."""
    from otca.worlds.video.policy import build_video_wan

    return build_video_wan(cfg, device)  # type: ignore[return-value]


@register_eval_suite("video")
def _video_suite(pixels: torch.Tensor, prompts: Sequence[str], group_ids: torch.Tensor) -> dict[str, float]:
    """The video world's eval-only metrics (:func:`otca.worlds.video.metrics.evaluate_video`)."""
    from otca.worlds.video.metrics import evaluate_video

    return evaluate_video(pixels, list(prompts), group_ids)


@register_pretrainer("video")
def _pretrain_video(out_dir: Path, seed: int) -> list[dict[str, Any]]:
    """The tiny Wan and its text encoder from scratch (:func:`otca.worlds.video.pretrain.pretrain_video_generator`,
    its default steps: with ``seed`` 0 and one thread, the shipped weights)."""
    from otca.worlds.video.pretrain import pretrain_video_generator

    return [pretrain_video_generator(out_dir, seed=seed)]
