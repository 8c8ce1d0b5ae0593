"""The Stable Diffusion 3 / 3.5 adapter: a diffusers ``SD3Transformer2DModel`` as a FlowPolicy.

Conventions follow diffusers' ``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`` (read, not
copied): latents ``[B, 16, H/8, W/8]`` are the VAE's ``(z - shift_factor) * scaling_factor``; the transformer
takes the timestep as ``1000 * sigma``; the text conditioning is CLIP-L and CLIP-G penultimate hidden states
(77 tokens each, concatenated on features and zero-padded to T5's width) followed on the sequence axis by T5's
``max_sequence_length`` tokens, plus the two CLIP projections concatenated as the pooled vector; classifier-free
guidance against a negative prompt runs inside ``velocity`` whenever ``guidance_scale > 1``.

Registered as model kind ``"sd3"``: ``model.path`` is a local ``StableDiffusion3Pipeline`` directory, or
``model.options.tiny: true`` builds a random twin of a few tens of thousands of parameters in-process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from otca.models.build import BuildInputs, build_diffusers_policy
from otca.models.conditioning import BatchedCond, FrozenTextEncoders, TextFn
from otca.models.diffusers_policy import DiffusersPolicy
from otca.models.guidance import guided_forward, sigma_to_timestep
from otca.models.options import DiffusersOptions
from otca.models.prepare import cast_module
from otca.models.registry import register_policy
from otca.models.vae import check_pixel_size, decode_scaled_latents, frozen_vae, vae_scale_factor
from otca.testing.models import (
    tiny_autoencoder_kl,
    tiny_clip_text_model,
    tiny_clip_tokenizer,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)

if TYPE_CHECKING:
    from otca.config import ModelConfig

# Flow-GRPO's SD3.5-M guidance for rollout and training (diffusers' pipeline default is 7.0).
SD3_GUIDANCE = 4.5
# The pipeline's default T5 length (it allows up to 512).
SD3_T5_TOKENS = 256
# The sub-folders of a StableDiffusion3Pipeline directory that the adapter reads, text encoders last.
SD3_TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


@dataclass(frozen=True)
class SD3Cond(BatchedCond):
    """SD3 text conditioning for B prompts (``neg_*`` only when the policy runs CFG); sliceable along B."""

    prompt_embeds: torch.Tensor  # [B, 77 + L, D]
    pooled: torch.Tensor  # [B, P]
    neg_prompt_embeds: torch.Tensor | None = None  # [B, 77 + L, D]
    neg_pooled: torch.Tensor | None = None  # [B, P]


class SD3TextEncoder(FrozenTextEncoders):
    """The three frozen SD3 text encoders: ``prompts -> {"prompt_embeds": [B, 77 + L, D], "pooled": [B, P]}``.

    ``D`` is T5's width (the transformer's ``joint_attention_dim``), ``P`` the sum of the two CLIP projection
    widths (its ``pooled_projection_dim``), ``L = max_sequence_length``.
    """

    text_parts = SD3_TEXT_PARTS  # CLIP-L, CLIP-G, then T5
    # The submodules of the encoder folders (FrozenTextEncoders).
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    text_encoder_3: torch.nn.Module

    def _clip(self, tokenizer: Any, encoder: torch.nn.Module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate hidden states ``[B, 77, H]`` (the pipeline's ``clip_skip=None``) and the projection
        ``[B, P_i]``."""
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids  # [B, 77]
        out = encoder(ids.to(self._device(encoder)), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def _t5(self, prompts: list[str]) -> torch.Tensor:
        """T5 last hidden states ``[B, L, D]`` (no attention mask, as the pipeline)."""
        ids = self.tokenizers[2](
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids  # [B, L]
        return self.text_encoder_3(ids.to(self._device(self.text_encoder_3)))[0]

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        h_l, pool_l = self._clip(self.tokenizers[0], self.text_encoder, prompts)  # [B, 77, Hl], [B, Pl]
        h_g, pool_g = self._clip(self.tokenizers[1], self.text_encoder_2, prompts)  # [B, 77, Hg], [B, Pg]
        t5 = self._t5(prompts)  # [B, L, D]
        clip = torch.cat([h_l, h_g], dim=-1)  # [B, 77, Hl + Hg]
        if clip.shape[-1] > t5.shape[-1]:
            raise ValueError(f"SD3 text encoders: CLIP width {clip.shape[-1]} exceeds T5 width {t5.shape[-1]}")
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])).to(t5.dtype)  # [B, 77, D]
        return {
            "prompt_embeds": torch.cat([clip, t5], dim=-2),  # [B, 77 + L, D]
            "pooled": torch.cat([pool_l, pool_g], dim=-1),  # [B, Pl + Pg]
        }


