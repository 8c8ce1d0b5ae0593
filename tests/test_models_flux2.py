"""Model kind ``flux2`` on a tiny random FLUX.2 twin (CPU, offline).

The twin is written to disk in the Flux2Pipeline layout and read back through the real loading code. The
references are diffusers' own ``Flux2Pipeline`` assembled from the same modules (its prompt encoding and its whole
denoise-and-decode loop), its patchify helpers, direct transformer and VAE calls with the pipeline's conventions
spelled out here, and the SDE log-density re-evaluated on a sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import (
    CPU,
    check_checkpointing_keeps_gradients,
    check_flow_policy_contract,
    check_full_and_lora_trainables,
    check_resampled_ratio_is_one,
    latents,
)
from otca.config import ConfigError, ModelConfig, load_config
from otca.flow import dance_sde_step, make_sigmas
from otca.models.build import save_components
from otca.models.embedding_cache import PromptEmbeddingCache
from otca.models.flux2 import (
    FLUX2_GUIDANCE,
    Flux2Options,
    Flux2Policy,
    Flux2TextEncoder,
    patchify,
    tiny_flux2_components,
    unpatchify,
)
from otca.models.options import parse_options
from otca.models.registry import build_policy, policy_kinds
from otca.rollout import sample_ode
from otca.trainer import Trainer

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "two dogs on grass", "a photo of a tree"]
L = 64  # text tokens, system turn (~30 with the twin's tokenizer) included
OPTIONS = {"max_sequence_length": L, "resolution": 32}
SIGMAS = torch.tensor([1.0, 0.6, 0.2])


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    return save_components(tiny_flux2_components(0), tmp_path_factory.mktemp("flux2"))


@pytest.fixture(scope="module")
def policy(flux2_dir) -> Flux2Policy:
    return build_policy(ModelConfig(kind="flux2", path=str(flux2_dir), options=OPTIONS), CPU)


def _pipeline(policy: Flux2Policy):
    """diffusers' Flux2Pipeline on the very same modules, with an unshifted Euler scheduler (our sigmas as given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False), vae=policy.vae,
        text_encoder=policy.text.text_encoder, tokenizer=policy.text.tokenizers[0], transformer=policy.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_registered_loaded_from_disk_with_the_twin_weights(policy):
    assert "flux2" in policy_kinds()
    check_flow_policy_contract(policy, PROMPTS, SIGMAS)
    twin, loaded = tiny_flux2_components(0), policy.state_dict()
    for name, prefix in (("transformer", "transformer."), ("vae", "vae."), ("text_encoder", "text.text_encoder.")):
        saved = twin[name].state_dict()
        assert all(torch.equal(t, loaded[prefix + k]) for k, t in saved.items()), name
    assert isinstance(policy.text, Flux2TextEncoder) and policy.guidance_scale == FLUX2_GUIDANCE
    assert latents(policy).shape == (3, 128, 2, 2)  # 32 px / 8 (VAE) / 2 (patchify), 4 x 32 channels
    assert 0 < sum(p.numel() for p in policy.trainable_parameters()) < 300_000


def test_encode_matches_the_pipeline(policy):
    with torch.no_grad():
        embeds, ids = _pipeline(policy).encode_prompt(PROMPTS, device=CPU, max_sequence_length=L)
    cond = policy.encode(PROMPTS)
    assert cond.prompt_embeds.shape == (3, L, 48) and cond.negative() is None
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    assert torch.equal(ids[0, :, 3], torch.arange(L)) and not ids[..., :3].any()  # (0, 0, 0, l), as velocity's


def test_ode_sampling_and_decoding_match_the_pipeline(policy):
    """Chat template and hidden layers, token order, 4-axis ids, guidance, timestep, Euler steps, the batch-norm
    de-normalisation, unpatchify and the [0, 1] conversion at once: our ODE samples decoded == Flux2Pipeline's."""
    sigmas = make_sigmas(4, 3.0)
    x = latents(policy, seed=5)
    with torch.no_grad():
        ours = policy.decode(sample_ode(policy, policy.encode(PROMPTS), x, sigmas))
        ref = _pipeline(policy)(
            prompt=PROMPTS, height=32, width=32, num_inference_steps=4, sigmas=sigmas[:-1].tolist(),
            guidance_scale=FLUX2_GUIDANCE, latents=x, output_type="pt", max_sequence_length=L,
        ).images
    assert ref.shape == ours.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_patchify_is_the_pipelines_and_inverts():
    from diffusers import Flux2Pipeline

    z = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(patchify(z), Flux2Pipeline._patchify_latents(z))
    assert torch.equal(unpatchify(patchify(z)), z)
    assert patchify(z)[0, 1, 0, 0] == z[0, 0, 0, 1] and patchify(z)[0, 2, 0, 0] == z[0, 0, 1, 0]  # (c, dy, dx)


