"""JPEG compressibility (DDPO's reward): sizes against Pillow directly, ordering, shapes, errors."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from otca.rewards.jpeg import JpegCompressibility, jpeg_kilobytes
from otca.rewards.registry import build_reward


def pil_kilobytes(array_u8: np.ndarray, quality: int = 95) -> float:
    """The reference: Pillow's JPEG byte count of a uint8 [H, W] or [H, W, 3] array, in kB."""
    buf = io.BytesIO()
    Image.fromarray(array_u8).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000


def test_registered_under_its_name():
    r = build_reward("jpeg-compressibility")
    assert r.name == "jpeg-compressibility" and r.quality == 95


@pytest.mark.parametrize("channels", [1, 3])
def test_score_is_minus_pillow_kilobytes(channels):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, channels, 16, 16, generator=g)  # [B, C, H, W]
    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B, H, W, C]
    expected = [-pil_kilobytes(a[:, :, 0] if channels == 1 else a) for a in u8]
    got = JpegCompressibility()(x, [""] * 3)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_blank_beats_real_beats_noise():
    from otca.worlds.digits.data import load_digit_images

    digits = load_digit_images("test")[0][:8]
    r = JpegCompressibility()
    blank = r(torch.zeros(8, 1, 16, 16), [""] * 8)
    real = r(digits, [""] * 8)
    noise = r(torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)), [""] * 8)
    assert (blank > real).all() and (real > noise).all()
    assert (blank < 0).all()  # the JPEG header alone costs bytes


def test_lower_quality_compresses_more():
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    assert (build_reward("jpeg-compressibility", quality=50)(x, ["", ""]) > JpegCompressibility()(x, ["", ""])).all()


def test_video_is_the_mean_over_frames():
    g = torch.Generator().manual_seed(3)
    video = torch.rand(2, 3, 4, 16, 16, generator=g)  # [B, C, F, H, W]
    video[:, :, 0] = 0.0  # one blank frame, so the frames differ in size
    got = JpegCompressibility()(video, ["", ""])
    per_frame = torch.tensor([[jpeg_kilobytes(video[b, :, f]) for f in range(4)] for b in range(2)])  # [B, F]
    assert got.shape == (2,)
    assert torch.allclose(got, -per_frame.mean(dim=1))


def test_any_dtype_and_grad_input_gives_cpu_float32():
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    out = JpegCompressibility()(x, ["", ""])
    assert out.dtype == torch.float32 and out.device.type == "cpu" and not out.requires_grad


def test_out_of_range_pixels_are_clamped_like_ddpo():
    r = JpegCompressibility()
    assert torch.equal(r(torch.full((1, 1, 8, 8), 2.0), [""]), r(torch.ones(1, 1, 8, 8), [""]))


@pytest.mark.parametrize("shape", [(2, 2, 8, 8), (2, 8, 8), (2, 4, 1, 8, 8)])
def test_bad_shapes_name_the_reward(shape):
    with pytest.raises(ValueError, match="jpeg-compressibility: pixels must be"):
        JpegCompressibility()(torch.zeros(shape), ["", ""])


def test_bad_quality_is_an_error():
    with pytest.raises(ValueError) as e:
        build_reward("jpeg-compressibility", quality=0)
    assert str(e.value).startswith("reward 'jpeg-compressibility': option 'quality': Input should be greater than")
    with pytest.raises(ValueError, match="reward 'jpeg-compressibility': option 'device' does not apply"):
        build_reward("jpeg-compressibility", device="cuda")
