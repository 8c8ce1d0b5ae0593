"""Model kind ``qwen-image`` on a tiny random Qwen-Image twin (CPU, offline).

The twin is written to disk in the QwenImagePipeline layout and read back through the real loading code. The
references are diffusers' own ``QwenImagePipeline`` assembled from the same modules (its prompt encoding and its
whole denoise-and-decode loop, true CFG and norm rescaling included), direct transformer and VAE calls with the
pipeline's conventions spelled out here, the CFG-and-rescale formula on separately computed passes, and the SDE
log-density re-evaluated on a sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _helpers import (
    CPU,
    check_flow_policy_contract,
    check_full_and_lora_trainables,
    check_resampled_ratio_is_one,
    latents,
)
from otca.config import ConfigError, ModelConfig, load_config
from otca.flow import dance_sde_step, make_sigmas
from otca.models.build import BuildInputs, save_components
from otca.models.embedding_cache import PromptEmbeddingCache
from otca.models.flux import pack_latents, unpack_latents
from otca.models.guidance import cfg_renorm
from otca.models.qwen_image import (
    QWEN_IMAGE_DROP,
    QWEN_IMAGE_TEMPLATE,
    QwenImageCond,
    QwenImageOptions,
    QwenImagePolicy,
    QwenImageTextEncoder,
    qwen_image_policy_from_components,
    tiny_qwen_image_components,
)
from otca.models.registry import build_policy, policy_kinds
from otca.rollout import sample_ode
from otca.trainer import Trainer

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "two dogs on grass", "a photo of a tree"]
L = 24  # text tokens kept per prompt: short, to keep the twin fast (the prompts above need at most 18)
OPTIONS = {"max_sequence_length": L, "resolution": 32}
SIGMAS = torch.tensor([1.0, 0.6, 0.2])


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A QwenImagePipeline-layout directory holding the tiny random twin (seed 0)."""
    root = save_components(tiny_qwen_image_components(0), tmp_path_factory.mktemp("qwen-image"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5,
         "max_shift": 0.9, "shift_terminal": 0.02}
    ))
    return root


@pytest.fixture(scope="module")
def policy(qwen_dir) -> QwenImagePolicy:
    """True CFG at the pipeline's default 4.0 against its " " negative prompt."""
    return build_policy(ModelConfig(kind="qwen-image", path=str(qwen_dir), options=OPTIONS), CPU)


@pytest.fixture(scope="module")
def plain(qwen_dir) -> QwenImagePolicy:
    """The same weights without CFG."""
    opts = {**OPTIONS, "true_cfg_scale": 1.0}
    return build_policy(ModelConfig(kind="qwen-image", path=str(qwen_dir), options=opts), CPU)


# ------------------------------------------------------------------------------------------- loading, shapes


def test_registered_loaded_from_disk_with_the_twin_weights(policy):
    assert "qwen-image" in policy_kinds()
    check_flow_policy_contract(policy, PROMPTS, SIGMAS)
    twin, loaded = tiny_qwen_image_components(0), policy.state_dict()
    for name, prefix in (("transformer", "transformer."), ("vae", "vae."), ("text_encoder", "text.text_encoder.")):
        saved = twin[name].state_dict()
        assert all(torch.equal(t, loaded[prefix + k]) for k, t in saved.items()), name
    assert isinstance(policy.text, QwenImageTextEncoder)
    assert (policy.true_cfg_scale, policy.negative_prompt, policy.cfg_on) == (4.0, " ", True)


def test_shapes_and_a_tiny_size(policy):
    x, cond = latents(policy), policy.encode(PROMPTS)
    assert x.shape == (3, 16, 4, 4)  # 32 px / 8
    assert cond.prompt_embeds.shape == (3, L, 32) and cond.prompt_mask.shape == (3, L)
    with torch.no_grad():
        v, pixels = policy.velocity(x, SIGMAS, cond), policy.decode(x)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert pixels.shape == (3, 3, 32, 32) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    assert 0 < sum(p.numel() for p in policy.trainable_parameters()) < 300_000


