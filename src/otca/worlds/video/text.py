"""The video world's text side: a word-level tokenizer over the prompt vocabulary and a tiny text encoder.

Wan reads a prompt as UMT5's per-token hidden states with the padding positions zeroed (``prompt_embeds
[B, L, D]``, the transformer's cross-attention input). The tiny encoder returns exactly that under the same name
(the text contract of :class:`~otca.models.wan.WanPolicy`): token + position embeddings, one pre-norm transformer
layer, a final norm, and zeros at the padding. The empty prompt is ``[BOS, PAD, ...]``: the unconditional input
of classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from otca.worlds.digits.text import split_words
from otca.worlds.video.prompts import UnknownPromptError, all_prompts

PAD, BOS = 0, 1
N_SPECIAL = 2  # <pad>, <bos>


def prompt_vocabulary() -> tuple[str, ...]:
    """Every word of every video prompt (train and eval phrasings), sorted."""
    return tuple(sorted({w for p in all_prompts("all") for w in split_words(p)}))


@dataclass(frozen=True)
class VideoTextConfig:
    """Architecture of :class:`VideoTextEncoder` (saved as JSON beside its weights)."""

    vocab: tuple[str, ...]
    """The words, in token-id order after the special tokens; stored so weights never depend on prompts.py."""
    max_length: int = 8
    """Tokens per prompt, BOS included (L); shorter prompts are padded."""
    width: int = 32
    """Token embedding size D (the transformer's text_dim)."""
    heads: int = 2
    """Attention heads of the encoder layer."""
    ff_dim: int = 64
    """Hidden size of the encoder layer's MLP."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoTextConfig:
        return cls(**{**d, "vocab": tuple(d["vocab"])})

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "vocab": list(self.vocab)}


def tokenize(prompts: list[str], vocab: tuple[str, ...], max_length: int) -> torch.Tensor:
    """Prompts -> token ids ``[B, L]``: BOS, one id per word, then PAD; an unknown word or a prompt longer than
    ``max_length - 1`` words is a one-line error naming the prompt."""
    ids = {w: i + N_SPECIAL for i, w in enumerate(vocab)}
    rows = []
    for p in prompts:
        words = split_words(p)
        unknown = [w for w in words if w not in ids]
        if unknown:
            raise UnknownPromptError(f"unknown word {unknown[0]!r} in prompt {p!r}: the video text encoder knows "
                                     f"{len(ids)} words, those of otca.worlds.video.prompts.all_prompts()")
        if len(words) + 1 > max_length:
            raise ValueError(f"prompt {p!r} has {len(words)} words; the video text encoder takes at most "
                             f"{max_length - 1}")
        row = [BOS] + [ids[w] for w in words]
        rows.append(row + [PAD] * (max_length - len(row)))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, max_length)


class VideoTextEncoder(nn.Module):
    """``prompts -> {"prompt_embeds": [B, L, D]}`` with zeros at the padding, UMT5 for Wan in miniature."""

    def __init__(self, config: VideoTextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(len(config.vocab) + N_SPECIAL, config.width)
        self.position_embedding = nn.Parameter(0.02 * torch.randn(config.max_length, config.width))
        self.layer = nn.TransformerEncoderLayer(
            config.width, config.heads, config.ff_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(config.width)

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = tokenize(list(prompts), self.config.vocab, self.config.max_length)
        ids = ids.to(self.position_embedding.device)  # [B, L]
        pad = ids == PAD  # [B, L]
        h = self.token_embedding(ids) + self.position_embedding  # [B, L, D]
        h = self.norm(self.layer(h, src_key_padding_mask=pad))  # [B, L, D]
        return {"prompt_embeds": h.masked_fill(pad[..., None], 0.0)}  # [B, L, D], WanPipeline zeros the padding
