"""The Wan 2.1 / 2.2 text-to-video adapter: diffusers ``WanTransformer3DModel`` (one, or Wan2.2-A14B's two
noise-level experts) as a FlowPolicy.

Conventions follow diffusers' ``pipelines/wan/pipeline_wan.py`` (read, not copied): latents
``[B, C, 1 + (F - 1)/t, H/s, W/s]`` (t, s the VAE's temporal and spatial factors, C its ``z_dim``) are the
VAE's ``(z - latents_mean) / latents_std``; the transformer takes the timestep as ``1000 * sigma``; the text
conditioning is UMT5's last hidden states with the padding positions zeroed; classifier-free guidance against
a negative prompt runs inside ``velocity`` whenever the scale is > 1. With two experts (Wan2.2-A14B),
``transformer`` denoises where ``1000 * sigma >= 1000 * boundary_ratio`` and ``transformer_2`` below, each with
its own guidance scale; both are trained.

Wan2.2-TI2V-5B's pipeline feeds one timestep per latent token (``expand_timesteps``); for text-to-video every
token carries the same value, so the per-sample timestep used here gives the same network output.

Registered as model kind ``"wan"``: ``model.path`` is a local ``WanPipeline`` directory, or
``model.options.tiny: true`` builds a random twin in-process.
"""

from __future__ import annotations

import functools
import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from pydantic import Field

from otca.models.build import BuildInputs, build_diffusers_policy
from otca.models.conditioning import BatchedCond, FrozenTextEncoders, TextFn
from otca.models.diffusers_policy import DiffusersPolicy
from otca.models.guidance import TIMESTEP_SCALE, guided_forward, sigma_to_timestep
from otca.models.options import DiffusersOptions
from otca.models.prepare import cast_module
from otca.models.registry import register_policy
from otca.models.vae import check_pixel_size, frozen_vae, vae_to_unit
from otca.testing.models import tiny_t5_encoder, tiny_t5_tokenizer

if TYPE_CHECKING:
    from otca.config import ModelConfig

# WanPipeline's defaults: guidance 5.0 (also DanceGRPO's cfg for Wan), 512 UMT5 tokens, 480x832 with 81 frames.
WAN_GUIDANCE = 5.0
WAN_TEXT_TOKENS = 512
WAN_VIDEO = {"height": 480, "width": 832, "num_frames": 81}
TINY_WAN_VIDEO = {"height": 32, "width": 32, "num_frames": 5}
WAN_TEXT_PARTS = ("text_encoder", "tokenizer")


