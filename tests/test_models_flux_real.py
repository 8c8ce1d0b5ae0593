"""Model kind ``flux`` (FLUX.1 from a local diffusers directory) on a tiny random FLUX.1 twin (CPU, offline).

The twin is written to disk in the FluxPipeline layout and read back through the real loading code. The
references are diffusers' own ``FluxPipeline`` assembled from the same parts (its prompt encoding and its whole
denoise-and-decode loop), the VAE's encoder called by hand, and the SDE log-density re-evaluated on a sample.
"""

from __future__ import annotations

import pytest
import torch

from _helpers import (
    CPU,
    check_checkpointing_keeps_gradients,
    check_flow_policy_contract,
    check_resampled_ratio_is_one,
    latents,
)
from otca.config import ConfigError, LoraConfig, ModelConfig, load_config
from otca.flow import dance_sde_step, make_sigmas
from otca.models.build import BuildInputs, save_components
from otca.models.embedding_cache import PromptEmbeddingCache
from otca.models.flux import (
    FLUX_DEV_GUIDANCE,
    FluxOptions,
    FluxPolicy,
    FluxTextEncoder,
    VaeCodec,
    flux_policy_from_components,
    tiny_flux_components,
)
from otca.models.registry import build_policy, policy_kinds
from otca.rollout import sample_ode
from otca.trainer import Trainer

torch.set_num_threads(1)

PROMPTS = ["a red cat", "two dogs on grass", "a photo of a tree"]
L = 12  # T5 tokens: short, to keep the tiny twin fast
OPTIONS = {"max_sequence_length": L, "resolution": 32}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """A FluxPipeline-layout directory holding the tiny random FLUX.1 twin (seed 0)."""
    return save_components(tiny_flux_components(0), tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def policy(flux_dir) -> FluxPolicy:
    return build_policy(ModelConfig(kind="flux", path=str(flux_dir), options=OPTIONS), CPU)


# ------------------------------------------------------------------------------------------- loading, shapes


def test_registered_loaded_from_disk_with_the_twin_weights(policy):
    assert "flux" in policy_kinds()
    check_flow_policy_contract(policy, PROMPTS, torch.tensor([1.0, 0.6, 0.2]))
    twin, loaded = tiny_flux_components(0), policy.state_dict()
    prefixes = (("transformer", "transformer."), ("vae", "codec.vae."), ("text_encoder_2", "text.text_encoder_2."))
    for name, prefix in prefixes:
        saved = twin[name].state_dict()
        assert all(torch.equal(t, loaded[prefix + k]) for k, t in saved.items()), name
    assert isinstance(policy.text, FluxTextEncoder) and isinstance(policy.codec, VaeCodec)
    vae = policy.codec.vae.config
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels) == (0.3611, 0.1159, 16)


