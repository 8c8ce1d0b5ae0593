"""The FLUX adapter: any diffusers ``FluxTransformer2DModel`` as a :class:`~otca.models.base.FlowPolicy`.

The same class drives FLUX.1-dev / schnell and the embedded tiny FLUX of the digits world. Latents stay unpacked
``[B, C, h, w]`` outside the adapter; inside it they become FLUX's sequence of 2x2-patch tokens
``[B, (h/2)(w/2), 4C]`` in the layout of diffusers' ``FluxPipeline`` (so real FLUX weights see what they were
trained on). Guidance lives here: FLUX.1-dev's distilled guidance (a number fed to the transformer) and true
classifier-free guidance (an unconditional pass, batched with the conditional one).

Registered as model kind ``"flux"``: ``model.path`` is a local ``FluxPipeline`` directory (FLUX.1-dev or
schnell). Conventions follow diffusers' ``pipelines/flux/pipeline_flux.py`` (read, not copied): the pooled
vector is CLIP-L's ``pooler_output`` over 77 tokens, the sequence is T5's last hidden states over
``max_sequence_length`` tokens (512 for dev), latents ``[B, 16, H/8, W/8]`` are the VAE's
``(z - shift_factor) * scaling_factor``, and H, W must be multiples of 16 (8x VAE, then 2x2 packing).
``model.options.tiny: true`` builds a random twin of the same structure in-process (tests and demos).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from pydantic import Field

from otca.flow.schedule import DynamicShift
from otca.models.build import BuildInputs, build_diffusers_policy
from otca.models.conditioning import BatchedCond, FrozenTextEncoders, TextFn
from otca.models.diffusers_policy import DiffusersPolicy
from otca.models.guidance import guided_forward
from otca.models.options import DiffusersOptions
from otca.models.prepare import cast_module, freeze
from otca.models.registry import register_policy
from otca.models.vae import (
    check_pixel_size,
    decode_scaled_latents,
    encode_scaled_latents,
    frozen_vae,
    vae_scale_factor,
)
from otca.testing.models import (
    tiny_autoencoder_kl,
    tiny_clip_text_model,
    tiny_clip_tokenizer,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)

if TYPE_CHECKING:
    from otca.config import ModelConfig

# FLUX.1-dev's default distilled guidance (diffusers FluxPipeline's guidance_scale default).
FLUX_DEV_GUIDANCE = 3.5
# FluxPipeline defaults: T5 tokens per prompt (dev; schnell was distilled with 256) and image side
# (default_sample_size 128 x vae_scale_factor 8).
FLUX_T5_TOKENS = 512
FLUX_SIDE = 1024
TINY_FLUX_SIDE = 64
# The dynamic-shift fields of FLUX.1-dev's scheduler/scheduler_config.json (also diffusers'
# FlowMatchEulerDiscreteScheduler defaults): the scheduler config of a policy built without a directory.
FLUX1_SCHEDULER_CONFIG: dict[str, Any] = {
    "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
    "max_shift": 1.15,
}
# The sub-folders of a FluxPipeline directory that the adapter reads, text encoders last.
FLUX_TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


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


def scheduler_dynamic_shift(cfg: Mapping[str, Any], image_seq_len: int) -> DynamicShift | None:
    """The dynamic shift of a ``FlowMatchEulerDiscreteScheduler`` config at ``image_seq_len`` tokens, with the
    fallbacks of the FLUX.1 and Qwen-Image pipelines' ``calculate_shift`` calls; None when the config turns
    dynamic shifting off."""
    if not cfg.get("use_dynamic_shifting", False):
        return None
    return DynamicShift(
        image_seq_len=image_seq_len,
        base_seq_len=int(cfg.get("base_image_seq_len", 256)),
        max_seq_len=int(cfg.get("max_image_seq_len", 4096)),
        base_shift=float(cfg.get("base_shift", 0.5)),
        max_shift=float(cfg.get("max_shift", 1.15)),
    )


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
    text_parts = FLUX_TEXT_PARTS

    @staticmethod
    def pipeline_classes() -> tuple[Any, Any, tuple[Any, ...]]:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        return FluxTransformer2DModel, AutoencoderKL, (CLIPTextModel, T5EncoderModel)

    def __init__(
        self,
        transformer: Any,
        text: TextFn,
        codec: LatentCodec,
        *,
        guidance_scale: float | None = None,
        true_cfg_scale: float = 1.0,
        negative_prompt: str = "",
        scheduler_config: Mapping[str, Any] | None = None,
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
        self.scheduler_config = dict(FLUX1_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)

    @property
    def dynamic_shift(self) -> DynamicShift | None:
        """FluxPipeline's resolution-dependent shift at this policy's image size (``sampler.shift: auto``): the
        image token count ``(h/2)(w/2)`` and the scheduler config's fields with FluxPipeline's fallbacks; None
        when the scheduler config turns dynamic shifting off (FLUX.1-schnell)."""
        _, h, w = self.latent_shape
        return scheduler_dynamic_shift(self.scheduler_config, (h // 2) * (w // 2))

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
        self._check_batch(cond, b)
        p = self._param()
        tokens = pack_latents(x).to(p.dtype)  # [B, S, 4C]
        t = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(b)  # [B]
        net = functools.partial(self._transformer, img_ids=latent_image_ids(h // 2, w // 2, x.device, p.dtype))
        v = guided_forward(net, tokens, t, cond.positive(), cond.negative(), self.true_cfg_scale)  # [B, S, 4C] fp32
        return unpack_latents(v, h, w).to(x.dtype)  # [B, C, h, w]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, ch, H, W]`` from latents ``[B, C, h, w]``."""
        return self.codec.decode(x)


