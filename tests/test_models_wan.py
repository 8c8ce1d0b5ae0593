"""The Wan text-to-video adapter on tiny random Wan parts (offline, CPU), one expert and Wan2.2's two.

References are written independently of the adapter: direct transformer / VAE calls with the pipeline's
conventions spelled out here, the CFG formula on separately computed passes, the VAE's own encoder for the
latents normalization, per-expert single-model policies for the routing, and the SDE log-density
re-evaluated on a stored sample.
"""

from __future__ import annotations

import json

import pytest
import torch

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
from otca.config import ConfigError, LoraConfig, ModelConfig
from otca.flow import flow_sde_step
from otca.models.build import BuildInputs, save_components
from otca.models.registry import build_policy
from otca.models.wan import (
    WanCond,
    WanOptions,
    WanPolicy,
    clean_prompt,
    tiny_wan_components,
    wan_policy_from_components,
)

torch.set_num_threads(1)

PROMPTS = ["a red cat runs", "waves on a beach", "a dragon folds paper"]
SIGMAS = torch.tensor([1.0, 0.6, 0.2])
TEXT_TOKENS = 24  # short UMT5 sequences keep the tests fast


def _policy(guidance_scale: float, seed: int = 0, **opts) -> WanPolicy:
    options = WanOptions(tiny=True, guidance_scale=guidance_scale, max_sequence_length=TEXT_TOKENS, **opts)
    return wan_policy_from_components(BuildInputs(options, tiny_wan_components(seed)))


def _cfg(**kw) -> ModelConfig:
    kw.setdefault("options", {})
    kw["options"] = {"max_sequence_length": TEXT_TOKENS, **kw["options"]}
    return ModelConfig(kind="wan", **kw)


@pytest.fixture(scope="module")
def cfg_policy() -> WanPolicy:
    return _policy(5.0)


@pytest.fixture(scope="module")
def plain_policy() -> WanPolicy:
    return _policy(1.0)


# ------------------------------------------------------------------------------------------------ protocol


def test_velocity_shape_equals_latent_shape(cfg_policy):
    check_flow_policy_contract(cfg_policy, PROMPTS, SIGMAS)
    x = latents(cfg_policy)
    # [B, z_dim, 1 + (5 - 1) / 4, 32 / 8, 32 / 8]
    assert x.shape == (3, 16, 2, 4, 4) and x.dtype == torch.float32
    v = cfg_policy.velocity(x, SIGMAS, cfg_policy.encode(PROMPTS))
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


def test_velocity_feeds_the_transformer_1000_sigma(plain_policy):
    check_timestep_is_1000_sigma(plain_policy, PROMPTS, SIGMAS)


