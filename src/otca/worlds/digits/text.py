"""The digits world's text side: a word-level tokenizer over the prompt vocabulary and a tiny text encoder.

FLUX.1 reads a prompt twice: T5's per-token embeddings (``prompt_embeds [B, L, D]``, the transformer's
joint-attention stream) and CLIP's pooled vector (``pooled [B, P]``, added to the timestep embedding). The tiny
encoder plays both parts and returns both under those names (the text contract of
:class:`~otca.models.flux.FluxPolicy`): token + position embeddings, one pre-norm transformer layer, and a
projection of the BOS token's output as the pooled vector. The empty prompt is ``[BOS, PAD, ...]``, so it is
encodable: it is the unconditional input of classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from otca.worlds.digits.prompts import UnknownPromptError, all_prompts

PAD, BOS = 0, 1
SPECIAL_TOKENS = ("<pad>", "<bos>")
_WORD = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks ("digit 7, handwritten" -> 4 tokens)


def split_words(prompt: str) -> list[str]:
    """Lower-cased words and punctuation marks of ``prompt``, in order."""
    return _WORD.findall(prompt.strip().lower())


def prompt_vocabulary() -> tuple[str, ...]:
    """Every word of every digits prompt (train and eval phrasings), sorted."""
    return tuple(sorted({w for p in all_prompts("all") for w in split_words(p)}))


@dataclass(frozen=True)
class TextEncoderConfig:
    """Architecture of :class:`DigitsTextEncoder` (saved as JSON beside its weights)."""

    vocab: tuple[str, ...]
    """The words, in token-id order after the special tokens; stored so weights never depend on prompts.py."""
    max_length: int = 8
    """Tokens per prompt, BOS included (L); shorter prompts are padded."""
    width: int = 32
    """Token embedding size D (the transformer's joint_attention_dim)."""
    heads: int = 2
    """Attention heads of the encoder layer."""
    ff_dim: int = 64
    """Hidden size of the encoder layer's MLP."""
    pooled_dim: int = 32
    """Size P of the pooled vector (the transformer's pooled_projection_dim)."""

    @classmethod
    def from_dict(cls, d: dict) -> TextEncoderConfig:
        return cls(**{**d, "vocab": tuple(d["vocab"])})

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "vocab": list(self.vocab)}


class WordTokenizer:
    """Prompts -> token ids ``[B, L]``: BOS, one id per known word, then PAD."""

    def __init__(self, vocab: tuple[str, ...], max_length: int):
        self.ids = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(vocab)}
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.ids) + len(SPECIAL_TOKENS)

    def encode_one(self, prompt: str) -> list[int]:
        words = split_words(prompt)
        unknown = [w for w in words if w not in self.ids]
        if unknown:
            raise UnknownPromptError(
                f"unknown word {unknown[0]!r} in prompt {prompt!r}: the digits text encoder knows "
                f"{len(self.ids)} words, those of otca.worlds.digits.prompts.all_prompts()"
            )
        if len(words) + 1 > self.max_length:
            raise ValueError(
                f"prompt {prompt!r} has {len(words)} words; the digits text encoder takes at most "
                f"{self.max_length - 1}"
            )
        ids = [BOS] + [self.ids[w] for w in words]
        return ids + [PAD] * (self.max_length - len(ids))

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([self.encode_one(p) for p in prompts], dtype=torch.long).reshape(-1, self.max_length)


class DigitsTextEncoder(nn.Module):
    """``prompts -> {"prompt_embeds": [B, L, D], "pooled": [B, P]}``, FLUX's text encoders in miniature."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.tokenizer = WordTokenizer(config.vocab, config.max_length)
        self.token_embedding = nn.Embedding(len(self.tokenizer), config.width)
        self.position_embedding = nn.Parameter(0.02 * torch.randn(config.max_length, config.width))
        self.layer = nn.TransformerEncoderLayer(
            config.width, config.heads, config.ff_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(config.width)
        self.pool = nn.Linear(config.width, config.pooled_dim)

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(prompts).to(self.position_embedding.device)  # [B, L]
        h = self.token_embedding(ids) + self.position_embedding  # [B, L, D]
        h = self.norm(self.layer(h, src_key_padding_mask=ids == PAD))  # [B, L, D]
        return {"prompt_embeds": h, "pooled": self.pool(h[:, 0])}  # [B, L, D], [B, P] (pooled from BOS)