def test_decode_undoes_the_batch_norm_statistics(policy):
    vae = policy.vae
    assert not torch.allclose(vae.bn.running_mean, torch.zeros_like(vae.bn.running_mean))  # the test can fail
    z = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(1))
    mean, var = vae.bn.running_mean.view(1, -1, 1, 1), vae.bn.running_var.view(1, -1, 1, 1)
    x = (patchify(z) - mean) / torch.sqrt(var + vae.config.batch_norm_eps)
    with torch.no_grad():
        out = policy.decode(x)
        ref = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_velocity_feeds_sigma_and_the_guidance(policy):
    x, cond = latents(policy), policy.encode(PROMPTS)
    tokens = x.flatten(2).transpose(1, 2)  # [3, 4, 128]
    img = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]]).expand(3, -1, -1)
    txt = torch.stack([torch.zeros(L), torch.zeros(L), torch.zeros(L), torch.arange(L)], 1).long().expand(3, -1, -1)

    def direct(t, g):
        out = policy.transformer(hidden_states=tokens, encoder_hidden_states=cond.prompt_embeds, timestep=t,
                                 img_ids=img, txt_ids=txt, guidance=torch.full((3,), g), return_dict=False)[0]
        return out.transpose(1, 2).reshape(x.shape)

    with torch.no_grad():
        v = policy.velocity(x, SIGMAS, cond)
        torch.testing.assert_close(v, direct(SIGMAS, FLUX2_GUIDANCE), rtol=0, atol=0)
        assert not torch.allclose(v, direct(SIGMAS * 1000, FLUX2_GUIDANCE), atol=1e-3)
        assert not torch.allclose(v, direct(SIGMAS, 1.0), atol=1e-4)


def test_sampled_transition_reevaluated_has_ratio_exactly_one(policy):
    check_resampled_ratio_is_one(policy, PROMPTS, dance_sde_step, eta=0.3)


def _tiny(**kw) -> Flux2Policy:
    return build_policy(ModelConfig(kind="flux2", options={"tiny": True, **OPTIONS}, **kw), CPU)


def test_trainable_parameters_full_and_lora_and_checkpointing():
    check_full_and_lora_trainables(_tiny, PROMPTS, SIGMAS)
    check_checkpointing_keeps_gradients(_tiny, PROMPTS, SIGMAS)


def test_precomputed_embeddings_stand_in_for_the_text_encoder(policy, flux2_dir, tmp_path):
    path = policy.save_prompt_embeddings(PROMPTS, tmp_path / "emb.safetensors", batch_size=2)
    cached = build_policy(
        ModelConfig(kind="flux2", path=str(flux2_dir), options={**OPTIONS, "embeddings": str(path)}), CPU
    )
    assert isinstance(cached.text, PromptEmbeddingCache)
    assert not any(n.startswith("text.") for n, _ in cached.named_parameters())
    x = latents(policy)
    with torch.no_grad():
        expect = policy.velocity(x, SIGMAS, policy.encode(PROMPTS))
        torch.testing.assert_close(cached.velocity(x, SIGMAS, cached.encode(PROMPTS)), expect, rtol=1e-5, atol=1e-6)


def test_tiny_config_trains_two_iterations_with_lora(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/tiny/flux2.yaml", [f"out_dir={tmp_path / 'run'}"])
    tr = Trainer(cfg)
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    tr.train()
    after = tr.policy.state_dict()
    lora = [k for k in before if "lora_" in k]
    assert lora and all(torch.equal(before[k], after[k]) for k in before if k not in lora)
    assert any(not torch.equal(before[k], after[k]) for k in lora if "lora_B" in k)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["train/policy_loss"])) for r in rows)


def test_paper_config_loads_and_bad_options_are_one_line_errors(flux2_dir):
    c = load_config(ROOT / "configs" / "flux2-otca.yaml")
    opts = parse_options(Flux2Options, c.model.options)
    assert c.model.kind == "flux2" and opts.guidance_scale == 4.0 and opts.resolution == 512
    with pytest.raises(ConfigError, match="unknown config key 'true_cfg_scale'"):
        build_policy(ModelConfig(kind="flux2", options={"tiny": True, "true_cfg_scale": 2.0}), CPU)
    with pytest.raises(ValueError, match="multiples of 16, got 40x32"):
        build_policy(ModelConfig(kind="flux2", options={"tiny": True, "height": 40, "width": 32}), CPU)
    with pytest.raises(ValueError, match="leave model.path unset"):
        build_policy(ModelConfig(kind="flux2", path=str(flux2_dir), options={"tiny": True}), CPU)