class SD3Policy(DiffusersPolicy):
    """An ``SD3Transformer2DModel`` with its VAE and text encoders (or an embedding cache) as a FlowPolicy.

    Latents ``[B, C, H/f, W/f]`` (f = the VAE's downsampling factor, C its latent channels). ``velocity`` returns
    ``v = noise - x0`` in x's dtype, computed by the transformer in its own dtype and guided in fp32.
    """

    kind = "sd3"
    cond_type = SD3Cond
    text_parts = SD3_TEXT_PARTS
    vae: Any  # a diffusers AutoencoderKL (Any: mypy reads its ``config`` as a plain dict)

    @staticmethod
    def pipeline_classes() -> tuple[Any, Any, tuple[Any, ...]]:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        return SD3Transformer2DModel, AutoencoderKL, (CLIPTextModelWithProjection,) * 2 + (T5EncoderModel,)

    def __init__(
        self,
        transformer: Any,
        vae: Any,
        text: TextFn,
        *,
        height: int,
        width: int,
        guidance_scale: float = SD3_GUIDANCE,
        negative_prompt: str = "",
    ):
        tcfg, vcfg = transformer.config, vae.config
        factor = vae_scale_factor(vae)
        multiple = factor * tcfg.patch_size
        check_pixel_size(height, width, multiple, multiple)
        if tcfg.in_channels != vcfg.latent_channels:
            raise ValueError(
                f"SD3: transformer in_channels {tcfg.in_channels} != VAE latent_channels {vcfg.latent_channels}"
            )
        super().__init__(
            text,
            latent_shape=(tcfg.in_channels, height // factor, width // factor),
            cfg_on=guidance_scale > 1,
            negative_prompt=negative_prompt,
        )
        self.transformer = transformer
        self.vae = frozen_vae(vae)
        self.guidance_scale = float(guidance_scale)
        # Rollout and re-evaluation must see one deterministic network (ratio 1): no dropout, as after from_pretrained.
        self.eval()

    def _net(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """One transformer pass: ``x [n, C, h, w]`` in its dtype, ``t [n]`` in [0, 1000] -> ``[n, C, h, w]``."""
        return self.transformer(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=prompt_embeds.to(x.dtype),
            pooled_projections=pooled.to(x.dtype),
            return_dict=False,
        )[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: SD3Cond) -> torch.Tensor:
        """Flow velocity ``[B, C, h, w]`` (x's dtype) at ``x [B, C, h, w]`` and ``sigma [B]``, CFG inside."""
        b = x.shape[0]
        self._check_batch(cond, b)
        t = sigma_to_timestep(sigma, b, x.device)  # [B]
        v = guided_forward(
            self._net, x.to(self.transformer.dtype), t, cond.positive(), cond.negative(), self.guidance_scale
        )  # [B, C, h, w] fp32
        return v.to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, 3, H, W]`` (fp32) from latents ``[B, C, h, w]``: ``z = x / scaling + shift``."""
        return decode_scaled_latents(self.vae, x)


# ------------------------------------------------------------------------------------------------ building


class SD3Options(DiffusersOptions):
    """``model.options`` of model kind ``sd3`` (the shared ones documented in :class:`DiffusersOptions`)."""

    guidance_scale: float = Field(SD3_GUIDANCE, ge=0)
    """Classifier-free guidance scale, applied in rollout and training alike; on when > 1."""
    resolution: int | None = Field(None, gt=0)
    """Square image side in pixels; default: the transformer's sample_size times the VAE factor (1024 for SD3.5)."""
    max_sequence_length: int = Field(SD3_T5_TOKENS, ge=1, le=512)
    """T5 tokens per prompt."""


def tiny_sd3_components(seed: int = 0, text: bool = True) -> dict[str, Any]:
    """Random tiny SD3 parts keyed by their diffusers sub-folder names (fp32, 32x32 pixels by default).

    Shapes mirror SD3.5 at a small width: 16 latent channels, the VAE's SD3 scaling/shift factors, two CLIP
    encoders of different widths, a T5 wider than both together, a dual-attention first block and RMS q/k norm.
    """
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts: dict[str, Any] = {
            "transformer": SD3Transformer2DModel(
                sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=40,
                pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
            ),
            "vae": tiny_autoencoder_kl((8, 8, 16), sample_size=32, scaling_factor=1.5305, shift_factor=0.0609),
        }
        if text:
            for enc, tok, width in (("text_encoder", "tokenizer", 16), ("text_encoder_2", "tokenizer_2", 24)):
                parts[enc] = tiny_clip_text_model(CLIPTextModelWithProjection, clip_tok, width)
                parts[tok] = clip_tok
            parts["text_encoder_3"] = tiny_t5_encoder(
                T5EncoderModel, T5Config, t5_tok, d_model=48, num_heads=2, feed_forward_proj="gated-gelu"
            )
            parts["tokenizer_3"] = t5_tok
    return parts


def sd3_policy_from_components(inputs: BuildInputs[SD3Options]) -> SD3Policy:
    """Assemble the policy from :func:`tiny_sd3_components` / ``SD3Policy.load_components`` parts and the options;
    with a ``cache`` the text-encoder parts are not needed."""
    opts = inputs.opts
    transformer = cast_module(inputs.parts["transformer"], inputs.dtype)
    vae = cast_module(inputs.parts["vae"], inputs.vae_dtype)
    text = inputs.text(SD3TextEncoder, opts.max_sequence_length)
    side = transformer.config.sample_size * vae_scale_factor(vae)
    height, width = opts.size(side, side)
    return SD3Policy(
        transformer, vae, text, height=height, width=width,
        guidance_scale=opts.guidance_scale, negative_prompt=opts.negative_prompt,
    )


@register_policy("sd3")
def build_sd3(cfg: ModelConfig, device: torch.device) -> SD3Policy:
    """Model kind ``sd3``: a local SD3/SD3.5 diffusers directory at ``cfg.path`` (or ``options.tiny``), with
    ``cfg.lora`` and gradient checkpointing on the transformer, weights and text encoders in ``cfg.dtype``."""
    return build_diffusers_policy(cfg, device, SD3Policy, SD3Options, tiny_sd3_components, sd3_policy_from_components)