# ------------------------------------------------------------------------------------ FLUX.1 text and VAE


class FluxTextEncoder(FrozenTextEncoders):
    """The two frozen FLUX.1 text encoders: ``prompts -> {"prompt_embeds": [B, L, D], "pooled": [B, P]}``.

    ``pooled``: CLIP-L's ``pooler_output`` (the final-norm state at the end-of-text token) of the prompt padded
    to the tokenizer's 77 tokens; ``prompt_embeds``: T5's last hidden states over ``max_sequence_length`` tokens,
    padding included and no attention mask (FluxPipeline ``_get_clip_prompt_embeds`` / ``_get_t5_prompt_embeds``).
    """

    text_parts = FLUX_TEXT_PARTS  # CLIP-L, then T5
    # The submodules of the encoder folders (FrozenTextEncoders).
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module

    def _ids(self, tokenizer: Any, prompts: list[str], length: int, encoder: torch.nn.Module) -> torch.Tensor:
        """Token ids ``[B, length]``, padded and truncated to ``length``, on the encoder's device."""
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return ids.input_ids.to(self._device(encoder))

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        clip_tok, t5_tok = self.tokenizers
        clip_ids = self._ids(clip_tok, prompts, clip_tok.model_max_length, self.text_encoder)  # [B, 77]
        t5_ids = self._ids(t5_tok, prompts, self.max_sequence_length, self.text_encoder_2)  # [B, L]
        return {
            "prompt_embeds": self.text_encoder_2(t5_ids)[0],  # [B, L, D]
            "pooled": self.text_encoder(clip_ids).pooler_output,  # [B, P]
        }


