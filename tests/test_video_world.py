"""The video world's data, prompts, codec, text encoder and the tiny Wan behind the real Wan adapter."""

import pytest
import torch

from otca.worlds.video.codec import VideoPixelCodec
from otca.worlds.video.data import (
    CANVAS,
    FRAMES,
    SPEED_PX,
    load_source_digits,
    render_clips,
    sample_clips,
    track_centres,
)
from otca.worlds.video.prompts import (
    DIRECTIONS,
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    Motion,
    UnknownPromptError,
    all_prompts,
    prompt_motion,
)
from otca.worlds.video.text import PAD, VideoTextEncoder, tokenize
from otca.worlds.video.tracking import centroids


def test_prompts_parse_and_splits_are_disjoint():
    assert prompt_motion("a handwritten three drifting left") == Motion(3, DIRECTIONS.index("left"), 0)
    assert prompt_motion("a seven moving up quickly") == Motion(7, DIRECTIONS.index("up"), 1)
    assert prompt_motion("  The Number 9 racing down ") == Motion(9, DIRECTIONS.index("down"), 1)
    train, held_out = set(all_prompts("train")), set(all_prompts("eval"))
    assert not train & held_out
    assert len(train) == 10 * 4 * len(TRAIN_TEMPLATES) and len(held_out) == 10 * 4 * len(EVAL_TEMPLATES)
    # every (digit, direction, speed) is asked for by the held-out phrasings too
    every = {Motion(d, k, s) for d in range(10) for k in range(4) for s in (0, 1)}
    assert {prompt_motion(p) for p in held_out} == every
    with pytest.raises(UnknownPromptError, match="unknown prompt 'a seven dancing'"):
        prompt_motion("a seven dancing")


def test_clips_are_deterministic_in_range_and_layout():
    a = sample_clips(12, torch.Generator().manual_seed(7))
    b = sample_clips(12, torch.Generator().manual_seed(7))
    c = sample_clips(12, torch.Generator().manual_seed(8))
    assert a.clips.shape == (12, 1, FRAMES, CANVAS, CANVAS) and a.clips.dtype == torch.float32
    torch.testing.assert_close(a.clips, b.clips, rtol=0, atol=0)
    assert torch.equal(a.digit, b.digit) and torch.equal(a.direction, b.direction)
    assert not torch.equal(a.clips, c.clips)
    assert a.clips.min() >= 0 and a.clips.max() <= 1 and a.clips.max() > 0.9
    assert a.prompts(torch.Generator().manual_seed(0)) == b.prompts(torch.Generator().manual_seed(0))
    assert [prompt_motion(p) for p in a.prompts(torch.Generator().manual_seed(0))] == a.motions()


def test_splits_do_not_share_digits():
    xtr, _ = load_source_digits("train")
    xte, _ = load_source_digits("test")
    assert len(xtr) + len(xte) == 1797
    d = torch.cdist(xte.flatten(1), xtr.flatten(1))
    assert (d.min(dim=1).values > 0).float().mean() > 0.99  # a few duplicates exist in the raw data


def test_rendered_clips_move_as_asked():
    """The centroid moves by the speed per frame in the direction, against the analytic track (a symmetric blob
    in the middle of the 8x8 source, which never meets the canvas border; real digits touching the source's
    border lose a little ink at the ends of the quick track)."""
    x = torch.zeros(1, 1, 8, 8)
    edge = torch.tensor([0.2, 0.6, 0.6, 0.2])
    x[0, 0, 2:6, 2:6] = torch.stack([edge, edge + 0.4, edge + 0.4, edge]).clamp(max=1.0)
    for k, u in enumerate([(-1, 0), (1, 0), (0, -1), (0, 1)]):
        for s, v in enumerate(SPEED_PX):
            centres = track_centres(torch.tensor([k]), torch.tensor([s]), torch.zeros(1, 2))  # [1, F, 2]
            u_t = torch.tensor(u, dtype=torch.float32)
            assert torch.allclose(centres[0, -1] - centres[0, 0], u_t * v * (FRAMES - 1))
            c, mass = centroids(render_clips(x[:1], centres))
            step = c[0, 1:] - c[0, :-1]  # [F-1, 2]; point sampling's phase moves a step by up to ~0.06 px
            torch.testing.assert_close(step, u_t.expand_as(step) * v, atol=0.08, rtol=0)
            torch.testing.assert_close(c[0, -1] - c[0, 0], u_t * v * (FRAMES - 1), atol=0.08, rtol=0)
            assert (mass[0].std() / mass[0].mean()) < 0.03