def test_decode_is_the_vae_inverse_of_wan_latent_normalization(plain_policy):
    """Pipeline: latents = (z - latents_mean) / latents_std per channel; decode maps them back to z."""
    vae = plain_policy.vae
    video = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = vae.encode(video * 2 - 1).latent_dist.mean  # [2, 16, 2, 4, 4]
        out = plain_policy.decode((z - mean) / std)
        ref = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
        wrong = (vae.decode((z - mean) / std).sample / 2 + 0.5).clamp(0, 1)
    assert out.shape == (2, 3, 5, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # ref is clamped: out is in [0, 1]
    assert not torch.allclose(out, wrong, atol=1e-3)


# ------------------------------------------------------------------------------------------------ text


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp; b \n\t c  ") == "a & b c"


def test_text_padding_is_zero_and_matches_the_encoder(cfg_policy):
    text = cfg_policy.text
    emb = cfg_policy.embed_prompts(PROMPTS)["prompt_embeds"]  # [3, 24, 32]
    tok = text.tokenizers[0](
        PROMPTS, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt"
    )
    n = tok.attention_mask.sum(1)  # tokens per prompt, eos included
    assert emb.shape == (3, TEXT_TOKENS, 32) and (n < TEXT_TOKENS).all()
    with torch.no_grad():
        h = text.text_encoder(tok.input_ids, tok.attention_mask).last_hidden_state
    for i in range(3):
        torch.testing.assert_close(emb[i, : n[i]], h[i, : n[i]])
        assert (emb[i, n[i] :] == 0).all() and (h[i, n[i] :] != 0).any()


def test_frozen_parts_stay_in_eval(cfg_policy):
    cfg_policy.train()
    try:
        assert cfg_policy.transformer.training and not cfg_policy.text.training and not cfg_policy.vae.training
    finally:
        cfg_policy.eval()


# ------------------------------------------------------------------------------------------------ guidance


def test_cfg_is_v_neg_plus_scale_times_difference(cfg_policy, plain_policy):
    x, cond = latents(cfg_policy), cfg_policy.encode(PROMPTS)
    assert plain_policy.encode(PROMPTS).negative() is None
    with torch.no_grad():
        v = cfg_policy.velocity(x, SIGMAS, cond)
        v_cond = plain_policy.velocity(x, SIGMAS, WanCond.build(cond.positive()))
        v_neg = plain_policy.velocity(x, SIGMAS, WanCond.build(cond.negative()))
    torch.testing.assert_close(v, v_neg + 5.0 * (v_cond - v_neg), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v, v_cond, atol=1e-3)
    with pytest.raises(ValueError, match="negative-prompt embeddings"):
        cfg_policy.velocity(x, SIGMAS, plain_policy.encode(PROMPTS))


def test_cond_slicing(cfg_policy):
    x, cond = latents(cfg_policy), cfg_policy.encode(PROMPTS)
    sub = cond[[2, 1]]
    assert torch.equal(sub.prompt_embeds, cond.prompt_embeds[[2, 1]]) and len(cond[0]) == 1
    with torch.no_grad():
        full = cfg_policy.velocity(x, SIGMAS, cond)
        part = cfg_policy.velocity(x[[2, 1]], SIGMAS[[2, 1]], sub)
    torch.testing.assert_close(part, full[[2, 1]], rtol=1e-5, atol=1e-5)


def test_encode_from_precomputed_embeddings_equals_encode_from_prompts(cfg_policy, tmp_path):
    path = cfg_policy.save_prompt_embeddings(PROMPTS, tmp_path / "emb.safetensors")
    cached = build_policy(_cfg(options={"tiny": True, "embeddings": str(path)}), CPU)
    assert not any(n.startswith("text.") for n, _ in cached.named_parameters())
    asked = [PROMPTS[1], PROMPTS[1], PROMPTS[0]]
    a, b = cfg_policy.encode(asked), cached.encode(asked)
    assert torch.equal(a.prompt_embeds, b.prompt_embeds) and torch.equal(a.neg_prompt_embeds, b.neg_prompt_embeds)
    with pytest.raises(ValueError, match="written for model 'sd3'"):
        build_policy(ModelConfig(kind="sd3", options={"tiny": True, "embeddings": str(path)}), CPU)


# ------------------------------------------------------------------------------------------------ two experts


def _two_expert_parts():
    parts = tiny_wan_components(0)
    parts["transformer_2"] = tiny_wan_components(1, text=False)["transformer"]
    return parts


def test_two_experts_route_by_boundary_with_their_own_guidance():
    """Wan2.2-A14B: t >= boundary * 1000 -> transformer (scale 5), below -> transformer_2 (scale 3)."""
    parts = _two_expert_parts()
    opts = WanOptions(tiny=True, guidance_scale=5.0, guidance_scale_2=3.0, max_sequence_length=TEXT_TOKENS)
    moe = wan_policy_from_components(BuildInputs(opts, parts), boundary_ratio=0.5)
    high, low = _policy(5.0, seed=0), _policy(3.0, seed=1)
    x, cond = latents(moe), moe.encode(PROMPTS)
    sigmas = torch.tensor([0.9, 0.3, 0.5])  # 0.5 * 1000 sits on the boundary: the high-noise expert
    with torch.no_grad():
        v = moe.velocity(x, sigmas, cond)
        v_high = high.velocity(x, sigmas, cond)
        v_low = low.velocity(x, sigmas, cond)
    torch.testing.assert_close(v[[0, 2]], v_high[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v[1], v_low[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v_high[1], v_low[1], atol=1e-3)


def test_two_expert_directory_loads_with_boundary_and_lora_on_both(tmp_path):
    root = save_components(_two_expert_parts(), tmp_path / "wan22")
    with pytest.raises(ValueError, match="needs boundary_ratio"):
        build_policy(_cfg(path=str(root)), CPU)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.875}))
    policy = build_policy(_cfg(path=str(root), lora=LoraConfig(rank=2)), CPU)
    assert policy.boundary_ratio == 0.875 and policy.transformer_2 is not None
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any(n.startswith("transformer.") for n in names) and any(n.startswith("transformer_2.") for n in names)
    assert all(".lora_" in n for n in names)
    override = build_policy(_cfg(path=str(root), options={"boundary_ratio": 0.3}), CPU)
    assert override.boundary_ratio == 0.3


def test_guidance_scale_2_needs_two_experts():
    with pytest.raises(ValueError, match="only for two-expert models"):
        _policy(5.0, guidance_scale_2=2.0)


# ------------------------------------------------------------------------------------------------ building


def _tiny(**kw) -> WanPolicy:
    return build_policy(_cfg(options={"tiny": True}, **kw), CPU)


def test_trainable_parameters_full_and_lora():
    check_full_and_lora_trainables(_tiny, PROMPTS, SIGMAS)


def test_gradient_checkpointing_gives_the_same_gradients():
    check_checkpointing_keeps_gradients(_tiny, PROMPTS, SIGMAS)


def test_load_a_saved_model_directory(tmp_path):
    root = save_components(tiny_wan_components(0), tmp_path / "wan")
    loaded = build_policy(_cfg(path=str(root), options={"height": 32, "width": 32, "num_frames": 5}), CPU)
    check_same_policy(loaded, _tiny(), PROMPTS, SIGMAS)
    # without size options a real directory gets WanPipeline's 480x832x81 video
    assert build_policy(_cfg(path=str(root)), CPU).latent_shape == (16, 21, 60, 104)


def test_video_size_options_are_checked():
    assert _policy(1.0, resolution=64, num_frames=9).latent_shape == (16, 3, 8, 8)
    with pytest.raises(ValueError, match="num_frames: expected 1 \\+ a multiple of 4"):
        _policy(1.0, num_frames=6)
    with pytest.raises(ValueError, match="multiples of 16"):
        _policy(1.0, height=40)


def test_missing_path_and_folder_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_policy(_cfg(path=str(tmp_path / "missing")), CPU)
    assert "'wan'" in str(e.value) and str(tmp_path / "missing") in str(e.value) and "\n" not in str(e.value)
    parts = tiny_wan_components(0)
    del parts["vae"]
    save_components(parts, tmp_path / "novae")
    with pytest.raises(FileNotFoundError, match="no 'vae' folder"):
        build_policy(_cfg(path=str(tmp_path / "novae")), CPU)
    with pytest.raises(ConfigError, match="unknown config key 'frames'"):
        build_policy(_cfg(options={"tiny": True, "frames": 5}), CPU)


# ------------------------------------------------------------------------------------------------ the SDE


def test_sampled_transition_reevaluated_has_ratio_exactly_one(cfg_policy):
    check_resampled_ratio_is_one(cfg_policy, PROMPTS, flow_sde_step, eta=0.8)
