"""The VAE conventions of the diffusers pipelines: scaled latents, pixels in [0, 1], pixel sizes the VAE and
the patching accept, and a frozen VAE that decodes one sample at a time."""

from __future__ import annotations

from typing import Any

import torch

from otca.models.prepare import freeze


# The VAEs are diffusers autoencoders, typed Any: mypy reads their ``config`` as a plain dict, whose fields are
# attributes at run time.
def frozen_vae(vae: Any) -> torch.nn.Module:
    """:func:`freeze` plus one-sample-at-a-time decoding (diffusers' ``enable_slicing``): a batch of 1024 px
    images or 81-frame videos would otherwise hold every sample's decoder activations at once."""
    vae.enable_slicing()
    return freeze(vae)


def vae_to_unit(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> pixels in [0, 1], fp32 (diffusers' image/video processors' ``denormalize``)."""
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def check_pixel_size(height: int, width: int, multiple_h: int, multiple_w: int) -> None:
    """A one-line error unless ``height`` and ``width`` are positive multiples of ``multiple_h`` and
    ``multiple_w`` (the VAE's downsampling times the transformer's patch, per axis)."""
    if height <= 0 or width <= 0 or height % multiple_h or width % multiple_w:
        multiples = f"{multiple_h}" if multiple_h == multiple_w else f"{multiple_h} and {multiple_w}"
        raise ValueError(
            f"model.options height/width: expected positive multiples of {multiples}, got {height}x{width}"
        )


def vae_scale_factor(vae: Any) -> int:
    """Spatial downsampling of an ``AutoencoderKL``: 2 per down block after the first (the pipelines'
    ``vae_scale_factor``, 8 for the SD3 and FLUX.1 VAEs)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_scaled_latents(vae: Any, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] ``[B, 3, H, W]`` (fp32) from scaled latents ``x [B, C, h, w]`` of an ``AutoencoderKL``:
    ``z = x / scaling_factor + shift_factor`` then the decoder (pipeline_stable_diffusion_3.py and
    pipeline_flux.py, end of ``__call__``). A VAE without a shift_factor (None) has none to undo."""
    cfg = vae.config
    z = (x.float() / cfg.scaling_factor + (cfg.shift_factor or 0.0)).to(vae.dtype)  # [B, C, h, w]
    return vae_to_unit(vae.decode(z, return_dict=False)[0])  # [B, 3, H, W]


def encode_scaled_latents(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``[B, C, h, w]`` (fp32) of pixels in [0, 1] ``[B, 3, H, W]``: the posterior mean, then
    ``(z - shift_factor) * scaling_factor`` (the img2img pipelines' ``_encode_vae_image`` with the mode of the
    latent distribution: deterministic, the inverse convention of :func:`decode_scaled_latents`)."""
    cfg = vae.config
    z = vae.encode((2 * pixels.float() - 1).to(vae.dtype)).latent_dist.mode()  # [B, C, h, w]
    return (z.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
