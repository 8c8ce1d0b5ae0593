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


# --- model kind 'digits-flux': the same options and preparation path as the diffusers kinds ---------------------


def _build(**model):
    from otca.config import ModelConfig
    from otca.models.registry import build_policy

    return build_policy(ModelConfig(**model), torch.device("cpu"))


KIND_PROMPTS = ["a handwritten seven", "digit 3", "the digit zero"]
KIND_SIGMAS = torch.tensor([0.9, 0.5, 0.1])


def _direct_velocity(x, sigma, prompts):
    """The shipped networks built directly from the asset files (no adapter, no registry) and called by hand:
    FLUX's 2x2 token packing, text ids of zeros, image ids (0, row, col), timestep sigma (the transformer
    multiplies by 1000 itself)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from otca.worlds.digits.text import TextEncoderConfig

    transformer = FluxTransformer2DModel.from_config(json.loads((ASSETS_DIR / FLUX_CONFIG).read_text())["transformer"])
    transformer.load_state_dict(load_file(ASSETS_DIR / FLUX_WEIGHTS))
    text = DigitsTextEncoder(TextEncoderConfig.from_dict(json.loads((ASSETS_DIR / TEXT_CONFIG).read_text())))
    text.load_state_dict(load_file(ASSETS_DIR / TEXT_WEIGHTS))
    transformer.eval(), text.eval()
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    with torch.no_grad():
        emb = text(prompts)
        out = transformer(
            hidden_states=tokens, encoder_hidden_states=emb["prompt_embeds"], pooled_projections=emb["pooled"],
            timestep=sigma, img_ids=img_ids, txt_ids=torch.zeros(emb["prompt_embeds"].shape[1], 3), return_dict=False,
        )[0]
    return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_default_kind_is_the_shipped_network_bit_for_bit():
    policy = _build()
    x = policy.init_latents(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = policy.velocity(x, KIND_SIGMAS, policy.encode(KIND_PROMPTS))
    torch.testing.assert_close(v, _direct_velocity(x, KIND_SIGMAS, KIND_PROMPTS), rtol=0, atol=0)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        "transformer." + n for n, _ in policy.transformer.named_parameters()
    }


def test_unknown_or_bad_option_is_a_one_line_error_naming_it():
    from otca.config import ConfigError

    with pytest.raises(ConfigError, match="guidance_scal") as e:
        _build(options={"guidance_scal": 2.0})
    assert "\n" not in str(e.value) and "model.options" in str(e.value)
    with pytest.raises(ConfigError, match="true_cfg_scale"):
        _build(options={"true_cfg_scale": 0.5})


def test_options_reach_the_policy_and_tiny_is_a_seeded_fresh_network(tmp_path):
    policy = _build(options={"true_cfg_scale": 2.0, "negative_prompt": "digit 1"})
    assert policy.true_cfg_scale == 2.0 and policy.negative_prompt == "digit 1"
    fresh, same, other = (_build(options={"tiny": True, "seed": s}) for s in (3, 3, 4))
    ref = build_digits_policy(seed=3)
    for a, b in ((fresh, ref), (same, ref)):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(fresh.transformer.proj_out.weight, other.transformer.proj_out.weight)
    with pytest.raises(ValueError, match="model.path"):
        _build(path=str(tmp_path), options={"tiny": True})


def test_lora_and_checkpointing_as_for_flux():
    from _helpers import check_checkpointing_keeps_gradients, check_full_and_lora_trainables

    sigmas = KIND_SIGMAS
    check_full_and_lora_trainables(lambda **kw: _build(**kw), KIND_PROMPTS, sigmas)
    check_checkpointing_keeps_gradients(lambda **kw: _build(**kw), KIND_PROMPTS, sigmas)


def test_lora_weights_stay_fp32_over_a_bf16_network():
    from otca.config import LoraConfig

    policy = _build(dtype="bfloat16", lora=LoraConfig(rank=2))
    trained = dict((n, p) for n, p in policy.named_parameters() if p.requires_grad)
    assert trained and all(".lora_" in n and p.dtype == torch.float32 for n, p in trained.items())
    frozen = [p.dtype for n, p in policy.transformer.named_parameters() if not p.requires_grad]
    assert set(frozen) == {torch.bfloat16}
    x = policy.init_latents(3, torch.Generator().manual_seed(0))
    v = policy.velocity(x, KIND_SIGMAS, policy.encode(KIND_PROMPTS))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained.values())
