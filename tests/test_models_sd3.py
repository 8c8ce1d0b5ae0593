"""The SD3 adapter on tiny random SD3 parts (offline, CPU), plus the helpers it shares with Wan.

References are written independently of the adapter: direct transformer / VAE calls with the pipeline's
conventions spelled out here, the CFG formula on separately computed passes, the VAE's own encoder for the
latent scaling, hand-built conditioning tensors, and the SDE log-density re-evaluated on a stored sample.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import (
    CPU,
    check_checkpointing_keeps_gradients,
    check_flow_policy_contract,
    check_full_and_lora_trainables,
    check_resampled_ratio_is_one,
    check_same_policy,
    check_timestep_is_1000_sigma,
    latents,
)
from otca.config import ConfigError, ModelConfig
from otca.flow import flow_sde_step
from otca.models.build import BuildInputs, save_components
from otca.models.embedding_cache import PromptEmbeddingCache, save_prompt_embeddings
from otca.models.registry import build_policy, policy_kinds
from otca.models.sd3 import SD3Cond, SD3Options, SD3Policy, sd3_policy_from_components, tiny_sd3_components
from otca.testing.models import tiny_clip_tokenizer, tiny_t5_tokenizer

torch.set_num_threads(1)

PROMPTS = ["a red cat", "two dogs on grass", "a photo of a tree"]


def _policy(guidance_scale: float, **opts) -> SD3Policy:
    options = SD3Options(tiny=True, guidance_scale=guidance_scale, **opts)
    return sd3_policy_from_components(BuildInputs(options, tiny_sd3_components(0)))


@pytest.fixture(scope="module")
def cfg_policy() -> SD3Policy:
    return _policy(4.0)


@pytest.fixture(scope="module")
def plain_policy() -> SD3Policy:
    return _policy(1.0)


SIGMAS = torch.tensor([1.0, 0.6, 0.2])


# ------------------------------------------------------------------------------------------------ protocol


def test_registered_and_a_flow_policy(plain_policy):
    assert {"sd3", "wan"} <= set(policy_kinds())
    check_flow_policy_contract(plain_policy, PROMPTS, SIGMAS)


def test_velocity_shape_equals_latent_shape(cfg_policy):
    x = latents(cfg_policy)
    assert x.shape == (3, 16, 8, 8) and x.dtype == torch.float32
    v = cfg_policy.velocity(x, SIGMAS, cfg_policy.encode(PROMPTS))
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


def test_velocity_feeds_the_transformer_1000_sigma(plain_policy):
    """SD3's transformer takes the scheduler timestep sigma * 1000 (FlowMatchEulerDiscreteScheduler)."""
    check_timestep_is_1000_sigma(plain_policy, PROMPTS, SIGMAS, pooled_projections="pooled")


def test_scalar_sigma_broadcasts(plain_policy):
    x, cond = latents(plain_policy), plain_policy.encode(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(
            plain_policy.velocity(x, torch.tensor(0.6), cond), plain_policy.velocity(x, torch.full((3,), 0.6), cond)
        )


def test_init_latents_per_sample_generators(plain_policy):
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 5)]
    x = plain_policy.init_latents(3, gens)
    torch.testing.assert_close(x[0], x[2])
    torch.testing.assert_close(x[1], torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError, match="2 generators for n=3"):
        plain_policy.init_latents(3, gens[:2])


def test_decode_is_the_vae_inverse_of_sd3_latent_scaling(plain_policy):
    """Pipeline: latents = (z - shift_factor) * scaling_factor; decode must map them back to the VAE's z."""
    vae = plain_policy.vae
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = vae.encode(pixels * 2 - 1).latent_dist.mean  # [2, 16, 8, 8]
        x = (z - vae.config.shift_factor) * vae.config.scaling_factor
        out = plain_policy.decode(x)
        ref = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
        wrong = (vae.decode(x * vae.config.scaling_factor + vae.config.shift_factor).sample / 2 + 0.5).clamp(0, 1)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # ref is clamped: out is in [0, 1]
    assert not torch.allclose(out, wrong, atol=1e-3)


