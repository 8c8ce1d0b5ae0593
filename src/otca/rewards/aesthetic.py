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

from otca.rewards._common import (
    CropPrep,
    ImageModelReward,
    crop_prep_from_processor,
    linear_chain,
    load_checkpoint,
    per_frame,
    require_file,
    seeded,
    tensor_dict,
    tiny_backbone,
    torch_dtype,
)
from otca.rewards.clip import TINY_CLIP_SIDE, image_embeds, load_clip_model, tiny_clip
from otca.rewards.registry import register_reward


class LaionAesthetic(ImageModelReward):
    """``[B, 3, H, W]`` in [0, 1] -> ``[B]`` float32 aesthetic scores (prompts ignored)."""

    def __init__(self, name: str, clip_model, prep: CropPrep, head: torch.nn.Module, batch_size: int):
        super().__init__(name, clip_model, prep, batch_size)
        self.model = clip_model
        self.head = head.to(self.device)  # fp32: it is tiny and the reference runs it in fp32

    def score(self, x: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        # x: [b, 3, 224, 224]
        return self.head(image_embeds(self.model, x)).squeeze(-1)  # [b, D] unit rows -> [b]


def tiny_laion_aesthetic(name: str, seed: int, device: str, dtype: str, batch_size: int) -> LaionAesthetic:
    """The test/demo twin: the tiny random CLIP of ``clip-t`` (same seed, same backbone) and a random
    Linear 16-8-1 head, the v2 head's activation-free structure at tiny width. Its scores mean nothing."""
    model, _ = tiny_clip(seed, "quick_gelu", str(torch.device(device)), torch_dtype(name, dtype))
    width = model.config.projection_dim
    head = seeded(seed, lambda: torch.nn.Sequential(torch.nn.Linear(width, 8), torch.nn.Linear(8, 1)))
    prep = CropPrep(shortest_edge=TINY_CLIP_SIDE, crop=(TINY_CLIP_SIDE, TINY_CLIP_SIDE), rounding="half-even")
    return LaionAesthetic(name, model, prep, head.eval().requires_grad_(False), batch_size)


@register_reward("laion-aesthetic")
def laion_aesthetic(
    path: str | None = None,
    clip_path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 16,
    tiny: bool = False,
    seed: int = 0,
    frames: bool = False,
):
    """``path``: the v2 head (``sac+logos+ava1-l14-linearMSE.pth`` state dict, or the same keys as
    .safetensors). ``clip_path``: a local transformers CLIP ViT-L/14 directory (openai/clip-vit-large-patch14),
    whose preprocessor_config.json gives the preprocessing; shared with ``clip-t`` when both use it.
    ``tiny``: a random tiny CLIP and head built in-process (seeded; a test/demo twin, its scores mean nothing).
    ``frames``: also score videos, as the mean over frames (VBench's aesthetic quality)."""
    name = "laion-aesthetic"
    if tiny_backbone(name, tiny, path=path, clip_path=clip_path):
        return per_frame(tiny_laion_aesthetic(name, seed, device, dtype, batch_size), frames)
    head_file = require_file(name, path, "path", "aesthetic head file")
    head = linear_chain(name, head_file, tensor_dict(name, head_file, load_checkpoint(name, head_file)), "")
    model = load_clip_model(name, clip_path, "clip_path", device, torch_dtype(name, dtype))
    if head[0].in_features != model.config.projection_dim:
        raise ValueError(
            f"reward '{name}': head '{head_file}' takes {head[0].in_features}-d embeddings but the CLIP in "
            f"'{clip_path}' projects to {model.config.projection_dim} (expected ViT-L/14, 768)"
        )
    # The predictor's reference is clip.load's torchvision preprocess (CenterCrop rounds half to even)
    prep = dataclasses.replace(crop_prep_from_processor(name, clip_path, "clip_path"), rounding="half-even")
    return per_frame(LaionAesthetic(name, model, prep, head, batch_size), frames)
