"""The Qwen-Image adapter: a diffusers ``QwenImageTransformer2DModel`` as a FlowPolicy.

Conventions follow diffusers' ``pipelines/qwenimage/pipeline_qwenimage.py`` (read, not copied):

* text: each prompt is wrapped in the pipeline's chat template, encoded by Qwen2.5-VL, and its last hidden states
  are kept only at the prompt's real tokens past the template's first 34 (``prompt_template_encode_start_idx``),
  at most ``max_sequence_length`` of them; the transformer sees them with a mask of the padding;
* latents ``[B, 16, H/8, W/8]`` are the VAE's ``(z - latents_mean) / latents_std`` of a one-frame video, packed
  into 2x2-patch tokens ``[B, (h/2)(w/2), 64]`` exactly as FLUX.1's (``_pack_latents``) with RoPE over the
  ``img_shapes`` ``(1, h/2, w/2)``;
* the transformer takes the timestep as ``sigma`` (``t / 1000``) and scales it by 1000 itself;
* true classifier-free guidance against a negative prompt (on when ``true_cfg_scale > 1``), after which each
  token's guided velocity is rescaled to the conditional velocity's norm.

Registered as model kind ``"qwen-image"``: ``model.path`` is a local ``QwenImagePipeline`` directory, or
``model.options.tiny: true`` builds a random twin in-process (a tiny Qwen2.5-VL text model and byte-level tokenizer
included, so the twin runs the real text path offline).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from otca.flow.schedule import DynamicShift
from otca.models.build import BuildInputs, build_diffusers_policy
from otca.models.conditioning import BatchedCond, FrozenTextEncoders, TextFn
from otca.models.diffusers_policy import DiffusersPolicy
from otca.models.flux import pack_latents, read_scheduler_config, scheduler_dynamic_shift, unpack_latents
from otca.models.guidance import guided_forward
from otca.models.options import DiffusersOptions
from otca.models.prepare import cast_module
from otca.models.registry import register_policy
from otca.models.vae import check_pixel_size, frozen_vae, vae_to_unit
from otca.testing.models import tiny_qwen2_tokenizer

if TYPE_CHECKING:
    from otca.config import ModelConfig

# QwenImagePipeline's prompt template and the number of its leading tokens dropped from the hidden states.
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_IMAGE_DROP = 34
# The pipeline's tokenizer limit (before the drop) and its __call__ defaults: 512 text tokens, true CFG 4.0
# (on with a negative prompt; its docs use " "), 1024 px (default_sample_size 128 x vae_scale_factor 8).
QWEN_TOKENIZER_MAX = 1024
QWEN_IMAGE_TEXT_TOKENS = 512
QWEN_IMAGE_CFG = 4.0
QWEN_IMAGE_NEGATIVE = " "
QWEN_IMAGE_SIDE = 1024
TINY_QWEN_IMAGE_SIDE = 32
# Qwen-Image's scheduler/scheduler_config.json dynamic-shift fields (its shift_terminal 0.02 stretches diffusers'
# schedule to end at 0.02; otca's schedules end at 0, so it has no counterpart here).
QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5,
    "max_shift": 0.9,
}
QWEN_IMAGE_TEXT_PARTS = ("text_encoder", "tokenizer")
# The tiny tokenizer's whole-word pieces (so the template prefix is 34 tokens, as with the real vocabulary) and its
# special tokens (the template's and Qwen2.5-VL's vision markers, which the text model's config names).
TINY_QWEN_WORDS = (
    "system", "Describe", " the", " image", " by", " detailing", " color", " shape", " size", " texture", " quantity",
    " text", " spatial", " relationships", " of", " objects", " and", " background", "user", "assistant",
)
TINY_QWEN_SPECIAL = (
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass(frozen=True)
class QwenImageCond(BatchedCond):
    """Qwen-Image text conditioning for B prompts (``neg_*`` only when the policy runs CFG); sliceable along B.

    Embeddings are zero past each prompt's ``n_i`` tokens and the mask is 1 on the first ``n_i`` positions, 0 after.
    """

    prompt_embeds: torch.Tensor  # [B, L, D]
    prompt_mask: torch.Tensor  # [B, L] int64
    neg_prompt_embeds: torch.Tensor | None = None  # [B, L, D]
    neg_prompt_mask: torch.Tensor | None = None  # [B, L]


class QwenImageTextEncoder(FrozenTextEncoders):
    """The frozen Qwen2.5-VL text model: ``prompts -> {"prompt_embeds": [B, L, D], "prompt_mask": [B, L]}``,
    ``L = max_sequence_length`` (``QwenImagePipeline._get_qwen_prompt_embeds`` then ``encode_prompt``'s cut, padded
    with zeros to a fixed L so that batches and caches of different prompts line up)."""

    text_parts = QWEN_IMAGE_TEXT_PARTS

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizers[0](
            [QWEN_IMAGE_TEMPLATE.format(p) for p in prompts], max_length=QWEN_TOKENIZER_MAX + QWEN_IMAGE_DROP,
            padding=True, truncation=True, return_tensors="pt",
        )
        encoder: Any = self.text_encoder
        device = self._device(encoder)
        mask = tok.attention_mask.to(device)  # [B, T]
        out = encoder(input_ids=tok.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        h = out.hidden_states[-1]  # [B, T, D]
        length = self.max_sequence_length
        embeds = h.new_zeros(len(prompts), length, h.shape[-1])  # [B, L, D]
        kept = torch.zeros(len(prompts), length, dtype=torch.long, device=device)  # [B, L]
        for i in range(len(prompts)):
            tokens = h[i][mask[i].bool()][QWEN_IMAGE_DROP:][:length]  # [n_i, D]: real tokens past the template's
            embeds[i, : len(tokens)] = tokens
            kept[i, : len(tokens)] = 1
        return {"prompt_embeds": embeds, "prompt_mask": kept}


def trim_text(fields: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each ``{"prompt_embeds": [n, L, D], "prompt_mask": [n, L]}`` cut to the longest prompt among them all
    (``[n, L', ...]``, ``L' = max mask sum``): the pipeline pads each batch to its longest prompt only, and the
    transformer's text RoPE and masked attention make the rest padding that changes nothing."""
    longest = max(int(f["prompt_mask"].sum(-1).max()) for f in fields)
    return [{"prompt_embeds": f["prompt_embeds"][:, :longest], "prompt_mask": f["prompt_mask"][:, :longest]}
            for f in fields]


