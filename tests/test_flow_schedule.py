"""make_sigmas / shift_sigmas: hand-computed values, endpoints, monotonicity, the inverse shift, bad input; the
"diffusers" grid and FLUX's dynamic shift against diffusers' FlowMatchEulerDiscreteScheduler itself."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otca.flow import DynamicShift, dynamic_shift_mu, make_sigmas, resolve_shift, shift_sigmas


def test_hand_computed_t4_shift3():
    # linspace(1, 0, 5) = 1, .75, .5, .25, 0 ; 3s / (1 + 2s) = 1, 2.25/2.5, 1.5/2, .75/1.5, 0
    expected = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float32)
    assert torch.equal(make_sigmas(4, shift=3.0), expected)


def test_shift_one_is_linspace():
    assert torch.equal(make_sigmas(16), torch.linspace(1.0, 0.0, 17, dtype=torch.float64).float())


@settings(max_examples=60, deadline=None)
@given(num_steps=st.integers(1, 200), shift=st.floats(0.05, 20.0), schedule=st.sampled_from(["shift", "diffusers"]))
def test_endpoints_and_strictly_decreasing(num_steps, shift, schedule):
    sigmas = make_sigmas(num_steps, shift, schedule)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


@settings(max_examples=60, deadline=None)
@given(shift=st.floats(0.1, 10.0))
def test_shift_by_inverse_undoes_shift(shift):
    s = torch.linspace(0.0, 1.0, 33, dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(shift_sigmas(s, shift), 1.0 / shift), s)


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True, "4"])
def test_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        make_sigmas(num_steps)


@pytest.mark.parametrize("shift", [0.0, -1.0, math.nan, math.inf])
def test_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        make_sigmas(4, shift)


# --- the diffusers grid and FLUX's dynamic shift, against diffusers' own scheduler ----------------------------

# FLUX.1-dev's scheduler/scheduler_config.json (the dynamic-shift fields FluxPipeline reads)
FLUX1_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                       max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def test_dynamic_shift_mu_by_hand():
    # slope (1.15 - 0.5) / (4096 - 256) = 0.65 / 3840; at 1024 tokens (512 px): 0.5 + 768 * 0.65 / 3840 = 0.63
    assert dynamic_shift_mu(1024) == pytest.approx(0.63, abs=1e-12)
    assert dynamic_shift_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert dynamic_shift_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert DynamicShift(1024).shift == pytest.approx(math.exp(0.63))  # 1.8776: FLUX at 512 px is not shift 3
    # exp(mu) / (exp(mu) + 1/sigma - 1) (diffusers' exponential time shift) is the static shift with s = exp(mu)
    s = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    exponential = math.exp(0.63) / (math.exp(0.63) + (1 / s - 1))
    torch.testing.assert_close(shift_sigmas(s, math.exp(0.63)), exponential, rtol=1e-14, atol=0)


@pytest.mark.parametrize("side", [512, 1024])
@pytest.mark.parametrize("steps", [16, 28, 50])
def test_auto_shift_is_flux_pipelines_schedule(side, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX1_SCHEDULER)
    # FluxPipeline.__call__: image_seq_len = the packed latent's token count (H/16)(W/16); mu = calculate_shift(...)
    # with the scheduler config's fields; sigmas = np.linspace(1.0, 1 / steps, steps); set_timesteps(sigmas=, mu=)
    seq_len = (side // 16) ** 2
    cfg = scheduler.config
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = seq_len * slope + cfg.base_shift - slope * cfg.base_image_seq_len
    scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = make_sigmas(steps, "auto", dynamic=DynamicShift(seq_len))
    assert ours.shape == scheduler.sigmas.shape == (steps + 1,)
    torch.testing.assert_close(ours, scheduler.sigmas, atol=1e-6, rtol=0)
    # and not the fixed shift 3 the recipes used before
    assert (make_sigmas(steps, 3.0) - scheduler.sigmas).abs().max() > 1e-2


@pytest.mark.parametrize("steps", [1, 10, 28, 40])
def test_diffusers_schedule_is_sd3s_default(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # stabilityai/stable-diffusion-3.5-medium's scheduler: static shift 3.0, 1000 training steps
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(num_train_timesteps=1000, shift=3.0))
    scheduler.set_timesteps(steps)  # what StableDiffusion3Pipeline (and Flow-GRPO's SD3 rollout) does
    torch.testing.assert_close(make_sigmas(steps, 3.0, "diffusers"), scheduler.sigmas, atol=1e-7, rtol=0)


def test_diffusers_schedule_by_hand():
    # sigma_min = 3 * 0.001 / (1 + 2 * 0.001) = 0.003 / 1.002; the last step before 0 shifts it once more:
    # 3 m / (1 + 2 m) = 0.009 / 1.008 = 0.0089286 (otca's linspace grid ends at 0.25 instead)
    sigmas = make_sigmas(10, 3.0, "diffusers")
    m = 0.003 / 1.002
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert sigmas[-2].item() == pytest.approx(3 * m / (1 + 2 * m), rel=1e-6)
    assert sigmas[-2].item() == pytest.approx(0.009 / 1.008, rel=1e-6)
    # the second point: linspace(1, m, 10)[1] = 1 - (1 - m) / 9, shifted
    a = 1 - (1 - m) / 9
    assert sigmas[1].item() == pytest.approx(3 * a / (1 + 2 * a), rel=1e-6)  # 0.9601, Flow-GRPO's SD3 grid
    assert make_sigmas(10, 3.0)[-2].item() == pytest.approx(0.25)


def test_resolve_shift():
    assert resolve_shift(2.5) == 2.5
    assert resolve_shift("auto", DynamicShift(4096)) == pytest.approx(math.exp(1.15))
    with pytest.raises(ValueError, match="sampler.shift: 'auto' needs a model with dynamic shifting"):
        make_sigmas(4, "auto")
    with pytest.raises(ValueError, match="needs sampler.schedule 'shift'"):
        make_sigmas(4, "auto", "diffusers", dynamic=DynamicShift(1024))
    with pytest.raises(KeyError, match="diffusers, shift"):
        make_sigmas(4, 3.0, "karras")
