"""LAION aesthetic predictor v2 ("improved aesthetic predictor"); registers ``laion-aesthetic``.

``score = MLP(E_img(x) / |E_img(x)|)`` on the projected CLIP ViT-L/14 image embedding, 1-10 scale
(christophschuhmann/improved-aesthetic-predictor, simple_inference.py; generated images score about 5-7,
OTCA Table 1: 6.25 for FLUX). The head ``sac+logos+ava1-l14-linearMSE.pth`` is Linear 768-1024-128-64-16-1
with dropouts and no activations. The prompt is not used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from otca.rewards.clip import image_embeds, load_clip_model
from otca.rewards.heads import linear_chain
from otca.rewards.loading import load_checkpoint, require_file, tensor_dict, tiny_backbone, torch_dtype
from otca.rewards.options import RewardOptions
from otca.rewards.preprocess import CropPrep, crop_prep_from_processor
from otca.rewards.registry import register_reward
from otca.rewards.scorer import ImageModelReward, per_frame


class LaionAesthetic(ImageModelReward):
    """``[B, 3, H, W]`` in [0, 1] -> ``[B]`` float32 aesthetic scores (prompts ignored)."""

    def __init__(self, name: str, clip_model, prep: CropPrep, head: torch.nn.Module, batch_size: int):
        super().__init__(name, clip_model, prep, batch_size)
        self.model = clip_model
        self.head = head.to(self.device)  # fp32: it is tiny and the reference runs it in fp32

    def score(self, x: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        # x: [b, 3, 224, 224]
        return self.head(image_embeds(self.model, x)).squeeze(-1)  # [b, D] unit rows -> [b]


class LaionAestheticOptions(RewardOptions):
    path: str | None = None
    """The v2 head: ``sac+logos+ava1-l14-linearMSE.pth`` (a state dict), or the same keys as .safetensors."""
    clip_path: str | None = None
    """A local transformers CLIP ViT-L/14 directory (openai/clip-vit-large-patch14); its
    preprocessor_config.json gives the preprocessing. Shared with ``clip-t`` when both use it."""


@register_reward("laion-aesthetic", LaionAestheticOptions)
def laion_aesthetic(o: LaionAestheticOptions):
    """The LAION aesthetic predictor v2 on CLIP ViT-L/14 image embeddings. ``tiny``: the tiny random CLIP of
    ``clip-t`` (same seed, same backbone) and a random Linear 16-8-1 head, built in-process (a test/demo twin,
    its scores mean nothing). ``frames``: also score videos, as the mean over frames (VBench's aesthetic
    quality)."""
    name = "laion-aesthetic"
    dtype = torch_dtype(name, o.dtype)
    if tiny_backbone(name, o.tiny, path=o.path, clip_path=o.clip_path):
        from otca.testing.rewards import TINY_CLIP_SIDE, tiny_aesthetic_head, tiny_clip

        model, _ = tiny_clip(o.seed, "quick_gelu", str(torch.device(o.device)), dtype)
        head = tiny_aesthetic_head(o.seed, model.config.projection_dim)
        prep = CropPrep(shortest_edge=TINY_CLIP_SIDE, crop=(TINY_CLIP_SIDE, TINY_CLIP_SIDE), rounding="half-even")
        return per_frame(LaionAesthetic(name, model, prep, head, o.batch_size), o.frames)
    head_file = require_file(name, o.path, "path", "aesthetic head file")
    head = linear_chain(name, head_file, tensor_dict(name, head_file, load_checkpoint(name, head_file)), "")
    model = load_clip_model(name, o.clip_path, "clip_path", o.device, dtype)
    if head[0].in_features != model.config.projection_dim:
        raise ValueError(
            f"reward '{name}': head '{head_file}' takes {head[0].in_features}-d embeddings but the CLIP in "
            f"'{o.clip_path}' projects to {model.config.projection_dim} (expected ViT-L/14, 768)"
        )
    # The predictor's reference is clip.load's torchvision preprocess (CenterCrop rounds half to even)
    prep = dataclasses.replace(crop_prep_from_processor(name, o.clip_path, "clip_path"), rounding="half-even")
    return per_frame(LaionAesthetic(name, model, prep, head, o.batch_size), o.frames)