# ------------------------------------------------------------------------------------------------ text


def test_encode_layout_matches_the_pipeline(cfg_policy):
    """[CLIP-L | CLIP-G | zero pad] on 77 tokens, then T5's tokens; pooled = [CLIP-L proj | CLIP-G proj]."""
    text = cfg_policy.text
    cond = cfg_policy.encode(PROMPTS)
    assert cond.prompt_embeds.shape == (3, 77 + 256, 48) and cond.pooled.shape == (3, 40)
    with torch.no_grad():
        tok = text.tokenizers[0](PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out_l = text.text_encoder(tok.input_ids, output_hidden_states=True)
        tok5 = text.tokenizers[2](PROMPTS, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
        t5 = text.text_encoder_3(tok5.input_ids).last_hidden_state
    torch.testing.assert_close(cond.prompt_embeds[:, :77, :16], out_l.hidden_states[-2])
    assert (cond.prompt_embeds[:, :77, 40:] == 0).all()
    torch.testing.assert_close(cond.prompt_embeds[:, 77:], t5)
    torch.testing.assert_close(cond.pooled[:, :16], out_l.text_embeds)
    # negatives: the embedding of "" repeated over the batch
    neg = cfg_policy.embed_prompts([""])
    torch.testing.assert_close(cond.neg_prompt_embeds, neg["prompt_embeds"].expand(3, -1, -1))
    assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])


def test_text_encoders_are_frozen_and_stay_in_eval(cfg_policy):
    cond = cfg_policy.encode(PROMPTS)
    assert not cond.prompt_embeds.requires_grad
    cfg_policy.train()
    try:
        assert cfg_policy.transformer.training
        assert not cfg_policy.text.training and not cfg_policy.vae.training
        assert not cfg_policy.text.text_encoder_3.training
    finally:
        cfg_policy.eval()


def test_tiny_tokenizers_tokenize_for_real():
    """The CLIPTokenizer trap (cpu-facts.md): distinct prompts must get distinct, non-degenerate ids."""
    clip, t5 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    a, b = clip(["a cat", "a dog!"]).input_ids
    # byte b has id 2 + 2b, its word-final form 3 + 2b: <sot> a</w> c a t</w> <eot>
    assert a == [0, 3 + 2 * 97, 2 + 2 * 99, 2 + 2 * 97, 3 + 2 * 116, 1]
    assert a != b
    # "▁" = 3, then letters from 4: ▁ a ▁ c a t </s>
    assert t5(["a cat"]).input_ids[0] == [3, 4, 3, 6, 4, 23, 1]
    assert clip.decode(a, skip_special_tokens=True).strip() == "a cat"


# ------------------------------------------------------------------------------------------------ guidance


def test_cfg_is_v_neg_plus_scale_times_difference(cfg_policy, plain_policy):
    """Both policies share the tiny weights; the guided velocity is the CFG formula on separate passes."""
    x = latents(cfg_policy)
    cond = cfg_policy.encode(PROMPTS)
    assert cond.negative() is not None and plain_policy.encode(PROMPTS).negative() is None
    neg = SD3Cond.build(cond.negative())
    with torch.no_grad():
        v = cfg_policy.velocity(x, SIGMAS, cond)
        v_cond = plain_policy.velocity(x, SIGMAS, SD3Cond.build(cond.positive()))
        v_neg = plain_policy.velocity(x, SIGMAS, neg)
    torch.testing.assert_close(v, v_neg + 4.0 * (v_cond - v_neg), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v, v_cond, atol=1e-3)


def test_cfg_on_needs_negative_embeddings(cfg_policy, plain_policy):
    with pytest.raises(ValueError, match="negative-prompt embeddings"):
        cfg_policy.velocity(latents(cfg_policy), SIGMAS, plain_policy.encode(PROMPTS))