def test_velocity_and_decode_shapes(policy):
    x, cond = latents(policy), policy.encode(PROMPTS)
    assert x.shape == (3, 16, 4, 4) and x.dtype == torch.float32  # 32 px / 8 (VAE)
    assert cond.prompt_embeds.shape == (3, L, 32) and cond.pooled.shape == (3, 24)
    v = policy.velocity(x, torch.tensor([1.0, 0.6, 0.2]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    pixels = policy.decode(x)
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1


def test_distilled_guidance_defaults_to_flux_dev(policy):
    assert policy.guidance_scale == FLUX_DEV_GUIDANCE and policy.true_cfg_scale == 1.0 and not policy.cfg_on
    assert policy.encode(PROMPTS).negative() is None


def test_resolution_options_and_bad_sizes():
    parts = tiny_flux_components(0)

    def shape(**opts):
        return flux_policy_from_components(BuildInputs(FluxOptions(tiny=True, **opts), parts)).latent_shape

    assert shape(height=48, width=32) == (16, 6, 4) and shape() == (16, 8, 8) and shape(resolution=16) == (16, 2, 2)
    with pytest.raises(ValueError, match="multiples of 16, got 40x32"):
        shape(height=40, width=32)


# ------------------------------------------------------------------------------- against diffusers' pipeline


def _pipeline(policy: FluxPolicy):
    """diffusers' FluxPipeline on the very same modules, with an unshifted Euler scheduler (our sigmas as given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    text = policy.text
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=policy.codec.vae, text_encoder=text.text_encoder, tokenizer=text.tokenizers[0],
        text_encoder_2=text.text_encoder_2, tokenizer_2=text.tokenizers[1], transformer=policy.transformer,
    )


def test_encode_matches_the_pipeline(policy):
    pipe = _pipeline(policy)
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=L)
    cond = policy.encode(PROMPTS)
    torch.testing.assert_close(cond.prompt_embeds, prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert torch.equal(text_ids, torch.zeros(L, 3))  # what velocity rebuilds


def test_ode_sampling_and_decoding_match_the_pipeline(policy):
    """Text encoding, packing, position ids, distilled guidance, timesteps, Euler steps, VAE scaling/shift and
    the [0, 1] conversion, all at once: our ODE samples decoded == FluxPipeline's images from the same noise."""
    from otca.models.flux import pack_latents

    pipe = _pipeline(policy)
    sigmas = make_sigmas(4, 3.0)  # [5], ends at 0
    x = latents(policy, seed=5)
    with torch.no_grad():
        ours = policy.decode(sample_ode(policy, policy.encode(PROMPTS), x, sigmas))
        ref = pipe(
            PROMPTS, height=32, width=32, num_inference_steps=4, sigmas=sigmas[:-1].tolist(),
            guidance_scale=FLUX_DEV_GUIDANCE, latents=pack_latents(x), output_type="pt", max_sequence_length=L,
        ).images
    assert ref.shape == ours.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_codec_encode_is_the_scaled_posterior_mean(policy):
    vae, pixels = policy.codec.vae, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean = vae.encode(2 * pixels - 1).latent_dist.mean  # [2, 16, 4, 4]
        torch.testing.assert_close(policy.codec.encode(pixels), (mean - 0.1159) * 0.3611)


# ------------------------------------------------------------------------------------------ the SDE and grads


def test_sampled_transition_reevaluated_has_ratio_exactly_one(policy):
    check_resampled_ratio_is_one(policy, PROMPTS, dance_sde_step, eta=0.3)
    assert {n.split(".")[0] for n, p in policy.named_parameters() if p.requires_grad} == {"transformer"}


def test_lora_on_the_transformer_only_fp32_adapters_on_bf16(flux_dir):
    cfg = ModelConfig(kind="flux", path=str(flux_dir), options=OPTIONS, dtype="bfloat16",
                      lora=LoraConfig(rank=2, alpha=2.0), gradient_checkpointing=True)
    policy = build_policy(cfg, CPU)
    lora = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    assert lora and all(n.startswith("transformer.") for n in lora)  # the VAE's to_q / to_k / to_v stay plain
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == set(lora)
    assert all(p.dtype == torch.float32 for p in lora.values())  # updates of 1e-5 survive
    assert policy.transformer.dtype == torch.bfloat16 and policy.transformer.is_gradient_checkpointing
    x, cond = latents(policy, 2), policy.encode(PROMPTS[:2])
    assert cond.prompt_embeds.dtype == torch.bfloat16  # text encoders in cfg.dtype
    policy.train()
    v = policy.velocity(x, torch.full((2,), 0.5), cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in lora.items() if "lora_A" in n)
    assert not policy.text.training and not policy.codec.training  # frozen parts stay in eval mode


def test_trainer_with_lora_changes_only_the_lora_weights(tmp_path, monkeypatch):
    """configs/tiny/flux.yaml with model.lora set, 2 iterations: every non-LoRA tensor is bit-identical after
    training, the LoRA weights moved, and the losses are finite."""
    import json
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the config's prompt files are repo-relative
    cfg = load_config("configs/tiny/flux.yaml", [f"out_dir={tmp_path / 'run'}", "model.lora.rank=4",
                                                 "model.lora.alpha=4", "model.options.resolution=32"])
    tr = Trainer(cfg)
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    tr.train()
    after = tr.policy.state_dict()
    assert before.keys() == after.keys()
    lora = [k for k in before if "lora_" in k]
    assert lora and set(tr.params) == {k for k in lora}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in lora)
    assert any(not torch.equal(before[k], after[k]) for k in lora if "lora_B" in k)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["train/policy_loss"])) for r in rows)
    assert rows[0]["train/ratio_first_step_max_dev"] == 0.0


