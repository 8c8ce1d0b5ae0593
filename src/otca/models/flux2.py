"""The FLUX.2 adapter: a diffusers ``Flux2Transformer2DModel`` as a FlowPolicy.

Conventions follow diffusers' ``pipelines/flux2/pipeline_flux2.py`` (read, not copied):

* text: each prompt goes into the pipeline's chat (its ``SYSTEM_MESSAGE``, then the prompt as the user turn) through
  the tokenizer's chat template, padded and truncated to ``max_sequence_length``; the Mistral-3 text model's
  hidden states after layers 10, 20 and 30 are concatenated on features (``[B, L, 3D]``), no mask;
* latents: the pipeline denoises the VAE's latents patchified 2x2 (``[B, 4C, H/16, W/16]``, 128 channels for
  FLUX.2) and normalised by the VAE's batch-norm running statistics; this adapter's latents are exactly those, so
  the tokens are their pixels in row-major order (``[B, (H/16)(W/16), 4C]``) with position ids (0, row, col, 0),
  and the text's ids are (0, 0, 0, l);
* the transformer takes the timestep as ``sigma`` (``t / 1000``) and FLUX.2-dev's distilled guidance (4.0 by
  default) as a number; there is no true CFG in the pipeline.

Registered as model kind ``"flux2"``: ``model.path`` is a local ``Flux2Pipeline`` directory, or
``model.options.tiny: true`` builds a random twin in-process (a tiny Mistral-3 text model and a byte-level
tokenizer with a chat template included). ``sampler.shift: auto`` is not offered: Flux2Pipeline's empirical shift
depends on the step count as well as the image size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from otca.models.build import BuildInputs, build_diffusers_policy
from otca.models.conditioning import BatchedCond, FrozenTextEncoders, TextFn
from otca.models.diffusers_policy import DiffusersPolicy
from otca.models.options import DiffusersOptions
from otca.models.prepare import cast_module
from otca.models.registry import register_policy
from otca.models.vae import check_pixel_size, frozen_vae, vae_to_unit
from otca.testing.models import tiny_qwen2_tokenizer

if TYPE_CHECKING:
    from otca.config import ModelConfig

# Flux2Pipeline's defaults: guidance 4.0, 512 text tokens, hidden states of layers (10, 20, 30), 1024 px.
FLUX2_GUIDANCE = 4.0
FLUX2_TEXT_TOKENS = 512
FLUX2_TEXT_LAYERS = (10, 20, 30)
FLUX2_SIDE = 1024
TINY_FLUX2_SIDE = 32
FLUX2_TEXT_PARTS = ("text_encoder", "tokenizer")
# The tiny tokenizer's chat template: Mistral's [SYSTEM_PROMPT] / [INST] turns over the pipeline's message format.
TINY_FLUX2_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}"
    "[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}[/INST]{% endif %}{% endfor %}"
)
TINY_FLUX2_SPECIAL = ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]")


@dataclass(frozen=True)
class Flux2Cond(BatchedCond):
    """FLUX.2 text conditioning for B prompts; sliceable along B (no negative: the pipeline has no true CFG)."""

    prompt_embeds: torch.Tensor  # [B, L, 3D]
    neg_prompt_embeds: torch.Tensor | None = None  # never set (FLUX.2 runs without CFG)


def system_message() -> str:
    """Flux2Pipeline's system turn (diffusers' ``pipelines/flux2/system_messages.SYSTEM_MESSAGE``)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    return str(SYSTEM_MESSAGE)


class Flux2TextEncoder(FrozenTextEncoders):
    """The frozen Mistral-3 text model: ``prompts -> {"prompt_embeds": [B, L, 3D]}`` (Flux2Pipeline's
    ``_get_mistral_3_small_prompt_embeds``: chat template, max-length padding, three hidden layers side by side)."""

    text_parts = FLUX2_TEXT_PARTS

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        system = system_message()
        chats = [
            [{"role": "system", "content": [{"type": "text", "text": system}]},
             {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}]
            for p in prompts
        ]
        tok = self.tokenizers[0].apply_chat_template(
            chats, add_generation_prompt=False, tokenize=True, return_dict=True, return_tensors="pt",
            padding="max_length", truncation=True, max_length=self.max_sequence_length,
        )
        encoder: Any = self.text_encoder
        device = self._device(encoder)
        out = encoder(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device),
                      output_hidden_states=True, use_cache=False)
        h = torch.stack([out.hidden_states[k] for k in FLUX2_TEXT_LAYERS], dim=2)  # [B, L, 3, D]
        return {"prompt_embeds": h.flatten(2)}  # [B, L, 3D], layer-major on features as the pipeline


def latent_ids(h2: int, w2: int, device: torch.device) -> torch.Tensor:
    """FLUX.2 image position ids ``[h2 * w2, 4]``: (0, row, col, 0) per token, row-major."""
    rows = torch.arange(h2, device=device).repeat_interleave(w2)  # [S]
    cols = torch.arange(w2, device=device).repeat(h2)  # [S]
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], dim=1)  # [S, 4]


