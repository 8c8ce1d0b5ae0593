"""The FLUX adapter's dynamic shift (``sampler.shift: auto``): FluxPipeline's image token count, the scheduler
config read from a model directory, and the built policy's sigmas against diffusers' scheduler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from otca.config import ModelConfig
from otca.flow import DynamicShift, make_sigmas
from otca.models.flux import FluxPolicy, read_scheduler_config
from otca.models.registry import build_policy


class ToyCodec:
    """Latents [4, 4, 6] (non-square); the codec's maps are not used here."""

    latent_shape = (4, 4, 6)


def ToyText(prompts):  # noqa: N802 - stands in for a text-encoder module
    raise AssertionError("not called")


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=8, pooled_projection_dim=6, axes_dims_rope=(2, 2, 4),
    )


def test_image_seq_len_is_flux_pipelines_packed_length():
    policy = FluxPolicy(tiny_flux(), ToyText, ToyCodec())
    c, h, w = ToyCodec.latent_shape
    packed = FluxPipeline._pack_latents(torch.zeros(1, c, h, w), 1, c, h, w)  # [1, S, 4C]: S is image_seq_len
    assert policy.dynamic_shift == DynamicShift(image_seq_len=packed.shape[1])


def test_scheduler_config_fields_are_used_and_schnell_has_none():
    cfg = {"use_dynamic_shifting": True, "base_image_seq_len": 64, "max_image_seq_len": 1024, "base_shift": 0.3,
           "max_shift": 1.3}
    policy = FluxPolicy(tiny_flux(), ToyText, ToyCodec(), scheduler_config=cfg)
    assert policy.dynamic_shift == DynamicShift(6, 64, 1024, 0.3, 1.3)
    schnell_cfg = {"shift": 1.0, "use_dynamic_shifting": False}
    schnell = FluxPolicy(tiny_flux(), ToyText, ToyCodec(), scheduler_config=schnell_cfg)
    assert schnell.dynamic_shift is None
    with pytest.raises(ValueError, match="sampler.shift: 'auto' needs a model with dynamic shifting"):
        make_sigmas(4, "auto", dynamic=schnell.dynamic_shift)


def test_read_scheduler_config(tmp_path):
    assert read_scheduler_config(None) is None  # FLUX.1's values
    assert read_scheduler_config(tmp_path) == {}  # no scheduler folder: dynamic shifting unknown
    (tmp_path / "scheduler").mkdir()
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({"use_dynamic_shifting": True, "max_shift": 1.2}))
    assert read_scheduler_config(tmp_path) == {"use_dynamic_shifting": True, "max_shift": 1.2}
    path.write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json' is not a readable JSON"):
        read_scheduler_config(tmp_path)


def test_built_tiny_flux_auto_sigmas_match_flux_pipeline():
    policy = build_policy(ModelConfig(kind="flux", options={"tiny": True, "resolution": 128}), torch.device("cpu"))
    assert policy.dynamic_shift is not None and policy.dynamic_shift.image_seq_len == (128 // 16) ** 2
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # FLUX.1's config values
    steps, seq_len = 16, 64
    slope = (1.15 - 0.5) / (4096 - 256)
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=0.5 + slope * (seq_len - 256))
    ours = make_sigmas(steps, "auto", dynamic=policy.dynamic_shift)
    torch.testing.assert_close(ours, scheduler.sigmas, atol=1e-6, rtol=0)
