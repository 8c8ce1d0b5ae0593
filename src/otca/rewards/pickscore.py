"""PickScore (Kirstain et al. 2023); registers ``pickscore``.

``score = exp(logit_scale) * cos(E_img(x), E_txt(p))`` with the PickScore_v1 CLIP-H model, as in the
official inference snippet (yuvalkirstain/PickScore README): about 100 * cos, typically 18-24 (OTCA Table 1:
22.66 for FLUX). No /26 rescaling (Flow-GRPO) and no softmax over candidates: GRPO's per-group
normalization makes both unnecessary, and the raw value is what papers report.
"""

from __future__ import annotations

from otca.rewards.clip import register_clip_similarity

register_clip_similarity(
    "pickscore",
    use_logit_scale=True,
    doc="""PickScore_v1.

    ``path``: a local snapshot of yuvalkirstain/PickScore_v1 (a transformers CLIP directory).
    ``processor_path``: where the tokenizer and preprocessor_config.json live; the official code uses
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor (same BPE, 224 px bicubic, center crop, OpenAI
    statistics). Defaults to ``path``, which works when the snapshot carries those files too. ``tiny``: a
    random tiny CLIP built in-process (seeded by ``seed``; a test/demo twin, its scores mean nothing).
    ``frames``: also score videos, as the mean over frames.
    """,
)
