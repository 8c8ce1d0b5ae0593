"""``otca export``: a run's LoRA, merged and full weights loaded back by diffusers' own loaders (FluxPipeline's
``load_lora_weights``, ``FluxTransformer2DModel.from_pretrained``) reproduce the trained policy: the same
transformer output and the same decoded samples as otca's own ODE sampler. Tiny random FLUX.1 twin, CPU, offline;
a run directory is written by hand (config.yaml plus a checkpoint of perturbed weights): no training needed."""

from __future__ import annotations

import json

import pytest
import torch

from _helpers import CPU, latents
from otca.checkpoint import save_checkpoint
from otca.config import dump_config, load_config
from otca.export import LORA_FILE, export_policy, export_run, merged_state_dict
from otca.flow import make_sigmas
from otca.models.flux import FLUX_DEV_GUIDANCE, pack_latents, tiny_flux_components
from otca.models.registry import build_policy
from otca.rollout import sample_ode

torch.set_num_threads(1)

PROMPTS = ["a red cat", "two dogs on grass"]
L = 12
OVERRIDES = ["model.options.resolution=32", f"model.options.max_sequence_length={L}"]


def _perturb(policy, seed: int = 0) -> None:
    """Move every trainable weight (LoRA B starts at zero: give it a visible update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in policy.named_parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A run directory of the tiny FLUX twin with LoRA (rank 2, alpha 4) and its perturbed policy."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/tiny/flux.yaml", [*OVERRIDES, "model.lora={rank: 2, alpha: 4.0}", f"out_dir={run}"])
    (run / "config.yaml").write_text(dump_config(cfg))
    policy = build_policy(cfg.model, CPU)
    _perturb(policy)
    weights = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    assert weights and all("lora_" in n for n in weights)
    save_checkpoint(run, 1, weights, {}, {})
    return run, policy


def _pipeline(policy, transformer):
    """diffusers' FluxPipeline on the policy's text encoders and VAE and the given transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    text = policy.text
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=policy.codec.vae, text_encoder=text.text_encoder, tokenizer=text.tokenizers[0],
        text_encoder_2=text.text_encoder_2, tokenizer_2=text.tokenizers[1], transformer=transformer,
    )


def _check_reproduces(policy, pipe) -> None:
    """The pipeline's transformer gives the policy's velocity, and its images equal the policy's ODE samples."""
    x, sigma = latents(policy, n=2, seed=3), torch.tensor([0.9, 0.4])
    cond = policy.encode(PROMPTS)
    sigmas = make_sigmas(4, 3.0)
    with torch.no_grad():
        ref_v = pipe.transformer(
            hidden_states=pack_latents(x), encoder_hidden_states=cond.prompt_embeds, pooled_projections=cond.pooled,
            timestep=sigma, img_ids=pipe._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32),
            txt_ids=torch.zeros(L, 3), guidance=torch.full((2,), FLUX_DEV_GUIDANCE), return_dict=False,
        )[0]
        torch.testing.assert_close(pack_latents(policy.velocity(x, sigma, cond)), ref_v, rtol=0, atol=1e-5)
        ours = policy.decode(sample_ode(policy, cond, x, sigmas))
        ref = pipe(
            PROMPTS, height=32, width=32, num_inference_steps=4, sigmas=sigmas[:-1].tolist(),
            guidance_scale=FLUX_DEV_GUIDANCE, latents=pack_latents(x), output_type="pt", max_sequence_length=L,
        ).images
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def _base_transformer():
    return tiny_flux_components(0, text=False)["transformer"]


