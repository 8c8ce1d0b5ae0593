"""The digits world's generator: tokenizer and text encoder, exact pixel codec, shipped weights, pretraining."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from otca.worlds.digits.data import load_digit_images
from otca.worlds.digits.policy import (
    ASSETS_DIR,
    DEFAULT_TRUE_CFG,
    FLUX_CONFIG,
    FLUX_WEIGHTS,
    TEXT_CONFIG,
    TEXT_WEIGHTS,
    build_digits_policy,
    default_text_config,
    load_digits_policy,
    save_digits_generator,
)
from otca.worlds.digits.pretrain import pretrain_generator
from otca.worlds.digits.prompts import UnknownPromptError, all_prompts, prompt_digit
from otca.worlds.digits.text import BOS, PAD, DigitsTextEncoder, WordTokenizer, prompt_vocabulary
from otca.worlds.digits.vae import PixelCodec


def ode_sample(policy, prompts, steps=16, shift=3.0, seed=0):
    """Plain Euler ODE from noise (sigma 1) to data (sigma 0) on the shifted schedule; returns pixels."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    x = policy.init_latents(len(prompts), torch.Generator().manual_seed(seed))
    cond = policy.encode(prompts)
    with torch.no_grad():
        for k in range(steps):
            x = x + (sigmas[k + 1] - sigmas[k]) * policy.velocity(x, sigmas[k].expand(len(x)), cond)
    return policy.decode(x)


@pytest.fixture(scope="module")
def shipped():
    return load_digits_policy()


# --- tokenizer and text encoder ----------------------------------------------------------------------------


def test_tokenizer_hand_example_and_empty_prompt():
    tok = WordTokenizer(("7", "digit", "handwritten", ","), max_length=6)
    ids = tok(["digit 7", "Digit 7, handwritten", ""])
    assert ids.tolist() == [
        [BOS, 3, 2, PAD, PAD, PAD],
        [BOS, 3, 2, 5, 4, PAD],  # case-folded; the comma is a token of its own
        [BOS, PAD, PAD, PAD, PAD, PAD],  # "" = the unconditional prompt of CFG
    ]


def test_unknown_word_and_too_long_prompt_are_clear_errors():
    tok = WordTokenizer(prompt_vocabulary(), max_length=8)
    with pytest.raises(UnknownPromptError, match="unknown word 'banana' in prompt 'a handwritten banana'"):
        tok(["a handwritten banana"])
    with pytest.raises(ValueError, match="at most 7"):
        tok(["the digit the digit the digit the digit seven"])


def test_text_encoder_encodes_every_prompt_and_is_batch_independent():
    torch.manual_seed(0)
    enc = DigitsTextEncoder(default_text_config())
    prompts = all_prompts("all") + [""]
    out = enc(prompts)
    assert out["prompt_embeds"].shape == (len(prompts), 8, 32) and out["pooled"].shape == (len(prompts), 32)
    alone = enc(prompts[3:4])
    torch.testing.assert_close(alone["pooled"], out["pooled"][3:4], atol=1e-6, rtol=1e-5)


# --- pixel codec ------------------------------------------------------------------------------------------------


def test_pixel_codec_round_trip_on_digits():
    codec = PixelCodec()
    pixels, _ = load_digit_images("test")
    latents = codec.encode(pixels)
    assert codec.latent_shape == (4, 8, 8) and latents.shape == (len(pixels), 4, 8, 8)
    assert latents.min() >= -1 and latents.max() <= 1
    torch.testing.assert_close(codec.decode(latents), pixels, atol=1e-7, rtol=0)  # exact up to fp32 rounding


def test_pixel_codec_hand_example_and_clamp():
    pixels = torch.zeros(1, 1, 16, 16)
    pixels[0, 0, 0, :2] = torch.tensor([1.0, 0.5])  # top-left 2x2 block: (0,0)=1, (0,1)=0.5
    pixels[0, 0, 1, 0] = 0.25
    z = PixelCodec().encode(pixels)
    assert z[0, :, 0, 0].tolist() == [1.0, 0.0, -0.5, -1.0]  # channel = 2*dy + dx, value = 2p - 1
    assert (z[0, :, 1:, :] == -1).all()
    decoded = PixelCodec().decode(torch.full((1, 4, 8, 8), 3.0))
    assert decoded.shape == (1, 1, 16, 16) and (decoded == 1).all()
    with pytest.raises(ValueError, match=r"expected pixels \[B, 1, 16, 16\]"):
        PixelCodec().encode(torch.zeros(2, 3, 16, 16))


# --- the shipped generator -------------------------------------------------------------------------------------


def test_shipped_weights_load_and_give_finite_velocities(shipped):
    assert shipped.true_cfg_scale == DEFAULT_TRUE_CFG
    trainable = [n for n, p in shipped.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("transformer.") for n in trainable)
    n_params = sum(p.numel() for p in shipped.trainable_parameters())
    assert 200_000 < n_params < 400_000
    prompts = ["a handwritten seven", "digit 3", "an image of the digit 0", ""]
    x = shipped.init_latents(4, torch.Generator().manual_seed(0))
    v = shipped.velocity(x, torch.tensor([1.0, 0.7, 0.3, 0.05]), shipped.encode(prompts))
    assert v.shape == (4, 4, 8, 8) and torch.isfinite(v).all()