@dataclass(frozen=True)
class WanCond(BatchedCond):
    """Wan text conditioning for B prompts (``neg_*`` only when the policy runs CFG); sliceable along B."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    neg_prompt_embeds: torch.Tensor | None = None  # [B, L, D]


def clean_prompt(text: str) -> str:
    """WanPipeline's ``prompt_clean`` without its optional ``ftfy`` pass (kept dependency-free and deterministic):
    HTML entities unescaped twice, whitespace runs collapsed, ends stripped."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class WanTextEncoder(FrozenTextEncoders):
    """The frozen UMT5 encoder: ``prompts -> {"prompt_embeds": [B, L, D]}``, zeros past each prompt's tokens."""

    text_parts = WAN_TEXT_PARTS
    text_encoder: torch.nn.Module  # the submodule of the ``text_encoder`` folder (FrozenTextEncoders)

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizers[0](
            [clean_prompt(p) for p in prompts], padding="max_length", max_length=self.max_sequence_length,
            truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        device = self._device(self.text_encoder)
        mask = tok.attention_mask.to(device)  # [B, L]
        h = self.text_encoder(tok.input_ids.to(device), mask).last_hidden_state  # [B, L, D]
        # The pipeline cuts each sequence at its length and pads with zeros: the same as zeroing the padding.
        return {"prompt_embeds": h.masked_fill(mask[..., None] == 0, 0.0)}


class WanPolicy(DiffusersPolicy):
    """Wan transformer(s), VAE and UMT5 encoder (or an embedding cache) as a FlowPolicy over video latents.

    Latents ``[B, C, f, h, w]``; ``velocity`` returns ``v = noise - x0`` in x's dtype (network in its own dtype,
    guidance in fp32); ``decode`` gives ``[B, 3, F, H, W]`` in [0, 1].
    """

    kind = "wan"
    cond_type = WanCond
    text_parts = WAN_TEXT_PARTS
    vae: Any  # a diffusers AutoencoderKLWan (Any: mypy reads its ``config`` as a plain dict)

    @staticmethod
    def pipeline_classes() -> tuple[Any, Any, tuple[Any, ...]]:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5EncoderModel

        return WanTransformer3DModel, AutoencoderKLWan, (UMT5EncoderModel,)

    @classmethod
    def load_components(cls, root: Path, *, text: bool, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
        """:meth:`DiffusersPolicy.load_components`, plus ``transformer_2`` for two-expert models (a folder of that
        name). ``boundary_ratio`` is read apart (:func:`_boundary_ratio`)."""
        parts = super().load_components(root, text=text, dtype=dtype, vae_dtype=vae_dtype)
        if (root / "transformer_2").is_dir():
            transformer_cls = cls.pipeline_classes()[0]
            parts["transformer_2"] = transformer_cls.from_pretrained(root / "transformer_2", torch_dtype=dtype)
        return parts

    def __init__(
        self,
        transformer: Any,
        vae: Any,
        text: TextFn,
        *,
        height: int,
        width: int,
        num_frames: int,
        guidance_scale: float = WAN_GUIDANCE,
        negative_prompt: str = "",
        transformer_2: torch.nn.Module | None = None,
        boundary_ratio: float | None = None,
        guidance_scale_2: float | None = None,
    ):
        vcfg = vae.config
        tf, sf = vcfg.scale_factor_temporal, vcfg.scale_factor_spatial
        _, ph, pw = transformer.config.patch_size
        check_pixel_size(height, width, sf * ph, sf * pw)
        if num_frames < 1 or (num_frames - 1) % tf:
            raise ValueError(f"model.options.num_frames: expected 1 + a multiple of {tf}, got {num_frames}")
        if transformer.config.in_channels != vcfg.z_dim:
            raise ValueError(f"Wan: transformer in_channels {transformer.config.in_channels} != VAE z_dim {vcfg.z_dim}")
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("Wan: transformer_2 and boundary_ratio must be given together (Wan2.2 two-expert models)")
        if boundary_ratio is not None and not 0 < boundary_ratio < 1:
            raise ValueError(f"Wan: boundary_ratio must be in (0, 1), got {boundary_ratio}")
        if guidance_scale_2 is not None and transformer_2 is None:
            raise ValueError("model.options.guidance_scale_2: only for two-expert models (a transformer_2 folder)")
        scale_2 = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        super().__init__(
            text,
            latent_shape=(vcfg.z_dim, (num_frames - 1) // tf + 1, height // sf, width // sf),
            cfg_on=max(guidance_scale, scale_2 if transformer_2 is not None else 0.0) > 1,
            negative_prompt=negative_prompt,
        )
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.vae = frozen_vae(vae)
        self.guidance_scale = float(guidance_scale)
        self.guidance_scale_2 = float(scale_2)
        self.boundary_ratio = boundary_ratio
        # Rollout and re-evaluation must see one deterministic network (ratio 1): no dropout, as after from_pretrained.
        self.eval()

    def denoisers(self) -> list[torch.nn.Module]:
        """The trained networks: every expert."""
        return [m for m in (self.transformer, self.transformer_2) if m is not None]

    @staticmethod
    def _net(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """One pass of expert ``net``: ``x [n, C, f, h, w]`` in its dtype, ``t [n]`` in [0, 1000] -> same shape."""
        return net(hidden_states=x, timestep=t, encoder_hidden_states=prompt_embeds.to(x.dtype), return_dict=False)[0]

    def _expert_velocity(
        self, net: torch.nn.Module, scale: float, x: torch.Tensor, t: torch.Tensor, cond: WanCond
    ) -> torch.Tensor:
        """Guided velocity ``[n, C, f, h, w]`` fp32 of one expert."""
        call = functools.partial(self._net, net)
        return guided_forward(call, x.to(cast(torch.dtype, net.dtype)), t, cond.positive(), cond.negative(), scale)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: WanCond) -> torch.Tensor:
        """Flow velocity ``[B, C, f, h, w]`` (x's dtype) at ``x [B, C, f, h, w]`` and ``sigma [B]``, CFG inside."""
        b = x.shape[0]
        self._check_batch(cond, b)
        t = sigma_to_timestep(sigma, b, x.device)  # [B]
        if self.transformer_2 is None:
            return self._expert_velocity(self.transformer, self.guidance_scale, x, t, cond).to(x.dtype)
        # Expert routing of pipeline_wan.py: high noise (t >= boundary_ratio * 1000) -> transformer.
        high = t >= cast(float, self.boundary_ratio) * TIMESTEP_SCALE  # [B] (set with transformer_2)
        v = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [B, C, f, h, w]
        routes = ((self.transformer, self.guidance_scale, high), (self.transformer_2, self.guidance_scale_2, ~high))
        for net, scale, sel in routes:
            idx = sel.nonzero().squeeze(1)  # [n]
            if len(idx):
                v = v.index_copy(0, idx, self._expert_velocity(net, scale, x[idx], t[idx], cond[idx]))
        return v.to(x.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Video in [0, 1] ``[B, 3, F, H, W]`` (fp32) from latents ``[B, C, f, h, w]``: ``z = x * std + mean``."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=x.device).view(1, -1, 1, 1, 1)  # [1, C, 1, 1, 1]
        std = torch.tensor(cfg.latents_std, device=x.device).view(1, -1, 1, 1, 1)  # [1, C, 1, 1, 1]
        z = (x.float() * std + mean).to(self.vae.dtype)  # [B, C, f, h, w]
        return vae_to_unit(self.vae.decode(z, return_dict=False)[0])  # [B, 3, F, H, W]


# ------------------------------------------------------------------------------------------------ building


class WanOptions(DiffusersOptions):
    """``model.options`` of model kind ``wan`` (the shared ones documented in :class:`DiffusersOptions`; the
    default float32 ``vae_dtype`` is also WanPipeline's example's choice)."""

    guidance_scale: float = Field(WAN_GUIDANCE, ge=0)
    """Classifier-free guidance scale (the high-noise expert's with two experts), rollout and training; on when > 1."""
    guidance_scale_2: float | None = Field(None, ge=0)
    """Guidance scale of the low-noise expert (Wan2.2-A14B); default: guidance_scale."""
    resolution: int | None = Field(None, gt=0)
    """Square frame side in pixels; default 480x832 (32x32 for tiny)."""
    num_frames: int | None = Field(None, ge=1)
    """Frames per video, 1 + a multiple of the VAE's temporal factor (4); default 81 (5 for tiny)."""
    max_sequence_length: int = Field(WAN_TEXT_TOKENS, ge=1)
    """UMT5 tokens per prompt."""
    boundary_ratio: float | None = Field(None, gt=0, lt=1)
    """Two-expert models: the sigma where the low-noise expert takes over; default: model_index.json's."""


def tiny_wan_components(seed: int = 0, text: bool = True) -> dict[str, Any]:
    """Random tiny Wan parts keyed by their diffusers sub-folder names (fp32; one expert).

    The VAE keeps Wan 2.1's structure (z_dim 16 with its latents_mean/std, 4x temporal and 8x spatial
    compression) at a width of 4 channels; the transformer has 2 blocks of 2 heads of 16 dims.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts: dict[str, Any] = {
            "transformer": WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
                text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
            ),
            "vae": AutoencoderKLWan(
                base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
            ),
        }
        if text:
            parts["text_encoder"] = tiny_t5_encoder(UMT5EncoderModel, UMT5Config, tok, d_model=32, num_heads=4)
            parts["tokenizer"] = tok
    return parts


def _boundary_ratio(root: Path) -> float | None:
    """``boundary_ratio`` of a WanPipeline directory's model_index.json (None if absent)."""
    index = root / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("boundary_ratio")
    except json.JSONDecodeError as e:
        raise ValueError(f"model 'wan': '{index}' is not valid JSON ({e})") from None


def wan_policy_from_components(inputs: BuildInputs[WanOptions], boundary_ratio: float | None = None) -> WanPolicy:
    """Assemble the policy from :func:`tiny_wan_components` / ``WanPolicy.load_components`` parts and the options;
    with a ``cache`` the text-encoder parts are not needed. ``boundary_ratio`` (default: the model directory's
    model_index.json's) is used for a two-expert model unless ``opts.boundary_ratio`` overrides it."""
    opts, parts, dtype = inputs.opts, inputs.parts, inputs.dtype
    if boundary_ratio is None and inputs.root is not None:
        boundary_ratio = _boundary_ratio(inputs.root)
    text = inputs.text(WanTextEncoder, opts.max_sequence_length)
    transformer_2 = parts.get("transformer_2")
    boundary = boundary_ratio if opts.boundary_ratio is None else opts.boundary_ratio
    if transformer_2 is not None and boundary is None:
        raise ValueError("model 'wan': a transformer_2 folder needs boundary_ratio (model_index.json or model.options)")
    video = TINY_WAN_VIDEO if opts.tiny else WAN_VIDEO
    height, width = opts.size(video["height"], video["width"])
    return WanPolicy(
        cast_module(parts["transformer"], dtype),
        cast_module(parts["vae"], inputs.vae_dtype),
        text,
        height=height,
        width=width,
        num_frames=opts.num_frames or video["num_frames"],
        guidance_scale=opts.guidance_scale,
        guidance_scale_2=opts.guidance_scale_2,
        negative_prompt=opts.negative_prompt,
        transformer_2=None if transformer_2 is None else cast_module(transformer_2, dtype),
        boundary_ratio=boundary if transformer_2 is not None else None,
    )


@register_policy("wan")
def build_wan(cfg: ModelConfig, device: torch.device) -> WanPolicy:
    """Model kind ``wan``: a local Wan 2.1/2.2 T2V diffusers directory at ``cfg.path`` (or ``options.tiny``), with
    ``cfg.lora`` and gradient checkpointing on every expert, weights and text encoder in ``cfg.dtype``."""
    return build_diffusers_policy(cfg, device, WanPolicy, WanOptions, tiny_wan_components, wan_policy_from_components)