def test_codec_is_exact_and_wan_shaped():
    codec = VideoPixelCodec()
    clips = sample_clips(3, torch.Generator().manual_seed(0)).clips
    z = codec.encode(clips)
    assert z.shape == (3, 4, FRAMES, CANVAS // 2, CANVAS // 2)
    torch.testing.assert_close(codec.decode(z)[0], 2 * clips - 1, rtol=0, atol=1e-6)
    torch.testing.assert_close(codec.to_unit(z), clips, rtol=0, atol=1e-6)
    # space-to-depth: channel c of latent pixel (i, j) is pixel (2i + c // 2, 2j + c % 2), per frame
    assert z[1, 3, 5, 2, 6] == 2 * clips[1, 0, 5, 5, 13] - 1
    assert codec.config.z_dim == 4 and codec.config.scale_factor_temporal == 1
    with pytest.raises(ValueError, match="expected pixels"):
        codec.encode(clips[:, :, 0])


def test_text_encoder_zeroes_padding_and_rejects_unknown_words():
    from otca.worlds.video.policy import default_text_config

    enc = VideoTextEncoder(default_text_config())
    ids = tokenize(["a seven moving up quickly", ""], enc.config.vocab, enc.config.max_length)
    assert ids[0, 6:].eq(PAD).all() and ids[0, :6].ne(PAD).all() and ids[1, 1:].eq(PAD).all()
    out = enc(["a seven moving up quickly", ""])["prompt_embeds"]
    assert out.shape == (2, enc.config.max_length, enc.config.width)
    assert out[0, 6:].eq(0).all() and out[0, :6].abs().sum(dim=-1).gt(0).all()
    with pytest.raises(UnknownPromptError, match="'dancing'"):
        enc(["a seven dancing left"])


def test_policy_is_the_wan_adapter_on_video_latents():
    from tests._helpers import check_timestep_is_1000_sigma

    from otca.models.wan import WanPolicy
    from otca.worlds.video.policy import build_video_policy

    policy = build_video_policy(seed=0, guidance_scale=1.0)
    assert isinstance(policy, WanPolicy)
    assert policy.latent_shape == (4, FRAMES, CANVAS // 2, CANVAS // 2)
    n = sum(p.numel() for p in policy.trainable_parameters())
    assert n == sum(p.numel() for p in policy.transformer.parameters()) and 1e5 < n < 1e6  # text encoder frozen
    check_timestep_is_1000_sigma(policy, ["a seven moving up quickly"] * 3, torch.tensor([0.9, 0.5, 0.1]))
    x = policy.init_latents(2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(policy.decode(x), VideoPixelCodec().to_unit(x), rtol=0, atol=0)


def test_guidance_combines_against_the_empty_prompt():
    from otca.worlds.video.policy import build_video_policy

    guided = build_video_policy(seed=0, guidance_scale=3.0)
    plain = build_video_policy(seed=0, guidance_scale=1.0)
    x = guided.init_latents(2, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.3])
    prompts = ["a neat zero creeping left", "the digit 4 rushing down"]
    with torch.no_grad():
        v = guided.velocity(x, sigma, guided.encode(prompts))
        v_c = plain.velocity(x, sigma, plain.encode(prompts))
        v_u = plain.velocity(x, sigma, plain.encode(["", ""]))
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)


def test_video_and_image_worlds_share_one_digit_split():
    """Both worlds draw on the same train/test split: the video world's test digits are the image world's test
    digits (the 8x8 sources of the 16x16 images), so no held-out digit is trained on in either world."""
    import torch.nn.functional as F

    from otca.worlds.digits.data import IMAGE_SIZE, load_digit_images
    from otca.worlds.video.data import load_source_digits

    for split in ("train", "test"):
        src, ys = load_source_digits(split)
        img, yi = load_digit_images(split)
        assert torch.equal(ys, yi)
        up = F.interpolate(src, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
        assert torch.equal(up, img)
    with pytest.raises(ValueError, match="video digits split 'val'"):
        load_source_digits("val")
