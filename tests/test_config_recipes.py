"""The recipe fields (sampler.shift 'auto', sampler.schedule, train.kl_form): parsing, one-line errors, and the
shipped peer recipes set to their peer's schedule and KL form."""

from __future__ import annotations

from pathlib import Path

import pytest

from otca.config import ConfigError, load_config
from otca.flow import make_sigmas

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_fields_parse():
    cfg = load_config(None, ["sampler.shift=auto", "sampler.schedule=diffusers", "train.kl_form=flow-grpo"])
    assert (cfg.sampler.shift, cfg.sampler.schedule, cfg.train.kl_form) == ("auto", "diffusers", "flow-grpo")
    assert load_config(None, ["sampler.shift=1.5"]).sampler.shift == 1.5
    defaults = load_config()
    assert (defaults.sampler.shift, defaults.sampler.schedule, defaults.train.kl_form) == (3.0, "shift", "exact")


@pytest.mark.parametrize(
    "override, field",
    [("sampler.shift=0", "sampler.shift"), ("sampler.shift=fast", "sampler.shift"),
     ("sampler.schedule=karras", "sampler.schedule"), ("train.kl_form=flow_grpo", "train.kl_form")],
)
def test_recipe_fields_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"config field '{field}"):
        load_config(None, [override])


def test_sd3_recipe_is_flow_grpos_schedule_and_kl():
    for name in ("sd3-otca.yaml", "tiny/sd3.yaml"):
        c = load_config(ROOT / "configs" / name)
        assert (c.sampler.schedule, c.sampler.shift, c.train.kl_form, c.train.kl_coef) == (
            "diffusers", 3.0, "flow-grpo", 0.01), name
    c = load_config(ROOT / "configs" / "sd3-otca.yaml")
    sigmas = make_sigmas(c.sampler.num_steps, c.sampler.shift, c.sampler.schedule)
    assert sigmas[1].item() == pytest.approx(0.9601, abs=1e-4) and sigmas[-2].item() == pytest.approx(0.0089, abs=1e-4)


def test_flux_recipe_is_dancegrpos_schedule_without_kl():
    for name in ("flux-otca.yaml", "tiny/flux.yaml"):
        c = load_config(ROOT / "configs" / name)
        assert (c.sampler.schedule, c.sampler.shift, c.train.kl_coef) == ("shift", 3.0, 0.0), name