def test_the_tiny_tokenizer_cuts_the_template_prefix_at_34_tokens(policy):
    """The pipeline drops the first 34 hidden states: the real Qwen2 vocabulary's count for the template's system
    turn plus '<|im_start|>user\\n'. The tiny tokenizer's whole-word merges give the same count, so what is kept
    starts exactly at the prompt."""
    tok = policy.text.tokenizers[0]
    prefix = QWEN_IMAGE_TEMPLATE.split("{}")[0]
    ids = tok(prefix).input_ids
    assert len(ids) == QWEN_IMAGE_DROP
    full = tok(QWEN_IMAGE_TEMPLATE.format("a red cat")).input_ids
    assert full[:QWEN_IMAGE_DROP] == ids
    assert tok.decode(full[QWEN_IMAGE_DROP:]).startswith("a red cat<|im_end|>")


def test_resolution_options_and_bad_sizes():
    parts = tiny_qwen_image_components(0, text=False)

    def shape(**opts):
        inputs = BuildInputs(QwenImageOptions(tiny=True, **opts), parts, cache=lambda p: {})
        return qwen_image_policy_from_components(inputs).latent_shape

    assert shape() == (16, 4, 4) and shape(height=48, width=32) == (16, 6, 4) and shape(resolution=64) == (16, 8, 8)
    with pytest.raises(ValueError, match="multiples of 16, got 40x32"):
        shape(height=40, width=32)


# ------------------------------------------------------------------------------- against diffusers' pipeline