def test_lora_export_loads_into_the_pipeline_and_reproduces_the_samples(lora_run, tmp_path):
    run, policy = lora_run
    out = export_run(run, tmp_path / "lora", fmt="auto")
    assert json.loads((out / "export.json").read_text()) == {"format": "lora", "files": {"transformer": LORA_FILE}}
    pipe = _pipeline(policy, _base_transformer())
    with torch.no_grad():  # the base pipeline differs from the trained policy (the check can fail)
        x, cond = latents(policy, n=2), policy.encode(PROMPTS)
        base = pipe.transformer(hidden_states=pack_latents(x), encoder_hidden_states=cond.prompt_embeds,
                                pooled_projections=cond.pooled, timestep=torch.tensor([0.5, 0.5]),
                                img_ids=pipe._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32),
                                txt_ids=torch.zeros(L, 3), guidance=torch.full((2,), 3.5), return_dict=False)[0]
        assert (base - pack_latents(policy.velocity(x, torch.tensor([0.5, 0.5]), cond))).abs().max() > 1e-3
    pipe.load_lora_weights(out)
    _check_reproduces(policy, pipe)


def test_lora_export_keeps_rank_and_alpha(lora_run, tmp_path):
    from safetensors import safe_open

    run, _ = lora_run
    out = export_run(run, tmp_path / "lora", fmt="lora")
    with safe_open(str(out / LORA_FILE), framework="pt") as f:
        keys, meta = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") and ".lora_" in k and ".default." not in k for k in keys)
    assert meta["transformer.r"] == 2 and meta["transformer.lora_alpha"] == 4.0


def test_merged_export_is_a_from_pretrained_transformer_reproducing_the_samples(lora_run, tmp_path):
    from diffusers import FluxTransformer2DModel

    run, policy = lora_run
    out = export_run(run, tmp_path / "merged", fmt="merged")
    merged = FluxTransformer2DModel.from_pretrained(out / "transformer")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    _check_reproduces(policy, _pipeline(policy, merged))


def test_merged_weights_by_hand():
    """One LoRA layer: W + (alpha / r) B A, written out."""
    from otca.config import LoraConfig
    from otca.models.lora import add_lora

    net = torch.nn.Sequential(torch.nn.Linear(3, 4))
    add_lora(net, LoraConfig(rank=2, alpha=3.0, target_modules=["0"]))
    layer = net[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.arange(6.0).reshape(2, 3))
        layer.lora_B["default"].weight.copy_(torch.arange(8.0).reshape(4, 2) / 10)
    sd = merged_state_dict(net)
    base = layer.get_base_layer().weight
    expected = base + 1.5 * (torch.arange(8.0).reshape(4, 2) / 10) @ torch.arange(6.0).reshape(2, 3)
    torch.testing.assert_close(sd["0.weight"], expected)
    assert set(sd) == {"0.weight", "0.bias"}
    x = torch.randn(5, 3)
    torch.testing.assert_close(x @ sd["0.weight"].T + sd["0.bias"], net(x))


def test_full_export_round_trips_and_formats_are_checked(tmp_path):
    from diffusers import FluxTransformer2DModel

    cfg = load_config("configs/tiny/flux.yaml", OVERRIDES)
    policy = build_policy(cfg.model, CPU)
    _perturb(policy, seed=1)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_policy(policy, tmp_path / "x", "lora")
    export_policy(policy, tmp_path / "full", "auto")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "full" / "transformer").state_dict()
    for k, t in policy.transformer.state_dict().items():
        assert torch.equal(loaded[k], t), k
    with pytest.raises(ValueError, match="export format: expected one of"):
        export_policy(policy, tmp_path / "x", "gguf")


def test_run_without_ema_is_a_clear_error(lora_run, tmp_path):
    run, _ = lora_run
    with pytest.raises(ValueError, match="no EMA weights"):
        export_run(run, tmp_path / "e", ema=True)


def test_cli_export(lora_run, tmp_path, capsys):
    from otca.cli import main

    run, _ = lora_run
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "transformer" / "config.json").is_file() and "merged" in capsys.readouterr().out
    assert main(["export", str(run), "--format", "full", "--out", str(tmp_path / "bad")]) == 2  # a LoRA run