class VaeCodec(torch.nn.Module):
    """A frozen FLUX.1 ``AutoencoderKL`` as the :class:`LatentCodec` of ``height x width`` images.

    ``latent_shape = (latent_channels, H/8, W/8)`` (16 channels for FLUX.1); latents are the VAE's
    ``(z - shift_factor) * scaling_factor`` (FLUX.1: 0.1159 and 0.3611); pixels are ``[B, 3, H, W]`` in [0, 1].
    """

    def __init__(self, vae: Any, height: int, width: int):
        super().__init__()
        factor = vae_scale_factor(vae)
        multiple = 2 * factor  # FluxPipeline: 8x VAE, then 2x2 packing
        check_pixel_size(height, width, multiple, multiple)
        self.vae = frozen_vae(vae)
        self.latent_shape = (vae.config.latent_channels, height // factor, width // factor)  # (C, h, w)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` (fp32, posterior mean) of pixels ``[B, 3, H, W]`` in [0, 1]."""
        return encode_scaled_latents(self.vae, pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [0, 1] (fp32) of latents ``[B, C, h, w]``."""
        return decode_scaled_latents(self.vae, latents)


# ------------------------------------------------------------------------------------------------ building


class FluxOptions(DiffusersOptions):
    """``model.options`` of model kind ``flux`` (the shared ones documented in :class:`DiffusersOptions`)."""

    guidance_scale: float | None = Field(None, ge=0)
    """Distilled guidance fed to the transformer, rollout and training alike; None: 3.5 for a guidance-distilled
    transformer (FLUX.1-dev), none for one without guidance embeddings (FLUX.1-schnell)."""
    true_cfg_scale: float = Field(1.0, ge=1)
    """Real classifier-free guidance against negative_prompt (a second pass), on when > 1; FLUX.1 runs without."""
    resolution: int | None = Field(None, gt=0)
    """Square image side in pixels, a multiple of 16; default 1024 (64 for tiny). The OTCA paper trains at 512."""
    max_sequence_length: int = Field(FLUX_T5_TOKENS, ge=1, le=512)
    """T5 tokens per prompt (FluxPipeline: 512 for dev, 256 for schnell)."""


def tiny_flux_components(seed: int = 0, text: bool = True) -> dict[str, Any]:
    """Random tiny FLUX.1 parts keyed by their diffusers sub-folder names (fp32).

    The structure is FLUX.1-dev's at a small width: a guidance-distilled transformer over 2x2-packed 16-channel
    latents (in_channels 64) with double and single blocks, a VAE with four blocks (8x downsampling), 16 latent
    channels, FLUX.1's scaling/shift factors and no quant convs, a CLIP text model whose width is the pooled
    width, and a gated-GELU T5 encoder whose width is the joint attention width.
    """
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts: dict[str, Any] = {
            # rope axes (4 + 6 + 6) add up to the head dim, as FLUX.1's (16 + 56 + 56) = 128
            "transformer": FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6),
            ),
            "vae": tiny_autoencoder_kl(
                (4, 8, 8, 8), sample_size=TINY_FLUX_SIDE, scaling_factor=0.3611, shift_factor=0.1159
            ),
        }
        if text:
            parts["text_encoder"] = tiny_clip_text_model(CLIPTextModel, clip_tok, 24)
            parts["tokenizer"] = clip_tok
            parts["text_encoder_2"] = tiny_t5_encoder(
                T5EncoderModel, T5Config, t5_tok, d_model=32, num_heads=2, feed_forward_proj="gated-gelu"
            )
            parts["tokenizer_2"] = t5_tok
    return parts


def read_scheduler_config(root: Path | None) -> dict[str, Any] | None:
    """``root/scheduler/scheduler_config.json`` of a FluxPipeline directory; None (FLUX.1's values) without a
    directory; ``{}`` (no dynamic shifting known) for a directory without that file."""
    if root is None:
        return None
    path = Path(root) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path: '{path}' is not a readable JSON scheduler config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"model.path: '{path}' expected a JSON object")
    return cfg


def flux_policy_from_components(inputs: BuildInputs[FluxOptions]) -> FluxPolicy:
    """Assemble the policy from :func:`tiny_flux_components` / ``FluxPolicy.load_components`` parts and the
    options; with a ``cache`` the text-encoder parts are not needed."""
    opts = inputs.opts
    text = inputs.text(FluxTextEncoder, opts.max_sequence_length)
    side = TINY_FLUX_SIDE if opts.tiny else FLUX_SIDE
    codec = VaeCodec(cast_module(inputs.parts["vae"], inputs.vae_dtype), *opts.size(side, side))
    policy = FluxPolicy(
        cast_module(inputs.parts["transformer"], inputs.dtype), text, codec,
        guidance_scale=opts.guidance_scale, true_cfg_scale=opts.true_cfg_scale, negative_prompt=opts.negative_prompt,
        scheduler_config=read_scheduler_config(inputs.root),
    )
    # Rollout and re-evaluation must see one deterministic network (ratio 1): no dropout, as after from_pretrained.
    return policy.eval()


@register_policy("flux")
def build_flux(cfg: ModelConfig, device: torch.device) -> FluxPolicy:
    """Model kind ``flux``: a local FLUX.1 diffusers directory at ``cfg.path`` (or ``options.tiny``), with
    ``cfg.lora`` and gradient checkpointing on the transformer only, weights and text encoders in ``cfg.dtype``."""
    return build_diffusers_policy(
        cfg, device, FluxPolicy, FluxOptions, tiny_flux_components, flux_policy_from_components
    )
