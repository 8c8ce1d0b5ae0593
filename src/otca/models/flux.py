"""The FLUX adapter: any diffusers ``FluxTransformer2DModel`` as a :class:`~otca.models.base.FlowPolicy`.

The same class drives FLUX.1-dev and the embedded tiny FLUX of the digits world. Latents stay unpacked
``[B, C, h, w]`` outside the adapter; inside it they become FLUX's sequence of 2x2-patch tokens
``[B, (h/2)(w/2), 4C]`` in the layout of diffusers' ``FluxPipeline`` (so real FLUX weights see what they were
trained on). Guidance lives here: FLUX.1-dev's distilled guidance (a number fed to the transformer) and true
classifier-free guidance (an unconditional pass, batched with the conditional one).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch

from otca.models._diffusers_common import BatchedCond, DiffusersPolicy, TextFn, freeze, guided_forward

# FLUX.1-dev's default distilled guidance (diffusers FluxPipeline's guidance_scale default).
FLUX_DEV_GUIDANCE = 3.5


class LatentCodec(Protocol):
    """The 'VAE': pixels in [0, 1] ``[B, ch, H, W]`` <-> latents ``[B, C, h, w]`` (already scaled and shifted)."""

    latent_shape: tuple[int, int, int]  # (C, h, w)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class FluxCond(BatchedCond):
    """FLUX text conditioning of B prompts, sliceable along the batch (``cond[2:4]``, ``cond[idx]``).

    Build it from precomputed embeddings with ``FluxCond(prompt_embeds=..., pooled=...)`` (or
    ``FluxCond.build``), so the text encoders need not stay in memory. The ``neg_*`` fields (the negative
    prompt, repeated per sample) are present only when the policy runs true CFG. FLUX's text position ids are
    always zeros ``[L, 3]``, so they are made in :meth:`FluxPolicy.velocity`, not stored.
    """

    prompt_embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor  # [B, P]
    neg_prompt_embeds: torch.Tensor | None = None  # [B, L, D]
    neg_pooled: torch.Tensor | None = None  # [B, P]


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX token packing: 2x2 latent patches -> tokens, ``[B, C, h, w] -> [B, (h/2)(w/2), 4C]``.

    Token (i, j) holds channels in (c, dy, dx) order, the layout of diffusers' FluxPipeline.
    """
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)  # [B, C, h/2, 2, w/2, 2]
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)  # [B, S, 4C]


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (h/2)(w/2), 4C] -> [B, C, h, w]``."""
    b, _, c4 = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2)  # [B, h/2, w/2, C, 2, 2]
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return x.reshape(b, c4 // 4, h, w)  # [B, C, h, w]


def latent_image_ids(h2: int, w2: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX image position ids ``[h2 * w2, 3]``: (0, row, col) per token, row-major like the packing."""
    rows = torch.arange(h2, device=device).repeat_interleave(w2)  # [S]
    cols = torch.arange(w2, device=device).repeat(h2)  # [S]
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)  # [S, 3]


class FluxPolicy(DiffusersPolicy):
    """A diffusers ``FluxTransformer2DModel`` with its text encoder and latent codec, as a FlowPolicy.

    * ``text``: prompts -> ``{"prompt_embeds": [B, L, D], "pooled": [B, P]}`` (the text encoders, frozen here, or
      a ``PromptEmbeddingCache`` with those fields).
    * ``codec``: the latent codec; latents are ``[B, *codec.latent_shape]`` and the transformer must take
      ``in_channels == 4C``.
    * ``guidance_scale``: FLUX.1-dev's distilled guidance, fed to the transformer as ``guidance``; only for a
      transformer with ``config.guidance_embeds``, where it defaults to 3.5 (elsewhere it must stay None).
    * ``true_cfg_scale`` (>= 1): real classifier-free guidance against ``negative_prompt``, on when > 1 (the
      FluxPipeline rule); both passes run as one transformer forward of 2B.

    ``velocity`` returns ``v = noise - x0``, so ``x + (sigma_next - sigma) v`` is an Euler step (sigma 1 = noise).
    Only transformer parameters can require grad (all of them, or the LoRA weights once LoRA is added).
    """

    kind = "flux"
    cond_type = FluxCond

    def __init__(
        self,
        transformer: torch.nn.Module,
        text: TextFn,
        codec: LatentCodec,
        *,
        guidance_scale: float | None = None,
        true_cfg_scale: float = 1.0,
        negative_prompt: str = "",
    ):
        c, h, w = codec.latent_shape
        cfg = transformer.config
        if cfg.in_channels != 4 * c or h % 2 or w % 2:
            raise ValueError(
                f"FluxPolicy: codec latent_shape {tuple(codec.latent_shape)} needs even h, w and a transformer with "
                f"in_channels {4 * c}, got in_channels {cfg.in_channels}"
            )
        if guidance_scale is not None and not cfg.guidance_embeds:
            raise ValueError("FluxPolicy: guidance_scale needs a guidance-distilled transformer (guidance_embeds)")
        if true_cfg_scale < 1:
            raise ValueError(f"FluxPolicy: true_cfg_scale must be >= 1 (1 = off), got {true_cfg_scale}")
        super().__init__(
            freeze(text) if isinstance(text, torch.nn.Module) else text,
            latent_shape=codec.latent_shape,
            cfg_on=true_cfg_scale > 1,
            negative_prompt=negative_prompt,
        )
        self.transformer = transformer
        self.codec = codec
        self.guidance_scale = FLUX_DEV_GUIDANCE if guidance_scale is None and cfg.guidance_embeds else guidance_scale
        self.true_cfg_scale = float(true_cfg_scale)

    def _transformer(
        self, tokens: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
        *, img_ids: torch.Tensor,
    ) -> torch.Tensor:
        """One transformer forward: tokens ``[n, S, 4C]`` at ``sigma [n]`` -> velocity tokens ``[n, S, 4C]``."""
        dtype = tokens.dtype
        guidance = None if self.guidance_scale is None else torch.full_like(sigma, self.guidance_scale)  # [n]
        return self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=sigma,  # in [0, 1]: the FLUX transformer scales it by 1000 itself
            img_ids=img_ids,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=tokens.device, dtype=dtype),  # [L, 3]
            guidance=guidance,
            return_dict=False,
        )[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: FluxCond) -> torch.Tensor:
        """Flow velocity ``[B, C, h, w]`` (in x's dtype) at latents ``x [B, C, h, w]`` and ``sigma [B]``.

        With true CFG: ``v = v_neg + s (v_cond - v_neg)`` (Ho & Salimans 2022, Eq. 6), combined in fp32.
        """
        b, _, h, w = x.shape
        if len(cond) != b:
            raise ValueError(f"velocity: cond has {len(cond)} prompts for a batch of {b} latents")
        p = self._param()
        tokens = pack_latents(x).to(p.dtype)  # [B, S, 4C]
        t = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(b)  # [B]
        net = functools.partial(self._transformer, img_ids=latent_image_ids(h // 2, w // 2, x.device, p.dtype))
        v = guided_forward(net, tokens, t, cond.positive(), cond.negative(), self.true_cfg_scale)  # [B, S, 4C] fp32
        return unpack_latents(v, h, w).to(x.dtype)  # [B, C, h, w]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, ch, H, W]`` from latents ``[B, C, h, w]``."""
        return self.codec.decode(x)
