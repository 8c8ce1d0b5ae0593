"""Tiny random twins (``options.tiny: true``) of the generators and the reward backbones, and image rewards
scored over video frames (``options.frames: true``). CPU, offline, no files.

References: transformers' own CLIPModel forward for the cosine, a plain per-frame loop for the frame mean,
hand-written token lists for the tiny tokenizers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _helpers import CPU, check_flow_policy_contract, latents
from otca.config import ModelConfig
from otca.models.registry import build_policy
from otca.rewards.base import RewardSet
from otca.rewards.registry import build_reward
from otca.rewards.scorer import FrameMean

torch.set_num_threads(1)

PROMPTS = ["a cat", "A dog on a cat!", "a photo of a tree", ""]
IMAGE_REWARDS = ("clip-t", "pickscore", "laion-aesthetic", "hpsv2.1", "imagereward")
VIDEO_REWARDS = ("videoalign",)


def images(b: int = 4, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth random RGB images ``[b, 3, h, w]`` in [0, 1]."""
    low = torch.rand(b, 3, 5, 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def videos(b: int = 2, f: int = 5, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Random videos ``[b, 3, f, h, w]`` in [0, 1]."""
    return images(b * f, h, w, seed).view(b, f, 3, h, w).transpose(1, 2).contiguous()


# ------------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("name", IMAGE_REWARDS)
def test_tiny_image_reward_scores_are_finite_seeded_and_prompt_or_pixel_sensitive(name):
    r = build_reward(name, tiny=True)
    s = r(images(), PROMPTS)
    assert s.shape == (4,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.equal(build_reward(name, tiny=True)(images(), PROMPTS), s)  # deterministic
    assert not torch.equal(build_reward(name, tiny=True, seed=1)(images(), PROMPTS), s)  # the seed is the weights
    assert not torch.equal(r(images(seed=1), PROMPTS), s)
    assert RewardSet([r])(images(), PROMPTS).shape == (4, 1)


def test_tiny_videoalign_scores_three_columns_in_one_run():
    r = build_reward("videoalign", tiny=True)
    assert r.names == ("videoalign/vq", "videoalign/mq", "videoalign/ta")
    s = r(videos(), PROMPTS[:2])
    assert s.shape == (2, 3) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert not torch.equal(r(videos(seed=1), PROMPTS[:2]), s)
    assert len({float(c) for c in s[0]}) == 3  # three different outputs of the head
    calls = []
    forward = r.forward
    r.forward = lambda inputs: calls.append(1) or forward(inputs)
    try:
        both = RewardSet([r])(videos(), PROMPTS[:2])  # [2, 3]
    finally:
        del r.forward
    assert len(calls) == 1  # one model run for the three objectives, no memo needed
    torch.testing.assert_close(both, s, rtol=0, atol=0)


def test_tiny_videoalign_columns_equal_the_per_dimension_rewards():
    """Each objective alone (``columns: [d]``, its own model run, ``[B]``) is the matching column of ``[B, 3]``;
    a reordered subset keeps its order."""
    x, prompts = videos(), PROMPTS[:2]
    full = build_reward("videoalign", tiny=True)(x, prompts)  # [2, 3]
    for j, d in enumerate(("VQ", "MQ", "TA")):
        one = build_reward("videoalign", tiny=True, columns=[d])
        assert one.names == (f"videoalign/{d.lower()}",)
        torch.testing.assert_close(one(x, prompts), full[:, j], rtol=0, atol=0)
    two = build_reward("videoalign", tiny=True, columns=["TA", "VQ"])(x, prompts)
    torch.testing.assert_close(two, full[:, [2, 0]], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"options.columns \['VQ', 'VQ'\] repeats an objective"):
        build_reward("videoalign", tiny=True, columns=["VQ", "VQ"])


def test_tiny_clip_t_is_the_raw_cosine_of_transformers_clip():
    """clip-t == logits_per_image / exp(logit_scale) of CLIPModel's own forward on the same tokens and the
    32 px resize-and-crop (here a plain resize: the images are square)."""
    from otca.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    r = build_reward("clip-t", tiny=True)
    x = images(h=48, w=48)
    tok = r.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    pix = (F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1) - mean) / std
    with torch.no_grad():
        out = r.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pix)
    expect = out.logits_per_image.diagonal() / r.model.logit_scale.exp()
    torch.testing.assert_close(r(x, PROMPTS), expect, rtol=1e-5, atol=1e-6)
    pick = build_reward("pickscore", tiny=True)
    torch.testing.assert_close(pick(x, PROMPTS), out.logits_per_image.diagonal(), rtol=1e-5, atol=1e-5)


def test_clip_t_and_aesthetic_twins_share_one_backbone_hps_differs():
    clip, aes, hps = (build_reward(n, tiny=True) for n in ("clip-t", "laion-aesthetic", "hpsv2.1"))
    assert clip.model is aes.model  # as with real weights: one ViT-L/14 for both
    assert hps.model is not clip.model and hps.model.config.vision_config.hidden_act == "gelu"


def test_tiny_tokenizers_tokenize_for_real():
    ir = build_reward("imagereward", tiny=True)
    assert ir.tokenizer.tokenize("A cat, OK") == ["a", "c", "##a", "##t", ",", "o", "##k"]
    ids = ir.tokenizer("a cat")["input_ids"]
    assert ir.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "c", "##a", "##t", "[SEP]"]
    assert {"[DEC]", "[ENC]"} <= set(ir.tokenizer.get_vocab())  # BLIP's added tokens
    clip = build_reward("clip-t", tiny=True)
    ids = clip.tokenizer("ab")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 1 and len(ids) == 4  # SOT, 'a', 'b</w>', EOT


@pytest.mark.parametrize("name", [*IMAGE_REWARDS, *VIDEO_REWARDS])
def test_tiny_and_a_path_exclude_each_other(name):
    with pytest.raises(ValueError) as e:
        build_reward(name, tiny=True, path="/data/weights")
    expect = f"reward '{name}': options.tiny builds a random backbone in-process; leave options.path unset"
    assert str(e.value) == expect


# ----------------------------------------------------------------------------------------- frames of videos


@pytest.mark.parametrize("name", IMAGE_REWARDS)
def test_frames_option_scores_the_mean_over_frames(name):
    image_reward, video_reward = build_reward(name, tiny=True), build_reward(name, tiny=True, frames=True)
    assert isinstance(video_reward, FrameMean) and video_reward.name == name
    v = videos(b=2, f=3, h=40, w=48)
    loop = torch.stack([
        torch.stack([image_reward(v[i : i + 1, :, f], PROMPTS[i : i + 1])[0] for f in range(3)]).mean()
        for i in range(2)
    ])  # [2] each frame scored alone with its video's prompt
    torch.testing.assert_close(video_reward(v, PROMPTS[:2]), loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(video_reward(images(), PROMPTS), image_reward(images(), PROMPTS))  # images pass


def test_frame_mean_by_hand_and_input_checks():
    class FirstPixel:
        name = "first-pixel"

        def __call__(self, pixels, prompts):
            assert pixels.ndim == 4 and len(prompts) == pixels.shape[0]
            return pixels[:, 0, 0, 0] + torch.tensor([float(len(p)) for p in prompts])

    v = torch.zeros(2, 3, 4, 2, 2)
    v[0, 0, :, 0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.6])
    v[1, 0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    out = FrameMean(FirstPixel())(v, ["ab", ""])
    torch.testing.assert_close(out, torch.tensor([0.3 + 2, 0.25]))
    with pytest.raises(ValueError, match="1 videos but 2 prompts"):
        FrameMean(FirstPixel())(v[:1], ["a", "b"])
    with pytest.raises(ValueError, match=r"pixels must lie in \[0, 1\]"):
        FrameMean(FirstPixel())(v - 1, ["a", "b"])


def test_video_to_an_image_reward_without_frames_is_still_an_error():
    with pytest.raises(ValueError, match=r"expects images \[B, C, H, W\]"):
        build_reward("clip-t", tiny=True)(videos(), PROMPTS[:2])


# ---------------------------------------------------------------------------------------------- generators


@pytest.mark.parametrize(
    "kind, options, latent, pixels",
    [
        ("flux", {"resolution": 32}, (16, 4, 4), (3, 32, 32)),
        ("sd3", {"resolution": 32}, (16, 8, 8), (3, 32, 32)),
        ("wan", {"height": 32, "width": 32, "num_frames": 5}, (16, 2, 4, 4), (3, 5, 32, 32)),
        ("qwen-image", {"resolution": 32}, (16, 4, 4), (3, 32, 32)),
        ("flux2", {"resolution": 32, "max_sequence_length": 64}, (128, 2, 2), (3, 32, 32)),
    ],
)
def test_tiny_generator_twins_are_flow_policies(kind, options, latent, pixels):
    policy = build_policy(ModelConfig(kind=kind, options={"tiny": True, "max_sequence_length": 8, **options}), CPU)
    check_flow_policy_contract(policy, PROMPTS[:3], torch.tensor([1.0, 0.6, 0.2]))
    x = latents(policy, 2)
    assert x.shape == (2, *latent)
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([1.0, 0.5]), policy.encode(PROMPTS[:2]))
        out = policy.decode(x)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert out.shape == (2, *pixels) and 0 <= float(out.min()) and float(out.max()) <= 1
    n = sum(p.numel() for p in policy.trainable_parameters())
    assert 0 < n < 300_000  # tiny