def test_two_step_ode_sample_decodes_to_pixels():
    policy = load_digits_policy(true_cfg_scale=2.0)
    pixels = ode_sample(policy, ["digit 1", "a handwritten eight"], steps=2)
    assert pixels.shape == (2, 1, 16, 16) and pixels.min() >= 0 and pixels.max() <= 1
    assert torch.isfinite(pixels).all()


def test_shipped_model_leaves_headroom_and_guidance_helps(shipped):
    """The RL premise: with the default sampling, digits are recognisable but imperfect; CFG sharpens them."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    images, labels = load_digit_images("train")
    with threadpool_limits(1):  # BLAS threads contending with torch's make the fit ~30x slower
        judge = LogisticRegression(max_iter=1000, C=0.5).fit(images.flatten(1).numpy(), labels.numpy())
    prompts = all_prompts("train") * 2  # 100 samples, 10 per digit
    digits = np.array([prompt_digit(p) for p in prompts])
    acc = {}
    for scale in (DEFAULT_TRUE_CFG, 3.0):
        pixels = ode_sample(load_digits_policy(true_cfg_scale=scale), prompts)
        acc[scale] = (judge.predict(pixels.flatten(1).numpy()) == digits).mean()
    assert 0.5 <= acc[DEFAULT_TRUE_CFG] <= 0.95, acc
    assert acc[3.0] >= acc[DEFAULT_TRUE_CFG] + 0.05, acc


def test_asset_files_are_small_and_describe_themselves():
    files = [ASSETS_DIR / f for f in (FLUX_WEIGHTS, FLUX_CONFIG, TEXT_WEIGHTS, TEXT_CONFIG)]
    assert sum(f.stat().st_size for f in files) < 3_000_000
    record = json.loads((ASSETS_DIR / FLUX_CONFIG).read_text())["pretraining"]
    assert record["steps"] > 0 and np.isfinite(record["final_loss"])
    assert json.loads((ASSETS_DIR / TEXT_CONFIG).read_text())["vocab"] == list(prompt_vocabulary())


@pytest.mark.parametrize("name", [FLUX_WEIGHTS, FLUX_CONFIG, TEXT_WEIGHTS, TEXT_CONFIG])
def test_missing_or_corrupt_asset_is_a_one_line_error_naming_the_file(tmp_path, name):
    for f in (FLUX_WEIGHTS, FLUX_CONFIG, TEXT_WEIGHTS, TEXT_CONFIG):
        shutil.copy(ASSETS_DIR / f, tmp_path / f)
    (tmp_path / name).write_bytes(b"\x00 not a real file {")
    with pytest.raises(ValueError) as err:
        load_digits_policy(tmp_path)
    assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError, match="missing .*" + name.replace(".", r"\.")):
        load_digits_policy(tmp_path)


def test_config_of_the_wrong_form_names_its_file(tmp_path):
    for f in (FLUX_WEIGHTS, FLUX_CONFIG, TEXT_WEIGHTS, TEXT_CONFIG):
        shutil.copy(ASSETS_DIR / f, tmp_path / f)
    (tmp_path / TEXT_CONFIG).write_text(json.dumps({"width": 32}))  # valid JSON, no vocabulary
    with pytest.raises(ValueError, match=f"{TEXT_CONFIG} is not a valid config"):
        load_digits_policy(tmp_path)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    policy = build_digits_policy()
    save_digits_generator(tmp_path, policy.transformer, policy.text, {})
    cfg = json.loads((tmp_path / FLUX_CONFIG).read_text())
    cfg["transformer"]["num_single_layers"] = 3
    (tmp_path / FLUX_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its JSON config"):
        load_digits_policy(tmp_path)


# --- building and pretraining ------------------------------------------------------------------------------------


def test_random_init_is_seeded_and_save_load_round_trips(tmp_path):
    a, b, c = build_digits_policy(seed=3), build_digits_policy(seed=3), build_digits_policy(seed=4)

    def state(policy):
        return torch.cat([t.flatten() for t in policy.state_dict().values()])

    assert torch.equal(state(a), state(b)) and not torch.equal(state(a), state(c))
    save_digits_generator(tmp_path, a.transformer, a.text, {"note": "test"})
    loaded = load_digits_policy(tmp_path, true_cfg_scale=2.0)
    a_cfg = build_digits_policy(seed=3, true_cfg_scale=2.0)
    x = a.init_latents(3, torch.Generator().manual_seed(0))
    prompts = ["digit 4", "a handwritten two", "the number 9, handwritten"]
    torch.testing.assert_close(
        loaded.velocity(x, torch.full((3,), 0.5), loaded.encode(prompts)),
        a_cfg.velocity(x, torch.full((3,), 0.5), a_cfg.encode(prompts)), atol=0, rtol=0,
    )


def test_pretraining_is_deterministic_and_learns(tmp_path):
    runs = [pretrain_generator(tmp_path / str(i), steps=3, batch_size=16, log_every=0) for i in range(2)]
    assert runs[0]["final_loss"] == runs[1]["final_loss"] and np.isfinite(runs[0]["final_loss"])
    for name in (FLUX_WEIGHTS, TEXT_WEIGHTS):
        assert (tmp_path / "0" / name).read_bytes() == (tmp_path / "1" / name).read_bytes()
    trained = load_digits_policy(tmp_path / "0")
    fresh = build_digits_policy()
    changed = [not torch.equal(p, q) for p, q in zip(trained.parameters(), fresh.parameters(), strict=True)]
    assert any(changed)  # both networks moved away from their seeded init (text encoder included)
    assert not torch.equal(trained.text.token_embedding.weight, fresh.text.token_embedding.weight)