def _pipeline(policy: QwenImagePolicy):
    """diffusers' QwenImagePipeline on the very same modules, with an unshifted Euler scheduler (our sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False), vae=policy.vae,
        text_encoder=policy.text.text_encoder, tokenizer=policy.text.tokenizers[0], transformer=policy.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_encode_matches_the_pipeline(policy):
    """Same hidden states at the same places; ours zero-padded to L where the pipeline pads to the longest."""
    with torch.no_grad():
        embeds, mask = _pipeline(policy).encode_prompt(PROMPTS, device=CPU, max_sequence_length=L)
    cond = policy.encode(PROMPTS)
    n = embeds.shape[1]
    assert n < L and mask is not None and not bool(mask.all())  # prompts of different lengths
    torch.testing.assert_close(cond.prompt_embeds[:, :n], embeds, rtol=0, atol=0)
    assert torch.equal(cond.prompt_mask[:, :n], mask) and not cond.prompt_mask[:, n:].any()
    assert not cond.prompt_embeds[:, n:].any()
    with torch.no_grad():
        neg, _ = _pipeline(policy).encode_prompt([" "], device=CPU, max_sequence_length=L)
    torch.testing.assert_close(cond.neg_prompt_embeds[:, : neg.shape[1]], neg.expand(3, -1, -1), rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_ode_sampling_and_decoding_match_the_pipeline(policy, plain, cfg):
    """Template, drop and mask, packing, img_shapes, timestep, true CFG with norm rescaling, Euler steps, the VAE's
    latents_mean/std and the [0, 1] conversion, all at once: our ODE samples decoded == QwenImagePipeline's images
    from the same noise (with and without true CFG)."""
    pol = policy if cfg > 1 else plain
    sigmas = make_sigmas(4, 3.0)  # [5], ends at 0
    x = latents(pol, seed=5)
    with torch.no_grad():
        ours = pol.decode(sample_ode(pol, pol.encode(PROMPTS), x, sigmas))
        ref = _pipeline(pol)(
            PROMPTS, negative_prompt=[" "] * 3 if cfg > 1 else None, true_cfg_scale=cfg, height=32, width=32,
            num_inference_steps=4, sigmas=sigmas[:-1].tolist(), latents=pack_latents(x), output_type="pt",
            max_sequence_length=L,
        ).images
    assert ref.shape == ours.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_velocity_is_the_transformer_at_sigma_on_packed_tokens(plain):
    """Reference: one direct call per prompt (no padding at all), sigma as the timestep, img_shapes (1, h/2, w/2)."""
    x, cond = latents(plain), plain.encode(PROMPTS)
    with torch.no_grad():
        v = plain.velocity(x, SIGMAS, cond)

        def direct(i, t):
            n = int(cond.prompt_mask[i].sum())
            return plain.transformer(
                hidden_states=pack_latents(x[i : i + 1]), timestep=t,
                encoder_hidden_states=cond.prompt_embeds[i : i + 1, :n], img_shapes=[[(1, 2, 2)]], return_dict=False,
            )[0]

        ref = torch.cat([unpack_latents(direct(i, SIGMAS[i : i + 1]), 4, 4) for i in range(3)])
        torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6)
        wrong = torch.cat([unpack_latents(direct(i, 1000 * SIGMAS[i : i + 1]), 4, 4) for i in range(3)])
        assert not torch.allclose(v, wrong, atol=1e-3)


def test_true_cfg_is_the_rescaled_combination_of_separate_passes(policy, plain):
    x, cond = latents(policy), policy.encode(PROMPTS)
    with torch.no_grad():
        v = policy.velocity(x, SIGMAS, cond)
        v_cond = plain.velocity(x, SIGMAS, QwenImageCond.build(cond.positive()))
        v_neg = plain.velocity(x, SIGMAS, QwenImageCond.build(cond.negative()))
    guided = pack_latents(v_neg + 4.0 * (v_cond - v_neg))  # [3, S, 64]: the norm is per token
    c = pack_latents(v_cond)
    expect = unpack_latents(guided * c.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True), 4, 4)
    torch.testing.assert_close(v, expect, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(v, unpack_latents(guided, 4, 4), atol=1e-3)  # the rescaling matters
    with pytest.raises(ValueError, match="negative-prompt embeddings"):
        policy.velocity(x, SIGMAS, plain.encode(PROMPTS))


def test_cfg_renorm_by_hand():
    v = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # norms 5, 1
    c = torch.tensor([[0.0, 10.0], [0.0, -2.0]])  # norms 10, 2
    torch.testing.assert_close(cfg_renorm(v, c), torch.tensor([[6.0, 8.0], [2.0, 0.0]]))


def test_decode_inverts_the_latent_normalisation(plain):
    """Pipeline: latents = (z - latents_mean) / latents_std; decode maps them back to z, one frame."""
    vae = plain.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    z = torch.randn(2, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = plain.decode(((z - mean) / std)[:, :, 0])
        ref = (vae.decode(z).sample[:, :, 0] / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dynamic_shift_reads_the_scheduler_config(policy):
    """sampler.shift: auto -> exp(mu), mu interpolated in the image token count between the config's bounds."""
    d = policy.dynamic_shift
    assert d is not None and (d.image_seq_len, d.max_seq_len, d.max_shift) == (4, 8192, 0.9)
    m = (0.9 - 0.5) / (8192 - 256)
    assert d.mu == pytest.approx(4 * m + 0.5 - m * 256)


# ------------------------------------------------------------------------------------------ the SDE and grads


def test_sampled_transition_reevaluated_has_ratio_exactly_one(policy):
    check_resampled_ratio_is_one(policy, PROMPTS, dance_sde_step, eta=0.3)
    assert {n.split(".")[0] for n, p in policy.named_parameters() if p.requires_grad} == {"transformer"}


def _tiny(**kw) -> QwenImagePolicy:
    return build_policy(ModelConfig(kind="qwen-image", options={"tiny": True, **OPTIONS}, **kw), CPU)


def test_trainable_parameters_full_and_lora():
    check_full_and_lora_trainables(_tiny, PROMPTS, SIGMAS)


