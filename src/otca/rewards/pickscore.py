"""PickScore (Kirstain et al. 2023); registers ``pickscore``.

``score = exp(logit_scale) * cos(E_img(x), E_txt(p))`` with the PickScore_v1 CLIP-H model, as in the
official inference snippet (yuvalkirstain/PickScore README): about 100 * cos, typically 18-24 (OTCA Table 1:
22.66 for FLUX). No /26 rescaling (Flow-GRPO) and no softmax over candidates: GRPO's per-group
normalization makes both unnecessary, and the raw value is what papers report.
"""

from __future__ import annotations

from otca.rewards._common import per_frame
from otca.rewards.clip import hf_clip_similarity
from otca.rewards.registry import register_reward


@register_reward("pickscore")
def pickscore(
    path: str | None = None,
    processor_path: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 16,
    tiny: bool = False,
    seed: int = 0,
    frames: bool = False,
):
    """PickScore_v1.

    ``path``: a local snapshot of yuvalkirstain/PickScore_v1 (a transformers CLIP directory).
    ``processor_path``: where the tokenizer and preprocessor_config.json live; the official code uses
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor (same BPE, 224 px bicubic, center crop, OpenAI
    statistics). Defaults to ``path``, which works when the snapshot carries those files too. ``tiny``: a
    random tiny CLIP built in-process (seeded by ``seed``; a test/demo twin, its scores mean nothing).
    ``frames``: also score videos, as the mean over frames.
    """
    return per_frame(
        hf_clip_similarity("pickscore", path, processor_path, True, device, dtype, batch_size, tiny, seed), frames
    )
