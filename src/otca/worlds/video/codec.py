"""The video world's 'VAE': an exact, parameter-free codec, shaped as the Wan adapter expects its VAE.

``encode`` maps pixels in [0, 1] to [-1, 1] and folds each 2x2 pixel block of every frame into 4 channels:
``[B, 1, F, 16, 16] -> [B, 4, F, 8, 8]`` (no temporal compression). It carries the config fields
:class:`~otca.models.wan.WanPolicy` reads from ``AutoencoderKLWan`` (``z_dim``, the temporal and spatial scale
factors, ``latents_mean`` 0 and ``latents_std`` 1, so the adapter's latent normalisation is the identity) and
its ``decode(z, return_dict=False)[0]`` returns pixels in [-1, 1] as a VAE does; the adapter maps them to [0, 1].
Exact for the reason the digits world's codec is (docs/design.md): no reconstruction error for RL to exploit.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from otca.worlds.video.data import CANVAS


class VideoPixelCodec(torch.nn.Module):
    """Exact ``pixels [B, ch, F, S, S] in [0, 1] <-> latents [B, ch * f^2, F, S/f, S/f]`` (space-to-depth per frame).

    ``decode(encode(p))[0]`` is ``2p - 1`` exactly up to fp32 rounding; a module without parameters (``dtype``
    float32), so the adapter can freeze it and move it with the policy.
    """

    def __init__(self, canvas: int = CANVAS, channels: int = 1, factor: int = 2):
        super().__init__()
        if canvas % factor:
            raise ValueError(f"VideoPixelCodec: canvas {canvas} must be divisible by factor {factor}")
        self.canvas, self.channels, self.factor = canvas, channels, factor
        z_dim = channels * factor**2
        self.config = SimpleNamespace(
            z_dim=z_dim, scale_factor_temporal=1, scale_factor_spatial=factor,
            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
        )

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def enable_slicing(self) -> None:
        """Nothing to slice: decoding holds no activations (``AutoencoderKLWan``'s method, called by the adapter)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B, ch, F, S, S]`` in [0, 1] -> latents ``[B, ch * f^2, F, S/f, S/f]`` in [-1, 1]."""
        if pixels.ndim != 5 or pixels.shape[1] != self.channels or tuple(pixels.shape[3:]) != (self.canvas,) * 2:
            raise ValueError(f"VideoPixelCodec.encode: expected pixels [B, {self.channels}, F, {self.canvas}, "
                             f"{self.canvas}] in [0, 1], got {tuple(pixels.shape)}")
        b, c, f, s, _ = pixels.shape
        frames = (2.0 * pixels - 1.0).transpose(1, 2).reshape(b * f, c, s, s)  # [B*F, ch, S, S]
        z = F.pixel_unshuffle(frames, self.factor)  # [B*F, ch*f^2, S/f, S/f]
        return z.reshape(b, f, *z.shape[1:]).transpose(1, 2).contiguous()  # [B, ch*f^2, F, S/f, S/f]

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        """Latents ``[B, ch * f^2, F, h, w]`` -> ``(pixels [B, ch, F, h*f, w*f] in ~[-1, 1],)`` (not clamped; the
        adapter's ``vae_to_unit`` clamps after mapping to [0, 1])."""
        b, c, f, h, w = z.shape
        frames = F.pixel_shuffle(z.transpose(1, 2).reshape(b * f, c, h, w), self.factor)  # [B*F, ch, S, S]
        return (frames.reshape(b, f, *frames.shape[1:]).transpose(1, 2).contiguous(),)

    def to_unit(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [0, 1] (what the adapter's ``decode`` computes through this codec)."""
        return ((self.decode(z)[0] + 1.0) / 2.0).clamp(0.0, 1.0)
