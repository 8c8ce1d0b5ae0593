"""The FLUX adapter on a tiny random diffusers FluxTransformer2DModel (CPU, offline).

References: diffusers' own FluxPipeline packing helpers, direct transformer calls, and the CFG formula by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, FluxTransformer2DModel
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import check_flow_policy_contract
from otca.config import LoraConfig
from otca.models.embedding_cache import PromptEmbeddingCache
from otca.models.flux import FluxCond, FluxPolicy, latent_image_ids, pack_latents, unpack_latents
from otca.models.lora import add_lora

C, H, W = 4, 4, 6  # non-square latents catch row/column mix-ups in packing and ids
L, D, P = 5, 8, 6


class ToyText(torch.nn.Module):
    """Prompts -> FLUX text fields from the first L characters (any text encodes, "" included)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(128, D)
        self.pool = torch.nn.Linear(D, P)

    def forward(self, prompts):
        ids = torch.tensor([[ord(ch) % 128 for ch in (p + "_" * L)[:L]] for p in prompts])  # [B, L]
        e = self.emb(ids)  # [B, L, D]
        return {"prompt_embeds": e, "pooled": self.pool(e.mean(1))}


class ToyCodec:
    """Space-to-depth codec for 8x12 one-channel pixels <-> latents [4, 4, 6]."""

    latent_shape = (C, H, W)

    def encode(self, pixels):
        return F.pixel_unshuffle(2 * pixels - 1, 2)

    def decode(self, latents):
        return ((F.pixel_shuffle(latents, 2) + 1) / 2).clamp(0, 1)


def tiny_flux(guidance_embeds: bool = False, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=D, pooled_projection_dim=P, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )


def make_policy(transformer=None, **kw) -> FluxPolicy:
    torch.manual_seed(1)
    return FluxPolicy(transformer or tiny_flux(), ToyText(), ToyCodec(), **kw)


PROMPTS = ["a cat", "two dogs", "", "a red car"]


# --- packing ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 5), h2=st.integers(1, 4), w2=st.integers(1, 4))
def test_pack_unpack_round_trip_exact_and_matches_flux_pipeline(b, c, h2, w2):
    x = torch.randn(b, c, 2 * h2, 2 * w2)
    tokens = pack_latents(x)
    assert tokens.shape == (b, h2 * w2, 4 * c)
    assert torch.equal(unpack_latents(tokens, 2 * h2, 2 * w2), x)
    # The layout real FLUX weights expect: diffusers' FluxPipeline helpers (vae_scale_factor 8 -> pixels 16x).
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, b, c, 2 * h2, 2 * w2))
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 16 * h2, 16 * w2, 8), x)


def test_pack_hand_example():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)  # one channel, values = row * 4 + col
    tokens = pack_latents(x)
    assert tokens[0, 0].tolist() == [0, 1, 4, 5]  # top-left 2x2 patch, (dy, dx) order
    assert tokens[0, 1].tolist() == [2, 3, 6, 7]  # its right neighbour comes next (row-major)
    assert tokens[0, 2].tolist() == [8, 9, 12, 13]


def test_image_ids_match_flux_pipeline():
    ids = latent_image_ids(2, 3, torch.device("cpu"), torch.float32)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32))


# --- velocity, decode, latents ------------------------------------------------------------------------------


def test_is_a_flow_policy_with_shapes():
    policy = make_policy()
    check_flow_policy_contract(policy, PROMPTS, torch.tensor([1.0, 0.7, 0.4, 0.1]))
    x = policy.init_latents(4, torch.Generator().manual_seed(0))
    v = policy.velocity(x, torch.full((4,), 0.7), policy.encode(PROMPTS))
    assert x.shape == v.shape == (4, C, H, W) and v.dtype == torch.float32 and torch.isfinite(v).all()
    pixels = policy.decode(x)
    assert pixels.shape == (4, 1, 2 * H, 2 * W)
    torch.testing.assert_close(pixels, ((F.pixel_shuffle(x, 2) + 1) / 2).clamp(0, 1), rtol=0, atol=0)


