"""Tiny offline parts of the diffusers pipelines: tokenizers built in-process and random small encoders and
VAEs of the real layouts. The adapters' tiny twins (``model.options.tiny``) and the tests build from these.

Heavy libraries (diffusers, transformers) are imported inside the functions.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE in byte order (GPT-2's ``bytes_to_unicode`` mapping):
    printable bytes map to themselves, the others to code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = {b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in keep)}
    return [chr(b) if b in keep else shifted[b] for b in range(256)]


def tiny_clip_tokenizer(max_length: int = 77):
    """A CLIP BPE tokenizer with a byte-level character vocabulary and no merges, built offline.

    Ids: 0 = ``<|startoftext|>``, 1 = ``<|endoftext|>`` (also pad), then every byte symbol and its ``</w>``
    word-final form, so any text tokenizes without unknowns. Passed as a dict: transformers 5 ignores
    ``vocab_file`` / ``merges_file`` arguments here (cpu-facts.md).
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in byte_alphabet():
        vocab[s] = len(vocab)
        vocab[s + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_autoencoder_kl(
    block_out_channels: Sequence[int], *, sample_size: int, scaling_factor: float, shift_factor: float
) -> AutoencoderKL:
    """A random ``AutoencoderKL`` of the SD3 / FLUX.1 VAE layout at small width: RGB in and out, 16 latent
    channels, one down and one up block of one layer per entry of ``block_out_channels`` (2x downsampling after
    each but the last), no quant convs, the family's ``scaling_factor`` and ``shift_factor``; the global RNG
    draws it."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=sample_size, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


def tiny_clip_text_model(model_cls: Any, tokenizer: Any, width: int) -> torch.nn.Module:
    """A random two-layer CLIP text tower ``model_cls`` (``CLIPTextModel`` or ``CLIPTextModelWithProjection``) of
    ``width`` over a :func:`tiny_clip_tokenizer` (its ids: 0 start, 1 end and pad); the global RNG draws it."""
    from transformers import CLIPTextConfig

    return model_cls(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )


def tiny_t5_encoder(model_cls: Any, config_cls: Any, tokenizer: Any, **sizes: Any) -> torch.nn.Module:
    """A random one-layer (UM)T5 encoder ``model_cls(config_cls(...))`` over ``tokenizer``'s vocabulary: 8-dim
    heads, d_ff 64, 8 position buckets, no dropout, plus ``sizes`` (d_model, num_heads, ...); the global RNG
    draws it."""
    return model_cls(
        config_cls(
            vocab_size=len(tokenizer), d_kv=8, d_ff=64, num_layers=1, relative_attention_num_buckets=8,
            dropout_rate=0.0, **sizes,
        )
    )


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5 (SentencePiece-Unigram) tokenizer over printable ASCII characters, built offline.

    Ids: 0 = ``<pad>``, 1 = ``</s>``, 2 = ``<unk>``, 3 = the word-start mark, then one piece per character.
    """
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def tiny_qwen2_tokenizer(words: Sequence[str] = (), special: Sequence[str] = ()):
    """A Qwen2 byte-level BPE tokenizer built offline: every byte symbol (:func:`byte_alphabet`) is a token, plus
    one token per piece of ``words`` (merged left to right, so a listed word is a single token as in the real
    vocabulary) and the ``special`` tokens, kept whole.

    Ids: 0 = ``<|endoftext|>`` (also pad), 1..256 the byte symbols in byte order, then the merged pieces, then the
    special tokens. ``words`` are written as the pre-tokenizer cuts them, with a leading space where the word
    follows one (``" the"``).
    """
    from transformers import Qwen2Tokenizer

    alphabet = byte_alphabet()
    symbol = {b: alphabet[b] for b in range(256)}
    vocab = {"<|endoftext|>": 0}
    for s in alphabet:
        vocab[s] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [symbol[b] for b in word.encode("utf-8")]
        left = pieces[0]
        for right in pieces[1:]:
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
            left += right
    # the tokenizers BPE backend takes merges as pairs (transformers' annotation names only merges.txt lines)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    return tok