def test_gradient_checkpointing_gives_the_same_gradients_and_the_last_text_outputs_get_none():
    """The last block's text-stream outputs (its to_add_out and txt_mlp) reach nothing the velocity depends on, so
    they never get a gradient (hence ddp_find_unused_parameters in configs/qwen-image-otca.yaml); every other
    gradient is the same with checkpointing as without."""
    grads = []
    for checkpointing in (False, True):
        policy = _tiny(gradient_checkpointing=checkpointing)
        assert policy.transformer.is_gradient_checkpointing == checkpointing
        policy.velocity(latents(policy), SIGMAS, policy.encode(PROMPTS)).square().mean().backward()
        named = {n: p for n, p in policy.transformer.named_parameters() if p.requires_grad}
        none = {n.rsplit(".", 1)[0] for n, p in named.items() if p.grad is None}
        assert none == {"transformer_blocks.1.attn.to_add_out", "transformer_blocks.1.txt_mlp.net.0.proj",
                        "transformer_blocks.1.txt_mlp.net.2"}
        grads.append(torch.cat([p.grad.flatten() for p in named.values() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0])


def test_tiny_config_trains_two_iterations_with_lora(tmp_path, monkeypatch):
    """configs/tiny/qwen-image.yaml, 2 iterations through the Trainer: only LoRA weights move, losses finite."""
    monkeypatch.chdir(ROOT)  # the config's prompt files are repo-relative
    cfg = load_config("configs/tiny/qwen-image.yaml", [f"out_dir={tmp_path / 'run'}"])
    assert cfg.train.iterations == 2
    tr = Trainer(cfg)
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}
    tr.train()
    after = tr.policy.state_dict()
    lora = [k for k in before if "lora_" in k]
    assert lora and all(torch.equal(before[k], after[k]) for k in before if k not in lora)
    assert any(not torch.equal(before[k], after[k]) for k in lora if "lora_B" in k)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["train/policy_loss"])) for r in rows)


def test_paper_config_loads_with_valid_options():
    from otca.models.options import parse_options

    c = load_config(ROOT / "configs" / "qwen-image-otca.yaml")
    assert c.model.kind == "qwen-image" and c.model.path.startswith("/path/to/")
    opts = parse_options(QwenImageOptions, c.model.options)
    assert opts.resolution == 512 and opts.true_cfg_scale == 1.0


# ------------------------------------------------------------------------------- embeddings, options, errors


def test_precomputed_embeddings_stand_in_for_the_text_encoder(policy, qwen_dir, tmp_path):
    path = policy.save_prompt_embeddings(PROMPTS, tmp_path / "emb.safetensors", batch_size=2)
    options = {**OPTIONS, "embeddings": str(path)}
    cached = build_policy(ModelConfig(kind="qwen-image", path=str(qwen_dir), options=options), CPU)
    assert isinstance(cached.text, PromptEmbeddingCache)
    assert not any(n.startswith("text.") for n, _ in cached.named_parameters())  # encoder never loaded
    x = latents(policy)
    with torch.no_grad():
        expect = policy.velocity(x, SIGMAS, policy.encode(PROMPTS))
        torch.testing.assert_close(cached.velocity(x, SIGMAS, cached.encode(PROMPTS)), expect, rtol=1e-5, atol=1e-6)


def test_tiny_in_process_equals_the_saved_twin(policy):
    tiny = _tiny()
    with torch.no_grad():
        x = latents(policy)
        expect = policy.velocity(x, SIGMAS, policy.encode(PROMPTS))
        torch.testing.assert_close(tiny.velocity(x, SIGMAS, tiny.encode(PROMPTS)), expect)


def test_missing_path_folder_and_bad_options_are_one_line_errors(qwen_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_policy(ModelConfig(kind="qwen-image", path=str(tmp_path)), CPU)
    assert f"model 'qwen-image': '{tmp_path}' has no 'transformer' folder" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"model.options: unknown config key 'guidance_scale'"):
        build_policy(ModelConfig(kind="qwen-image", options={"tiny": True, "guidance_scale": 4.0}), CPU)
    with pytest.raises(ConfigError, match="max_sequence_length"):
        build_policy(ModelConfig(kind="qwen-image", options={"tiny": True, "max_sequence_length": 2000}), CPU)
    with pytest.raises(ValueError, match="leave model.path unset"):
        build_policy(ModelConfig(kind="qwen-image", path=str(qwen_dir), options={"tiny": True}), CPU)
