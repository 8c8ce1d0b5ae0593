"""The shared half of the diffusers adapters (FLUX, SD3, Wan): text conditioning with optional negative prompt,
initial noise, frozen text encoders and VAE, trainable parameters, and loading a local pipeline directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from otca.models.base import FlowPolicy
from otca.models.build import subfolder
from otca.models.conditioning import BatchedCond, TextFn
from otca.models.embedding_cache import save_prompt_embeddings


def draw_latents(
    n: int, shape: Sequence[int], generator: torch.Generator | list[torch.Generator], device: torch.device
) -> torch.Tensor:
    """Standard normal ``[n, *shape]`` in fp32 on ``device``; with a list, sample i uses only ``generator[i]``.

    Noise is drawn on each generator's own device, so a seed gives the same noise whatever the model device.
    """
    shape = tuple(shape)
    if isinstance(generator, torch.Generator):
        return torch.randn((n, *shape), generator=generator, device=generator.device).to(device)  # [n, *shape]
    if len(generator) != n:
        raise ValueError(f"init_latents: got {len(generator)} generators for n={n} samples")
    return torch.stack([torch.randn(shape, generator=g, device=g.device).to(device) for g in generator])



class DiffusersPolicy(FlowPolicy):
    """The shared half of the FLUX, SD3 and Wan adapters (a concrete FlowPolicy once a subclass adds ``velocity`` and
    ``decode``).

    ``text`` maps prompts to embeddings ``{field: [B, ...]}``: the frozen text encoders (an ``nn.Module``) or a
    :class:`PromptEmbeddingCache`. The text encoders and the VAE (``self.vae``, or FLUX's latent codec
    ``self.codec``, set by the subclass) never train: they stay in eval mode whatever ``train()`` is called with.
    Only the denoiser's parameters may require grad.
    """

    kind: str  # the registered model kind, recorded in embedding caches
    cond_type: type[BatchedCond]
    # The pipeline sub-folders of the text encoders and their tokenizers: (encoder, tokenizer, encoder_2, ...).
    text_parts: tuple[str, ...]
    # The denoiser (set by the subclass): a diffusers model, typed Any as mypy reads its ``config`` as a plain dict.
    transformer: Any

    @staticmethod
    def pipeline_classes() -> tuple[Any, Any, tuple[Any, ...]]:
        """The classes that load the ``transformer`` and ``vae`` folders and each text encoder of
        ``text_parts`` (imported when called: diffusers and transformers are heavy)."""
        raise NotImplementedError

    @classmethod
    def load_components(cls, root: Path, *, text: bool, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
        """The parts of a local pipeline directory (no network) by sub-folder name: ``transformer`` in ``dtype``,
        ``vae`` in ``vae_dtype`` and, only if ``text``, the text encoders (in ``dtype``) and tokenizers."""
        names = ("transformer", "vae", *(cls.text_parts if text else ()))
        folders = {n: subfolder(root, n, cls.kind) for n in names}  # every folder checked before anything loads
        transformer_cls, vae_cls, text_classes = cls.pipeline_classes()
        parts: dict[str, Any] = {
            "transformer": transformer_cls.from_pretrained(folders["transformer"], torch_dtype=dtype),
            "vae": vae_cls.from_pretrained(folders["vae"], torch_dtype=vae_dtype),
        }
        if text:
            from transformers import AutoTokenizer

            for enc_cls, enc, tok in zip(text_classes, cls.text_parts[0::2], cls.text_parts[1::2], strict=True):
                parts[enc] = enc_cls.from_pretrained(folders[enc], dtype=dtype, local_files_only=True)
                parts[tok] = AutoTokenizer.from_pretrained(folders[tok], local_files_only=True)
        return parts

    def __init__(self, text: TextFn, *, latent_shape: Sequence[int], cfg_on: bool, negative_prompt: str):
        super().__init__()
        self.text = text
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.cfg_on = cfg_on
        self.negative_prompt = negative_prompt

    def _frozen(self) -> list[torch.nn.Module]:
        parts = (self.text, getattr(self, "vae", None), getattr(self, "codec", None))
        return [m for m in parts if isinstance(m, torch.nn.Module)]

    def train(self, mode: bool = True) -> DiffusersPolicy:
        super().train(mode)
        for m in self._frozen():
            m.eval()
        return self

    def _param(self) -> torch.nn.Parameter:
        return next(self.transformer.parameters())

    def denoisers(self) -> list[torch.nn.Module]:
        """The trained networks (LoRA and gradient checkpointing go on these): the transformer."""
        return [self.transformer]

    @staticmethod
    def _check_batch(cond: BatchedCond, b: int) -> None:
        """``velocity``'s guard: one prompt per latent."""
        if len(cond) != b:
            raise ValueError(f"velocity: cond has {len(cond)} prompts for a batch of {b} latents")

    def embed_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Text embeddings ``{field: [B, ...]}`` of ``prompts`` on the model's device (no gradient: frozen)."""
        with torch.no_grad():
            emb = self.text(list(prompts))
        return {k: v.to(self._param().device) for k, v in emb.items()}

    def encode(self, prompts: list[str]) -> BatchedCond:
        """Conditioning for ``prompts``, with the negative prompt's embeddings when CFG is on."""
        prompts = list(prompts)
        emb = self.embed_prompts(prompts + [self.negative_prompt] if self.cfg_on else prompts)
        b = len(prompts)
        positive = {k: v[:b] for k, v in emb.items()}
        negative = {k: v[b:].expand_as(positive[k]) for k, v in emb.items()} if self.cfg_on else None
        return self.cond_type.build(positive, negative)

    def save_prompt_embeddings(self, prompts: Sequence[str], path: str | Path, batch_size: int = 32) -> Path:
        """Encode ``prompts`` and the negative prompt once each (``batch_size`` at a time) and write them for
        ``model.options.embeddings``."""
        unique = list(dict.fromkeys([*prompts, self.negative_prompt]))
        chunks = [self.embed_prompts(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
        emb = {k: torch.cat([c[k].cpu() for c in chunks]) for k in chunks[0]}  # {field: [N, ...]}
        return save_prompt_embeddings(path, self.kind, unique, emb)

    def init_latents(self, n: int, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Standard normal latents ``[n, *latent_shape]`` in fp32 on the model's device."""
        return draw_latents(n, self.latent_shape, generator, self._param().device)