def test_velocity_is_the_transformer_on_packed_tokens():
    """Reference: a direct call with FluxPipeline's own packing, sigma as timestep, zero txt_ids."""
    policy = make_policy()
    x, sigma = torch.randn(4, C, H, W), torch.tensor([1.0, 0.5, 0.25, 0.0])
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        ref = policy.transformer(
            hidden_states=FluxPipeline._pack_latents(x, 4, C, H, W),
            encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled, timestep=sigma,
            img_ids=FluxPipeline._prepare_latent_image_ids(4, H // 2, W // 2, "cpu", torch.float32),
            txt_ids=torch.zeros(L, 3), return_dict=False,
        )[0]
        v = policy.velocity(x, sigma, cond)
    torch.testing.assert_close(v, FluxPipeline._unpack_latents(ref, 8 * H, 8 * W, 8), rtol=0, atol=0)
    # A scalar sigma is broadcast over the batch.
    torch.testing.assert_close(policy.velocity(x, torch.tensor(0.5), cond), policy.velocity(x, sigma.fill_(0.5), cond))


def test_velocity_keeps_x_dtype_with_a_bf16_model():
    policy = make_policy(tiny_flux().to(torch.bfloat16))
    x = torch.randn(2, C, H, W)
    v = policy.velocity(x, torch.full((2,), 0.3), policy.encode(PROMPTS[:2]))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    ref = make_policy().velocity(x, torch.full((2,), 0.3), make_policy().encode(PROMPTS[:2]))
    assert (v - ref).abs().max() < 0.1 * ref.abs().max()  # same network up to bf16 rounding


def test_init_latents_deterministic_per_generator():
    policy = make_policy()
    a = policy.init_latents(3, torch.Generator().manual_seed(5))
    b = policy.init_latents(3, torch.Generator().manual_seed(5))
    assert a.shape == (3, C, H, W) and torch.equal(a, b)
    assert not torch.equal(a, policy.init_latents(3, torch.Generator().manual_seed(6)))
    # One generator per sample: sample i depends on generator i only (batch composition does not matter).

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    many = policy.init_latents(3, gens([7, 8, 9]))
    assert torch.equal(many[1], policy.init_latents(1, gens([8]))[0])
    assert torch.equal(many[2], policy.init_latents(2, gens([1, 9]))[1])
    torch.testing.assert_close(many.mean(), torch.tensor(0.0), atol=0.3, rtol=0)
    with pytest.raises(ValueError, match="2 generators for n=3"):
        policy.init_latents(3, gens([1, 2]))


# --- conditioning ------------------------------------------------------------------------------------------


def test_cond_slicing_and_micro_batches():
    policy = make_policy(true_cfg_scale=2.0)
    cond = policy.encode(PROMPTS)
    assert len(cond) == 4 and cond.neg_prompt_embeds.shape == (4, L, D)
    assert torch.equal(cond[1:3].prompt_embeds, cond.prompt_embeds[1:3])
    assert torch.equal(cond[torch.tensor([3, 0])].neg_pooled, cond.neg_pooled[[3, 0]])
    assert len(cond[2]) == 1 and torch.equal(cond[2].pooled, cond.pooled[2:3])  # an int keeps the batch dim
    x, sigma = torch.randn(4, C, H, W), torch.full((4,), 0.6)
    with torch.no_grad():
        full = policy.velocity(x, sigma, cond)
        halves = torch.cat([policy.velocity(x[:2], sigma[:2], cond[:2]), policy.velocity(x[2:], sigma[2:], cond[2:])])
    torch.testing.assert_close(halves, full, atol=1e-5, rtol=1e-5)


def test_cond_from_precomputed_embeddings_gives_the_same_velocity():
    policy = make_policy()
    cond = policy.encode(PROMPTS)
    cached = FluxCond(prompt_embeds=cond.prompt_embeds.clone(), pooled=cond.pooled.clone())
    x = torch.randn(4, C, H, W)
    torch.testing.assert_close(policy.velocity(x, torch.full((4,), 0.4), cached),
                               policy.velocity(x, torch.full((4,), 0.4), cond), atol=0, rtol=0)
    with pytest.raises(ValueError, match="same batch size"):
        FluxCond(prompt_embeds=torch.zeros(2, L, D), pooled=torch.zeros(3, P))
    with pytest.raises(ValueError, match="cond has 4 prompts for a batch of 2"):
        policy.velocity(x[:2], torch.full((2,), 0.4), cond)


def test_cached_embeddings_stand_in_for_the_text_encoder(tmp_path):
    """Real FLUX trains from cached T5/CLIP embeddings: a cache file replaces the text encoder, same velocity."""
    policy = make_policy(true_cfg_scale=2.0, negative_prompt="blurry")
    path = policy.save_prompt_embeddings(PROMPTS, tmp_path / "emb.safetensors")
    cache = PromptEmbeddingCache(path, "flux", ("prompt_embeds", "pooled"))
    cached = FluxPolicy(policy.transformer, cache, ToyCodec(), true_cfg_scale=2.0, negative_prompt="blurry")
    x, sigma = torch.randn(4, C, H, W), torch.full((4,), 0.8)
    with torch.no_grad():
        torch.testing.assert_close(cached.velocity(x, sigma, cached.encode(PROMPTS)),
                                   policy.velocity(x, sigma, policy.encode(PROMPTS)), atol=0, rtol=0)


def test_cfg_off_is_one_pass_without_negatives():
    policy = make_policy()
    cond = policy.encode(PROMPTS)
    assert cond.neg_prompt_embeds is None and cond.negative() is None


def test_true_cfg_combines_conditional_and_negative_passes():
    """v = v_neg + s (v_cond - v_neg), with v_neg the same network on the negative prompt's embeddings."""
    transformer = tiny_flux()
    plain = make_policy(transformer)
    guided = make_policy(transformer, true_cfg_scale=3.0, negative_prompt="blurry")
    x, sigma = torch.randn(4, C, H, W), torch.rand(4)
    with torch.no_grad():
        v_cond = plain.velocity(x, sigma, plain.encode(PROMPTS))
        v_neg = plain.velocity(x, sigma, plain.encode(["blurry"] * 4))
        v = guided.velocity(x, sigma, guided.encode(PROMPTS))
    torch.testing.assert_close(v, v_neg + 3.0 * (v_cond - v_neg), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="negative-prompt embeddings"):
        guided.velocity(x, sigma, plain.encode(PROMPTS))
    with pytest.raises(ValueError, match="true_cfg_scale must be >= 1"):
        make_policy(true_cfg_scale=0.5)


def test_distilled_guidance_is_fed_to_guidance_embeds():
    transformer = tiny_flux(guidance_embeds=True)
    x, sigma = torch.randn(2, C, H, W), torch.full((2,), 0.5)
    default = make_policy(transformer)
    assert default.guidance_scale == 3.5  # FLUX.1-dev's default
    cond = default.encode(PROMPTS[:2])
    with torch.no_grad():
        ref = transformer(
            hidden_states=pack_latents(x), encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled,
            timestep=sigma, img_ids=latent_image_ids(H // 2, W // 2, x.device, x.dtype), txt_ids=torch.zeros(L, 3),
            guidance=torch.full((2,), 5.0), return_dict=False,
        )[0]
        v5 = make_policy(transformer, guidance_scale=5.0).velocity(x, sigma, cond)
        assert not torch.allclose(v5, default.velocity(x, sigma, cond))
    torch.testing.assert_close(v5, unpack_latents(ref, H, W), atol=0, rtol=0)
    with pytest.raises(ValueError, match="guidance-distilled"):
        make_policy(tiny_flux(guidance_embeds=False), guidance_scale=3.5)


def test_codec_and_transformer_must_agree():
    class WideCodec(ToyCodec):
        latent_shape = (8, H, W)

    with pytest.raises(ValueError, match="in_channels 32"):
        FluxPolicy(tiny_flux(), ToyText(), WideCodec())


# --- trainable parameters ------------------------------------------------------------------------------------


def test_trainable_parameters_full_then_lora_only():
    policy = make_policy()
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("transformer.") for n in names)  # the text encoder is frozen
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))

    x, sigma, cond = torch.randn(2, C, H, W), torch.full((2,), 0.5), policy.encode(PROMPTS[:2])
    before = policy.velocity(x, sigma, cond).detach()
    add_lora(policy, LoraConfig(rank=2, alpha=2.0))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for p in policy.trainable_parameters()} == {
        id(p) for n, p in policy.named_parameters() if p.requires_grad
    }
    torch.testing.assert_close(policy.velocity(x, sigma, cond), before)  # LoRA B starts at zero
    policy.velocity(x, sigma, cond).square().sum().backward()
    assert all(p.grad is not None for n, p in policy.named_parameters() if "lora_A" in n)
