"""The digits world's 'VAE': an exact, parameter-free pixel codec (space-to-depth).

``encode`` maps pixels in [0, 1] to [-1, 1] and folds each 2x2 pixel block into 4 channels:
``[B, 1, 16, 16] -> [B, 4, 8, 8]``. FLUX's own 2x2 token packing then gives 16 tokens of 16 channels, the
shape of a real FLUX latent sequence in miniature. Why not a tiny learned autoencoder: an exact codec costs no
pretraining time, decodes for free inside every reward call, and leaves no reconstruction error for RL to
exploit or to be blamed for; the generator is then the only thing that can make a digit good or bad.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from otca.worlds.digits.data import IMAGE_SIZE


class PixelCodec:
    """Exact codec ``pixels [B, channels, S, S] in [0, 1] <-> latents [B, channels * f^2, S/f, S/f]``.

    ``decode(encode(p)) == p`` up to fp32 rounding of ``2p - 1``; ``decode`` clamps to [0, 1], so any latent
    decodes to valid pixels.
    """

    def __init__(self, image_size: int = IMAGE_SIZE, channels: int = 1, factor: int = 2):
        if image_size % factor:
            raise ValueError(f"PixelCodec: image_size {image_size} must be divisible by factor {factor}")
        self.image_size, self.channels, self.factor = image_size, channels, factor
        self.latent_shape = (channels * factor**2, image_size // factor, image_size // factor)  # (C, h, w)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"PixelCodec.encode: expected pixels [B, {shape}] in [0, 1], got {tuple(pixels.shape)}")
        return F.pixel_unshuffle(2.0 * pixels - 1.0, self.factor)  # [B, C, h, w]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = F.pixel_shuffle(latents, self.factor)  # [B, channels, S, S] in ~[-1, 1]
        return ((pixels + 1.0) / 2.0).clamp(0.0, 1.0)