class QwenImagePolicy(DiffusersPolicy):
    """A ``QwenImageTransformer2DModel`` with its VAE and Qwen2.5-VL text encoder (or an embedding cache) as a
    FlowPolicy over latents ``[B, C, h, w]`` (C = the VAE's ``z_dim``).

    ``velocity`` returns ``v = noise - x0`` in x's dtype (network in its own dtype, guidance in fp32);
    ``decode`` gives ``[B, 3, H, W]`` in [0, 1].
    """

    kind = "qwen-image"
    cond_type = QwenImageCond
    text_parts = QWEN_IMAGE_TEXT_PARTS

    @staticmethod
    def pipeline_classes() -> tuple[Any, Any, tuple[Any, ...]]:
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration

        return QwenImageTransformer2DModel, AutoencoderKLQwenImage, (Qwen2_5_VLForConditionalGeneration,)

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        text: TextFn,
        *,
        height: int,
        width: int,
        true_cfg_scale: float = QWEN_IMAGE_CFG,
        negative_prompt: str = QWEN_IMAGE_NEGATIVE,
        scheduler_config: dict[str, Any] | None = None,
    ):
        tcfg: Any = transformer.config
        vcfg: Any = vae.config
        factor = 2 ** len(vcfg.temperal_downsample)  # the pipeline's vae_scale_factor (8 for Qwen-Image)
        check_pixel_size(height, width, 2 * factor, 2 * factor)
        c = vcfg.z_dim
        out_channels = tcfg.out_channels or tcfg.in_channels
        if tcfg.patch_size != 2 or tcfg.in_channels != 4 * c or out_channels != c:
            raise ValueError(
                f"QwenImagePolicy: a VAE of z_dim {c} needs a transformer with patch_size 2, in_channels {4 * c} and "
                f"out_channels {c}, got {tcfg.patch_size}, {tcfg.in_channels} and {out_channels}"
            )
        if tcfg.guidance_embeds:
            raise ValueError("QwenImagePolicy: guidance-distilled transformers (guidance_embeds) are not supported")
        if true_cfg_scale < 1:
            raise ValueError(f"QwenImagePolicy: true_cfg_scale must be >= 1 (1 = off), got {true_cfg_scale}")
        super().__init__(
            text, latent_shape=(c, height // factor, width // factor), cfg_on=true_cfg_scale > 1,
            negative_prompt=negative_prompt,
        )
        self.transformer = transformer
        self.vae = frozen_vae(vae)
        self.true_cfg_scale = float(true_cfg_scale)
        self.scheduler_config = dict(QWEN_IMAGE_SCHEDULER_CONFIG if scheduler_config is None else scheduler_config)
        # Rollout and re-evaluation must see one deterministic network (ratio 1): no dropout, as after from_pretrained.
        self.eval()

    @property
    def dynamic_shift(self) -> DynamicShift | None:
        """QwenImagePipeline's resolution-dependent shift (``sampler.shift: auto``) at this policy's image token
        count ``(h/2)(w/2)``; None when the scheduler config turns dynamic shifting off."""
        _, h, w = self.latent_shape
        return scheduler_dynamic_shift(self.scheduler_config, (h // 2) * (w // 2))

    def _transformer(
        self, tokens: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
        *, img_shape: tuple[int, int, int],
    ) -> torch.Tensor:
        """One transformer forward: tokens ``[n, S, 4C]`` at ``sigma [n]`` -> velocity tokens ``[n, S, 4C]``."""
        mask = prompt_mask.bool()  # [n, L']
        return self.transformer(
            hidden_states=tokens,
            timestep=sigma,  # in [0, 1]: the pipeline passes t / 1000 and the transformer scales it back
            encoder_hidden_states=prompt_embeds.to(tokens.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # the pipeline drops an all-ones mask
            img_shapes=[[img_shape]] * len(tokens),
            return_dict=False,
        )[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: QwenImageCond) -> torch.Tensor:
        """Flow velocity ``[B, C, h, w]`` (x's dtype) at ``x [B, C, h, w]`` and ``sigma [B]``; with true CFG
        ``v = cfg_renorm(v_neg + s (v_cond - v_neg), v_cond)`` per token (Ho & Salimans 2022, Eq. 6, then
        QwenImagePipeline's norm rescaling), combined in fp32."""
        b, _, h, w = x.shape
        self._check_batch(cond, b)
        p = self._param()
        tokens = pack_latents(x).to(p.dtype)  # [B, S, 4C]
        t = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(b)  # [B]
        negative = cond.negative() if self.cfg_on else None
        trimmed = trim_text([cond.positive()] + ([negative] if negative is not None else []))
        net = functools.partial(self._transformer, img_shape=(1, h // 2, w // 2))
        v = guided_forward(
            net, tokens, t, trimmed[0], trimmed[1] if negative is not None else None, self.true_cfg_scale, renorm=True
        )  # [B, S, 4C] fp32
        return unpack_latents(v, h, w).to(x.dtype)  # [B, C, h, w]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, 3, H, W]`` (fp32) from latents ``[B, C, h, w]``: ``z = x * latents_std +
        latents_mean`` as a one-frame video, decoded, the frame taken."""
        vae: Any = self.vae
        cfg = vae.config
        mean = torch.tensor(cfg.latents_mean, device=x.device).view(1, -1, 1, 1)  # [1, C, 1, 1]
        std = torch.tensor(cfg.latents_std, device=x.device).view(1, -1, 1, 1)  # [1, C, 1, 1]
        z = (x.float() * std + mean).to(vae.dtype)[:, :, None]  # [B, C, 1, h, w]
        return vae_to_unit(vae.decode(z, return_dict=False)[0][:, :, 0])  # [B, 3, H, W]


# ------------------------------------------------------------------------------------------------ building


class QwenImageOptions(DiffusersOptions):
    """``model.options`` of model kind ``qwen-image`` (the shared ones documented in :class:`DiffusersOptions`)."""

    true_cfg_scale: float = Field(QWEN_IMAGE_CFG, ge=1)
    """True classifier-free guidance against negative_prompt, rollout and training alike, on when > 1 (with the
    pipeline's per-token norm rescaling); the pipeline's default 4.0."""
    negative_prompt: str = QWEN_IMAGE_NEGATIVE
    """The unconditional prompt of classifier-free guidance (QwenImagePipeline's docs use a single space)."""
    resolution: int | None = Field(None, gt=0)
    """Square image side in pixels, a multiple of 16; default 1024 (32 for tiny)."""
    max_sequence_length: int = Field(QWEN_IMAGE_TEXT_TOKENS, ge=1, le=QWEN_TOKENIZER_MAX)
    """Text tokens kept per prompt (after the template's 34); the pipeline's default 512, at most 1024."""


def tiny_qwen_image_components(seed: int = 0, text: bool = True) -> dict[str, Any]:
    """Random tiny Qwen-Image parts keyed by their diffusers sub-folder names (fp32).

    The structure is Qwen-Image's at a small width: a transformer over 2x2-packed 16-channel latents (in_channels
    64, out_channels 16) with 2 blocks of 2 heads of 16 dims; a VAE with Qwen-Image's z_dim 16, latents_mean/std
    and 8x spatial compression at a width of 4 channels; a two-layer Qwen2.5-VL (multimodal RoPE, a one-block
    vision tower) of width 32 = the transformer's joint_attention_dim, over a byte-level Qwen2 tokenizer.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts: dict[str, Any] = {
            # rope axes (4 + 6 + 6) add up to the head dim, as Qwen-Image's (16 + 56 + 56) = 128
            "transformer": QwenImageTransformer2DModel(
                patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
            ),
            "vae": AutoencoderKLQwenImage(
                base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
            ),
        }
        if text:
            tok = tiny_qwen2_tokenizer(TINY_QWEN_WORDS, TINY_QWEN_SPECIAL)
            start, end, _, image, video = tok.convert_tokens_to_ids(list(TINY_QWEN_SPECIAL[2:]))
            eos = tok.convert_tokens_to_ids("<|im_end|>")
            config = Qwen2_5_VLConfig(
                text_config={
                    # mrope sections (2, 3, 3) add up to half the head dim, as Qwen2.5-VL's (16, 24, 24) of 128
                    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "vocab_size": len(tok), "max_position_embeddings": 2048,
                    "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                    "rope_theta": 1e6, "bos_token_id": tok.pad_token_id, "eos_token_id": eos,
                    "pad_token_id": tok.pad_token_id,
                },
                vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                               "out_hidden_size": 32},
                vision_start_token_id=start, vision_end_token_id=end, image_token_id=image, video_token_id=video,
            )
            parts["text_encoder"] = Qwen2_5_VLForConditionalGeneration(config)
            parts["tokenizer"] = tok
    return parts


def qwen_image_policy_from_components(inputs: BuildInputs[QwenImageOptions]) -> QwenImagePolicy:
    """Assemble the policy from :func:`tiny_qwen_image_components` / ``QwenImagePolicy.load_components`` parts and
    the options; with a ``cache`` the text-encoder parts are not needed."""
    opts = inputs.opts
    text = inputs.text(QwenImageTextEncoder, opts.max_sequence_length)
    side = TINY_QWEN_IMAGE_SIDE if opts.tiny else QWEN_IMAGE_SIDE
    height, width = opts.size(side, side)
    return QwenImagePolicy(
        cast_module(inputs.parts["transformer"], inputs.dtype),
        cast_module(inputs.parts["vae"], inputs.vae_dtype),
        text,
        height=height,
        width=width,
        true_cfg_scale=opts.true_cfg_scale,
        negative_prompt=opts.negative_prompt,
        scheduler_config=read_scheduler_config(inputs.root),
    )


@register_policy("qwen-image")
def build_qwen_image(cfg: ModelConfig, device: torch.device) -> QwenImagePolicy:
    """Model kind ``qwen-image``: a local Qwen-Image diffusers directory at ``cfg.path`` (or ``options.tiny``), with
    ``cfg.lora`` and gradient checkpointing on the transformer, weights and text encoder in ``cfg.dtype``."""
    return build_diffusers_policy(
        cfg, device, QwenImagePolicy, QwenImageOptions, tiny_qwen_image_components, qwen_image_policy_from_components
    )