def test_cfg_off_ignores_negatives(cfg_policy, plain_policy):
    x, cond = latents(plain_policy), cfg_policy.encode(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(
            plain_policy.velocity(x, SIGMAS, cond), plain_policy.velocity(x, SIGMAS, SD3Cond.build(cond.positive()))
        )


# ------------------------------------------------------------------------------------------------ cond


def test_cond_slicing(cfg_policy):
    x = latents(cfg_policy)
    cond = cfg_policy.encode(PROMPTS)
    assert len(cond) == 3 and len(cond[1]) == 1 and len(cond[1:]) == 2
    sub = cond[torch.tensor([2, 0])]
    torch.testing.assert_close(sub.pooled, cond.pooled[[2, 0]])
    torch.testing.assert_close(sub.neg_prompt_embeds, cond.neg_prompt_embeds[[2, 0]])
    with torch.no_grad():
        full = cfg_policy.velocity(x, SIGMAS, cond)
        part = cfg_policy.velocity(x[1:], SIGMAS[1:], cond[1:])
    torch.testing.assert_close(part, full[1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cond has 2 prompts for a batch of 3"):
        cfg_policy.velocity(x, SIGMAS, cond[:2])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=6))
def test_cond_indexing_matches_field_indexing(idx):
    g = torch.Generator().manual_seed(0)
    emb, pooled = torch.randn(5, 7, 3, generator=g), torch.randn(5, 2, generator=g)
    cond = SD3Cond.build({"prompt_embeds": emb, "pooled": pooled}, {"prompt_embeds": -emb, "pooled": -pooled})
    sub = cond[torch.tensor(idx)]
    assert torch.equal(sub.prompt_embeds, emb[idx]) and torch.equal(sub.neg_pooled, -pooled[idx])
    assert len(sub) == len(idx)


def test_cond_validation():
    e, p = torch.zeros(2, 4, 3), torch.zeros(2, 5)
    with pytest.raises(ValueError, match="same batch size"):
        SD3Cond(e, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="all together"):
        SD3Cond(e, p, neg_prompt_embeds=e)
    with pytest.raises(ValueError, match="must match"):
        SD3Cond(e, p, torch.zeros(2, 6, 3), p)
    assert SD3Cond(e, p).to(dtype=torch.float64).pooled.dtype == torch.float64


# ------------------------------------------------------------------------------------------------ embeddings cache


def test_encode_from_precomputed_embeddings_equals_encode_from_prompts(cfg_policy, tmp_path):
    path = cfg_policy.save_prompt_embeddings(PROMPTS, tmp_path / "emb.safetensors")
    cfg = ModelConfig(kind="sd3", options={"tiny": True, "guidance_scale": 4.0, "embeddings": str(path)})
    cached = build_policy(cfg, CPU)
    assert not any(n.startswith("text.") for n, _ in cached.named_parameters())  # encoders never built
    asked = [PROMPTS[2], PROMPTS[0], PROMPTS[2]]  # any order, repeats
    a, b = cfg_policy.encode(asked), cached.encode(asked)
    for f in ("prompt_embeds", "pooled", "neg_prompt_embeds", "neg_pooled"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    x = latents(cached)
    with torch.no_grad():
        assert torch.equal(cfg_policy.velocity(x, SIGMAS, a), cached.velocity(x, SIGMAS, b))
    with pytest.raises(KeyError, match="no entry for prompt 'a blue cat'"):
        cached.encode(["a blue cat"])
    # written in encoder batches of 2 (3 prompts + ""): equal up to batch-size rounding of the encoders
    chunked = PromptEmbeddingCache(
        cfg_policy.save_prompt_embeddings(PROMPTS, tmp_path / "chunked.safetensors", batch_size=2),
        "sd3", ("prompt_embeds", "pooled"),
    )
    for k, t in chunked(asked).items():
        torch.testing.assert_close(t, cfg_policy.embed_prompts(asked)[k], rtol=1e-6, atol=1e-6)


def test_embedding_cache_rejects_other_models_and_missing_files(tmp_path):
    path = save_prompt_embeddings(tmp_path / "w.safetensors", "wan", ["a"], {"prompt_embeds": torch.zeros(1, 2, 3)})
    with pytest.raises(ValueError, match="written for model 'sd3'"):
        PromptEmbeddingCache(path, "sd3", ("prompt_embeds", "pooled"))
    with pytest.raises(FileNotFoundError, match="not found"):
        PromptEmbeddingCache(tmp_path / "none.safetensors", "sd3", ("prompt_embeds",))
    with pytest.raises(ValueError, match="unique"):
        save_prompt_embeddings(tmp_path / "d.safetensors", "sd3", ["a", "a"], {"pooled": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match="missing tensors"):
        PromptEmbeddingCache(path, "wan", ("prompt_embeds", "pooled"))


# ------------------------------------------------------------------------------------------------ building


def _tiny(**kw) -> SD3Policy:
    return build_policy(ModelConfig(kind="sd3", options={"tiny": True}, **kw), CPU)


def test_trainable_parameters_full_and_lora():
    check_full_and_lora_trainables(_tiny, PROMPTS, SIGMAS)


def test_gradient_checkpointing_gives_the_same_gradients():
    check_checkpointing_keeps_gradients(_tiny, PROMPTS, SIGMAS)


def test_bfloat16_network_fp32_interfaces():
    policy = _tiny(dtype="bfloat16")
    assert policy.transformer.dtype == torch.bfloat16 and policy.text.text_encoder_3.dtype == torch.bfloat16
    assert policy.vae.dtype == torch.float32
    x = latents(policy)
    with torch.no_grad():
        v = policy.velocity(x, SIGMAS, policy.encode(PROMPTS))
        pixels = policy.decode(x)
    assert x.dtype == v.dtype == pixels.dtype == torch.float32


def test_load_a_saved_model_directory(tmp_path):
    save_components(tiny_sd3_components(0), tmp_path / "sd3")
    loaded = build_policy(ModelConfig(kind="sd3", path=str(tmp_path / "sd3"), options={"guidance_scale": 4.0}), CPU)
    fresh = build_policy(ModelConfig(kind="sd3", options={"tiny": True, "guidance_scale": 4.0}), CPU)
    assert loaded.latent_shape == (16, 8, 8)  # default side = sample_size * VAE factor = 32
    check_same_policy(loaded, fresh, PROMPTS, SIGMAS)


def test_resolution_options(tmp_path):
    assert _policy(1.0, resolution=64).latent_shape == (16, 16, 16)
    assert _policy(1.0, resolution=64, width=32).latent_shape == (16, 16, 8)
    with pytest.raises(ValueError, match="multiples of 8"):
        _policy(1.0, height=36)


def test_missing_path_and_folder_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_policy(ModelConfig(kind="sd3", path=str(tmp_path / "nope")), CPU)
    assert "sd3" in str(e.value) and str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="model.path is not set"):
        build_policy(ModelConfig(kind="sd3"), CPU)
    parts = tiny_sd3_components(0)
    del parts["text_encoder_3"]
    save_components(parts, tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match="no 'text_encoder_3' folder") as e:
        build_policy(ModelConfig(kind="sd3", path=str(tmp_path / "partial")), CPU)
    assert "\n" not in str(e.value)


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'guidance'"):
        build_policy(ModelConfig(kind="sd3", options={"tiny": True, "guidance": 3}), CPU)
    with pytest.raises(ConfigError, match="max_sequence_length"):
        build_policy(ModelConfig(kind="sd3", options={"tiny": True, "max_sequence_length": 1000}), CPU)
    with pytest.raises(ValueError, match="leave model.path unset"):
        build_policy(ModelConfig(kind="sd3", path=str(tmp_path), options={"tiny": True}), CPU)


# ------------------------------------------------------------------------------------------------ the SDE


def test_sampled_transition_reevaluated_has_ratio_exactly_one(cfg_policy):
    check_resampled_ratio_is_one(cfg_policy, PROMPTS, flow_sde_step, eta=0.7)