def test_gradient_checkpointing_gives_the_same_gradients(flux_dir):
    def build(**kw):
        return build_policy(ModelConfig(kind="flux", path=str(flux_dir), options=OPTIONS, **kw), CPU)

    check_checkpointing_keeps_gradients(build, PROMPTS, torch.full((3,), 0.4))


# ------------------------------------------------------------------------------- embeddings, options, errors


def test_precomputed_embeddings_stand_in_for_the_text_encoders(policy, flux_dir, tmp_path):
    path = policy.save_prompt_embeddings(PROMPTS, tmp_path / "emb.safetensors", batch_size=2)
    options = {**OPTIONS, "embeddings": str(path)}
    cached = build_policy(ModelConfig(kind="flux", path=str(flux_dir), options=options), CPU)
    assert isinstance(cached.text, PromptEmbeddingCache)
    assert not any(n.startswith("text.") for n, _ in cached.named_parameters())  # encoders never loaded
    x, s = latents(policy), torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        expect = policy.velocity(x, s, policy.encode(PROMPTS))
        torch.testing.assert_close(cached.velocity(x, s, cached.encode(PROMPTS)), expect)


def test_tiny_in_process_equals_the_saved_twin(policy):
    tiny = build_policy(ModelConfig(kind="flux", options={**OPTIONS, "tiny": True}), CPU)
    x, s = latents(policy), torch.full((3,), 0.7)
    with torch.no_grad():
        expect = policy.velocity(x, s, policy.encode(PROMPTS))
        torch.testing.assert_close(tiny.velocity(x, s, tiny.encode(PROMPTS)), expect)


def test_missing_path_and_folder_are_one_line_errors(flux_dir, tmp_path):
    cases = [
        (ModelConfig(kind="flux"), "model 'flux': model.path is not set"),
        (ModelConfig(kind="flux", path=str(tmp_path / "FLUX.1-dev")),
         f"model 'flux': model.path '{tmp_path / 'FLUX.1-dev'}' is not a directory"),
        (ModelConfig(kind="flux", path=str(tmp_path)), f"model 'flux': '{tmp_path}' has no 'transformer' folder"),
    ]
    partial = tmp_path / "partial"
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "tokenizer_2"):
        (partial / name).mkdir(parents=True)
    cases.append((ModelConfig(kind="flux", path=str(partial)), f"'{partial}' has no 'text_encoder_2' folder"))
    for cfg, needle in cases:
        with pytest.raises(FileNotFoundError) as e:
            build_policy(cfg, CPU)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_options_are_one_line_errors(flux_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model.options: unknown config key 'guidance'"):
        build_policy(ModelConfig(kind="flux", options={"tiny": True, "guidance": 3.5}), CPU)
    with pytest.raises(ConfigError, match=r"'max_sequence_length'"):
        build_policy(ModelConfig(kind="flux", options={"tiny": True, "max_sequence_length": 1024}), CPU)
    with pytest.raises(ValueError, match="leave model.path unset"):
        build_policy(ModelConfig(kind="flux", path=str(flux_dir), options={"tiny": True}), CPU)
    with pytest.raises(FileNotFoundError, match="model.options.embeddings file"):
        build_policy(ModelConfig(kind="flux", options={"tiny": True, "embeddings": str(tmp_path / "none")}), CPU)


def test_schnell_like_transformer_runs_without_guidance():
    """FLUX.1-schnell has no guidance embedding: guidance_scale None means none, a number is an error."""
    from diffusers import FluxTransformer2DModel

    parts = tiny_flux_components(0)
    torch.manual_seed(0)
    parts["transformer"] = FluxTransformer2DModel.from_config({**parts["transformer"].config, "guidance_embeds": False})
    schnell = flux_policy_from_components(BuildInputs(FluxOptions(tiny=True, **OPTIONS), parts))
    assert schnell.guidance_scale is None
    v = schnell.velocity(latents(schnell, 1), torch.ones(1), schnell.encode(PROMPTS[:1]))
    assert torch.isfinite(v).all()
    with pytest.raises(ValueError, match="guidance-distilled"):
        opts = FluxOptions(tiny=True, guidance_scale=3.5, **OPTIONS)
        flux_policy_from_components(BuildInputs(opts, parts))
