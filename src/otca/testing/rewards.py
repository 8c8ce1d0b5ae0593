"""Tiny random backbones of the reward models, built in-process from configs (no files): what a reward's
``options.tiny: true`` scores with, and what the tests build from.

Each keeps the architecture of the real reward model (towers, pooling, head structure) at width 32, random and
seeded without touching the global RNG; their scores mean nothing. Cached per argument set, so two rewards that
share a real backbone (``clip-t`` and ``laion-aesthetic``) share its twin too. This module depends on torch and
transformers only (imported inside the functions); the rewards import it, never the other way round.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, cast

import torch

from otca.testing.models import byte_alphabet, tiny_clip_tokenizer

# Image side of the tiny random CLIP (patch 8: a 4x4 grid) and of the tiny BLIP ViT.
TINY_CLIP_SIDE = 32
TINY_BLIP_SIDE = 32
# Qwen2-VL's turn and vision markup (its tokenizer's special tokens).
QWEN2VL_MARKUP = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
# A chat template written for otca in Qwen2-VL's turn markup: one video slot, then the text.
TINY_QWEN2VL_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@lru_cache(maxsize=4)
def tiny_clip(seed: int, hidden_act: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """``(CLIPModel, tokenizer)``: a random tiny CLIP (eval, no grad) and the byte-level tiny CLIP tokenizer.

    CLIP's structure (two towers, projections, EOT pooling, logit scale) at width 32, 32 px images.
    ``hidden_act``: quick_gelu for OpenAI CLIP, gelu for open_clip ViT-H (HPS).
    """
    import transformers as tf

    tok = tiny_clip_tokenizer()
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 hidden_act=hidden_act)
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=tok.model_max_length, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1, **tower),
        vision_config=dict(image_size=TINY_CLIP_SIDE, patch_size=8, **tower),
        projection_dim=16,
    )
    model = _seeded(seed, lambda: tf.CLIPModel(cfg))
    return model.to(device, dtype).eval().requires_grad_(False), tok


def tiny_aesthetic_head(seed: int, width: int) -> torch.nn.Sequential:
    """A random Linear ``width``-8-1 head: the LAION v2 head's activation-free structure at tiny width (fp32)."""
    layers = (torch.nn.Linear, (width, 8)), (torch.nn.Linear, (8, 1))
    head: torch.nn.Sequential = _seeded(seed, lambda: torch.nn.Sequential(*(cls(*a) for cls, a in layers)))
    head.eval().requires_grad_(False)
    return head


def tiny_bert_tokenizer() -> Any:
    """A lower-casing WordPiece over ASCII letters, digits and punctuation (word-initial and ``##`` forms, so
    no text is unknown), BERT's five special tokens first."""
    from transformers import BertTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def tiny_blip(seed: int, device: str, dtype: torch.dtype, max_text_len: int, tokenizer: Any) -> tuple[Any, Any, Any]:
    """``(vision, text, head)``: ImageReward's structure (a BLIP ViT whose tokens a cross-attending BERT reads,
    an activation-free head on the [CLS] state) at width 32, random and seeded; ``tokenizer`` sets the
    vocabulary and special ids. Towers in eval without grad on ``device``/``dtype``, the head in fp32."""
    import transformers as tf

    # initializer_range: BlipVisionConfig's default (1e-10) would make every image look the same
    vcfg = tf.BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=TINY_BLIP_SIDE, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu",
                               initializer_range=0.02)
    tcfg = tf.BlipTextConfig(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=max_text_len,
                             layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.sep_token_id,
                             sep_token_id=tokenizer.sep_token_id, is_decoder=True)
    vision, text, head = _seeded(seed, lambda: (
        tf.BlipVisionModel(vcfg), tf.BlipTextModel(tcfg, add_pooling_layer=False),
        torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Linear(8, 1)),
    ))
    return (vision.to(device, dtype).eval().requires_grad_(False),
            text.to(device, dtype).eval().requires_grad_(False),
            head.eval().requires_grad_(False))


@lru_cache(maxsize=2)
def tiny_qwen2vl_reward(
    seed: int, device: str, dtype: torch.dtype, reward_tokens: Sequence[str]
) -> tuple[Any, Any, Any]:
    """``(model, head, tokenizer)``: a random Qwen2-VL (2 decoder layers of width 32, a 2-block vision tower with
    14 px patches, 2x2 merge, temporal patch 2), a random reward head ``[len(reward_tokens), 32]`` and a
    byte-level BPE with Qwen2-VL's markup, the ``reward_tokens`` and :data:`TINY_QWEN2VL_CHAT`."""
    import transformers as tf

    tok = tf.Qwen2Tokenizer(vocab={s: i for i, s in enumerate(byte_alphabet())}, merges=[])
    tok.add_special_tokens({"additional_special_tokens": [*QWEN2VL_MARKUP, *reward_tokens]})
    tok.chat_template = TINY_QWEN2VL_CHAT
    markup = ["<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>"]
    video, start, end, stop = cast(list[int], tok.convert_tokens_to_ids(markup))
    cfg = tf.Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), bos_token_id=stop, eos_token_id=stop, pad_token_id=stop,
                         hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        video_token_id=video, vision_start_token_id=start, vision_end_token_id=end, image_token_id=video,
    )
    model, head = _seeded(seed, lambda: (tf.Qwen2VLForConditionalGeneration(cfg),
                                         torch.randn(len(reward_tokens), 32)))
    return model.to(device, dtype).eval().requires_grad_(False), head, tok
