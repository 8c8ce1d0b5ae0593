"""Center-crop rounding: transformers' floor vs torchvision's half-to-even on odd margins, by hand, against the
reference libraries where importable, and through the ImageReward and LAION-aesthetic rewards."""

import numpy as np
import pytest
import torch

from otca.rewards.crop import crop_offset
from otca.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CropPrep, center_crop, normalize
from otca.rewards.registry import build_reward


@pytest.mark.parametrize(
    "margin, floor, half_even",
    # margin / 2 = 0.5 -> 0 (even), 1.5 -> 2, 2.5 -> 2, 3.5 -> 4, 37.5 -> 38: the two differ at margins 3 mod 4
    [(0, 0, 0), (1, 0, 0), (2, 1, 1), (3, 1, 2), (4, 2, 2), (5, 2, 2), (7, 3, 4), (9, 4, 4), (11, 5, 6), (75, 37, 38)],
)
def test_crop_offset_by_hand(margin, floor, half_even):
    assert crop_offset(224 + margin, 224, "floor") == floor
    assert crop_offset(224 + margin, 224, "half-even") == half_even


def test_crop_offset_bad_input():
    with pytest.raises(ValueError, match="rounding"):
        crop_offset(10, 4, "round")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="between 0 and the image size"):
        crop_offset(4, 10)


def _image(h, w, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_224x299_crop_by_hand():
    # a 224x299 image: the short side is already 224 (no resize), the margin 75 is odd -> left 37 or 38
    x = _image(224, 299)
    torch.testing.assert_close(center_crop(x, (224, 224)), x[..., :, 37:261], rtol=0, atol=0)
    torch.testing.assert_close(center_crop(x, (224, 224), "half-even"), x[..., :, 38:262], rtol=0, atol=0)
    ours = CropPrep(224, (224, 224), rounding="half-even")(x)
    torch.testing.assert_close(ours, normalize(x[..., :, 38:262], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    # transposed: the top offset rounds the same way
    xt = _image(299, 224, seed=1)
    torch.testing.assert_close(center_crop(xt, (224, 224), "half-even"), xt[..., 38:262, :], rtol=0, atol=0)


def test_floor_is_transformers_clip_image_processor():
    from PIL import Image

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as Processor
    img = (np.random.default_rng(0).random((224, 299, 3)) * 255).astype(np.uint8)
    ref = Processor()(images=Image.fromarray(img), return_tensors="pt")["pixel_values"]  # [1, 3, 224, 224]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    for rounding, left in (("floor", 37), ("half-even", 38)):
        expected = normalize(x[..., :, left : left + 224], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        err = float((expected - ref).abs().max())
        assert (err < 1e-5) == (rounding == "floor"), (rounding, err)


def test_half_even_is_torchvision_center_crop():
    tv = pytest.importorskip("torchvision.transforms")
    for h, w in [(224, 299), (299, 224), (227, 224), (229, 231), (224, 303)]:
        x = _image(h, w)
        torch.testing.assert_close(center_crop(x, (224, 224), "half-even"), tv.CenterCrop(224)(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["imagereward", "laion-aesthetic"])
def test_torchvision_rewards_crop_half_even(name):
    # tiny twins work at 32 px; a 32x47 image has margin 15 (3 mod 4): torchvision starts at 8, transformers at 7
    reward = build_reward(name, tiny=True)
    x = _image(32, 47, seed=3)
    prompts = ["a photo"]
    whole = reward(x, prompts)
    assert torch.equal(whole, reward(x[..., :, 8:40].contiguous(), prompts))
    assert not torch.equal(whole, reward(x[..., :, 7:39].contiguous(), prompts))


def test_transformers_rewards_keep_floor():
    reward = build_reward("clip-t", tiny=True)
    x = _image(32, 47, seed=3)
    whole = reward(x, ["a photo"])
    assert torch.equal(whole, reward(x[..., :, 7:39].contiguous(), ["a photo"]))