def text_ids(length: int, device: torch.device) -> torch.Tensor:
    """FLUX.2 text position ids ``[length, 4]``: (0, 0, 0, l)."""
    l_idx = torch.arange(length, device=device)  # [L]
    zeros = torch.zeros_like(l_idx)
    return torch.stack([zeros, zeros, zeros, l_idx], dim=1)  # [L, 4]


def patchify(z: torch.Tensor) -> torch.Tensor:
    """VAE latents ``[B, C, h, w] -> [B, 4C, h/2, w/2]``, channel (c, dy, dx) order (Flux2Pipeline's layout)."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # [B, C, 2, 2, h/2, w/2]
    return z.reshape(b, 4 * c, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, 4C, h/2, w/2] -> [B, C, h, w]``."""
    b, c4, h2, w2 = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, h2, w2).permute(0, 1, 4, 2, 5, 3)  # [B, C, h/2, 2, w/2, 2]
    return x.reshape(b, c4 // 4, 2 * h2, 2 * w2)


class Flux2Policy(DiffusersPolicy):
    """A ``Flux2Transformer2DModel`` with its ``AutoencoderKLFlux2`` and Mistral-3 text encoder (or an embedding
    cache) as a FlowPolicy over the pipeline's normalised patchified latents ``[B, 4C, H/16, W/16]``.

    ``velocity`` returns ``v = noise - x0`` in x's dtype; ``decode`` gives ``[B, 3, H, W]`` in [0, 1].
    """

    kind = "flux2"
    cond_type = Flux2Cond
    text_parts = FLUX2_TEXT_PARTS

    @staticmethod
    def pipeline_classes() -> tuple[Any, Any, tuple[Any, ...]]:
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import Mistral3ForConditionalGeneration

        return Flux2Transformer2DModel, AutoencoderKLFlux2, (Mistral3ForConditionalGeneration,)

    def __init__(
        self, transformer: torch.nn.Module, vae: torch.nn.Module, text: TextFn, *, height: int, width: int,
        guidance_scale: float | None = None,
    ):
        tcfg: Any = transformer.config
        vcfg: Any = vae.config
        factor = 2 ** (len(vcfg.block_out_channels) - 1)  # the pipeline's vae_scale_factor (8)
        check_pixel_size(height, width, 2 * factor, 2 * factor)
        c4 = 4 * vcfg.latent_channels
        if tcfg.patch_size != 1 or tcfg.in_channels != c4 or (tcfg.out_channels or tcfg.in_channels) != c4:
            raise ValueError(
                f"Flux2Policy: a VAE of {vcfg.latent_channels} latent channels needs a transformer with patch_size 1 "
                f"and in/out_channels {c4}, got {tcfg.patch_size}, {tcfg.in_channels}, {tcfg.out_channels}"
            )
        if guidance_scale is not None and not tcfg.guidance_embeds:
            raise ValueError("Flux2Policy: guidance_scale needs a guidance-distilled transformer (guidance_embeds)")
        super().__init__(
            text, latent_shape=(c4, height // (2 * factor), width // (2 * factor)), cfg_on=False, negative_prompt=""
        )
        self.transformer = transformer
        self.vae = frozen_vae(vae)
        self.guidance_scale = FLUX2_GUIDANCE if guidance_scale is None and tcfg.guidance_embeds else guidance_scale
        # Rollout and re-evaluation must see one deterministic network (ratio 1): no dropout, as after from_pretrained.
        self.eval()

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Flux2Cond) -> torch.Tensor:
        """Flow velocity ``[B, 4C, h, w]`` (x's dtype) at ``x [B, 4C, h, w]`` and ``sigma [B]``."""
        b, c4, h, w = x.shape
        self._check_batch(cond, b)
        p = self._param()
        tokens = x.reshape(b, c4, h * w).transpose(1, 2).to(p.dtype)  # [B, S, 4C], row-major pixels
        t = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(b)  # [B]
        guidance = None if self.guidance_scale is None else torch.full_like(t, self.guidance_scale)  # [B]
        emb = cond.prompt_embeds
        v = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=emb.to(p.dtype),
            timestep=t,  # in [0, 1]: the pipeline passes t / 1000 and the transformer scales it back
            img_ids=latent_ids(h, w, x.device).expand(b, -1, -1),  # [B, S, 4]
            txt_ids=text_ids(emb.shape[1], x.device).expand(b, -1, -1),  # [B, L, 4]
            guidance=guidance,
            return_dict=False,
        )[0]  # [B, S, 4C]
        return v.float().transpose(1, 2).reshape(b, c4, h, w).to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, 3, H, W]`` (fp32) from latents ``[B, 4C, h, w]``: the batch-norm undone
        (``x * sqrt(running_var + eps) + running_mean``), unpatchified, decoded."""
        vae: Any = self.vae
        bn = vae.bn
        std = torch.sqrt(bn.running_var.float() + vae.config.batch_norm_eps).view(1, -1, 1, 1)  # [1, 4C, 1, 1]
        z = unpatchify(x.float() * std + bn.running_mean.float().view(1, -1, 1, 1))  # [B, C, 2h, 2w]
        return vae_to_unit(vae.decode(z.to(vae.dtype), return_dict=False)[0])  # [B, 3, H, W]


# ------------------------------------------------------------------------------------------------ building


class Flux2Options(DiffusersOptions):
    """``model.options`` of model kind ``flux2`` (the shared ones documented in :class:`DiffusersOptions`;
    negative_prompt is unused: FLUX.2 runs without CFG)."""

    guidance_scale: float | None = Field(None, ge=0)
    """Distilled guidance fed to the transformer; None: 4.0 (Flux2Pipeline's) for a guidance-distilled
    transformer, none without guidance embeddings."""
    resolution: int | None = Field(None, gt=0)
    """Square image side in pixels, a multiple of 16; default 1024 (32 for tiny)."""
    max_sequence_length: int = Field(FLUX2_TEXT_TOKENS, ge=1, le=FLUX2_TEXT_TOKENS)
    """Text tokens per prompt, system turn included (the pipeline pads and truncates to it)."""


def tiny_flux2_tokenizer():
    """The tiny byte-level tokenizer with whole-word pieces for the system message and a Mistral-style chat
    template (:data:`TINY_FLUX2_CHAT_TEMPLATE`)."""
    words = re.findall(r" ?[A-Za-z]+", system_message())
    tok = tiny_qwen2_tokenizer(words, TINY_FLUX2_SPECIAL)
    tok.chat_template = TINY_FLUX2_CHAT_TEMPLATE
    return tok


def tiny_flux2_components(seed: int = 0, text: bool = True) -> dict[str, Any]:
    """Random tiny FLUX.2 parts keyed by their diffusers sub-folder names (fp32).

    The structure is FLUX.2-dev's at a small width: a guidance-distilled transformer over 128-channel tokens with one
    double and one single block; a VAE with FLUX.2's 32 latent channels, 8x downsampling and batch-norm statistics
    (drawn at random here, so that the normalisation is tested); a 30-layer Mistral-3 text model of width 16 (the
    pipeline reads layers 10, 20, 30: joint_attention_dim 48) with a one-layer Pixtral vision tower.
    """
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae: Any = AutoencoderKLFlux2(
            block_out_channels=(4, 8, 8, 8), layers_per_block=1, latent_channels=32, norm_num_groups=4,
            sample_size=TINY_FLUX2_SIDE,
        )
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
        parts: dict[str, Any] = {
            # rope axes (4 x 4) add up to the head dim, as FLUX.2's (4 x 32) = 128
            "transformer": Flux2Transformer2DModel(
                patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=2.0,
                axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
            ),
            "vae": vae,
        }
        if text:
            tok = tiny_flux2_tokenizer()
            config = Mistral3Config(
                text_config={
                    "model_type": "mistral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 30,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": len(tok),
                    "max_position_embeddings": 1024, "bos_token_id": tok.pad_token_id,
                    "eos_token_id": tok.pad_token_id, "pad_token_id": tok.pad_token_id,
                },
                vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8, "image_size": 32,
                               "patch_size": 16},
                image_token_index=tok.convert_tokens_to_ids("[IMG]"),
            )
            parts["text_encoder"] = Mistral3ForConditionalGeneration(config)
            parts["tokenizer"] = tok
    return parts


def flux2_policy_from_components(inputs: BuildInputs[Flux2Options]) -> Flux2Policy:
    """Assemble the policy from :func:`tiny_flux2_components` / ``Flux2Policy.load_components`` parts and the
    options; with a ``cache`` the text-encoder parts are not needed."""
    opts = inputs.opts
    text = inputs.text(Flux2TextEncoder, opts.max_sequence_length)
    side = TINY_FLUX2_SIDE if opts.tiny else FLUX2_SIDE
    height, width = opts.size(side, side)
    return Flux2Policy(
        cast_module(inputs.parts["transformer"], inputs.dtype), cast_module(inputs.parts["vae"], inputs.vae_dtype),
        text, height=height, width=width, guidance_scale=opts.guidance_scale,
    )


@register_policy("flux2")
def build_flux2(cfg: ModelConfig, device: torch.device) -> Flux2Policy:
    """Model kind ``flux2``: a local FLUX.2 diffusers directory at ``cfg.path`` (or ``options.tiny``), with
    ``cfg.lora`` and gradient checkpointing on the transformer, weights and text encoder in ``cfg.dtype``."""
    return build_diffusers_policy(
        cfg, device, Flux2Policy, Flux2Options, tiny_flux2_components, flux2_policy_from_components
    )
