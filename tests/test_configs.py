"""The shipped configs: every file loads, the paper configs hold the paper's settings, their options fit the
adapters and reward factories, their weight paths are marked placeholders, and the tiny twin configs run end
to end through the CLI (in-process, CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from otca.cli import main
from otca.config import RunConfig, load_config
from otca.evaluate import load_prompts
from otca.models.flux import FluxOptions
from otca.models.flux2 import Flux2Options
from otca.models.options import parse_options
from otca.models.qwen_image import QwenImageOptions
from otca.models.registry import build_policy
from otca.models.sd3 import SD3Options
from otca.models.wan import WanOptions
from otca.rewards.options import parse_reward_options
from otca.rewards.registry import build_reward_set, reward_names, reward_options

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
PAPER = {
    "flux-otca.yaml": FluxOptions, "wan22-otca.yaml": WanOptions, "sd3-otca.yaml": SD3Options,
    "qwen-image-otca.yaml": QwenImageOptions, "flux2-otca.yaml": Flux2Options,
}
TINY = ("flux", "sd3", "wan", "qwen-image", "flux2")
FULL = {
    "flux": "flux-otca.yaml", "sd3": "sd3-otca.yaml", "wan": "wan22-otca.yaml", "qwen-image": "qwen-image-otca.yaml",
    "flux2": "flux2-otca.yaml",
}
PLACEHOLDER = "/path/to/"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # prompt files in the configs are repo-relative


def _cfg(name: str) -> RunConfig:
    return load_config(ROOT / "configs" / name)


def test_every_config_loads_and_its_prompt_files_exist():
    names = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}
    assert {"digits.yaml", *PAPER, *(f"tiny/{t}.yaml" for t in TINY)} <= names
    for path in CONFIGS:
        cfg = load_config(path)
        for spec in (cfg.prompts.train, cfg.prompts.eval):
            assert load_prompts(spec), (path, spec)


def test_digits_yaml_is_the_defaults_written_out():
    assert _cfg("digits.yaml") == RunConfig()


def test_flux_config_holds_the_paper_settings():
    """OTCA Sec. 4.1 and 6.5 for FLUX.1-dev."""
    c = _cfg("flux-otca.yaml")
    assert (c.model.kind, c.model.dtype) == ("flux", "bfloat16")
    assert c.model.options["resolution"] == 512 and c.model.options["guidance_scale"] == 3.5
    assert c.model.options["max_sequence_length"] == 512
    assert [r.name for r in c.rewards] == ["clip-t", "hpsv2.1", "laion-aesthetic"]
    s, t = c.sampler, c.train
    assert (s.num_steps, s.eta, s.shift, s.sde, s.eval_steps) == (16, 0.3, 3.0, "dance-sde", 50)
    assert s.same_noise_per_group and s.final_latent == "x0"
    assert (t.group_size, t.lr, t.clip_range, t.scheme, t.timestep_fraction) == (12, 1e-5, 1e-4, "otca", 1.0)
    assert (t.credit.w_min, t.credit.eps_moca) == (0.5, 1e-6)
    per_gpu = t.prompts_per_iter * t.group_size // 8  # 8 GPUs
    assert per_gpu // t.updates_per_iter == 12  # gradient accumulation over 12 samples (Sec. 6.5)
    assert c.eval.metrics is None


def test_wan_config_holds_the_paper_settings():
    """OTCA Sec. 4.1 and 6.5 for Wan2.2-T2V-A14B."""
    c = _cfg("wan22-otca.yaml")
    o = c.model.options
    assert c.model.kind == "wan" and (o["height"], o["width"], o["num_frames"]) == (240, 416, 53)
    assert [r.name for r in c.rewards] == ["videoalign"]  # one reward, three objectives (VQ, MQ, TA)
    assert (c.sampler.num_steps, c.sampler.eta, c.sampler.sde) == (16, 0.8, "dance-sde")
    t = c.train
    assert (t.group_size, t.lr, t.clip_range, t.scheme) == (8, 5e-6, 1e-4, "otca")
    per_gpu = t.prompts_per_iter * t.group_size // 32  # 32 GPUs
    assert per_gpu // t.updates_per_iter == 8  # gradient accumulation over 8 samples (Sec. 6.5)
    assert c.eval.metrics is None


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_options_fit_the_adapter_and_the_reward_factories(name):
    c = _cfg(name)
    parse_options(PAPER[name], c.model.options)  # raises on an unknown or badly typed option
    known = set(reward_names())
    for r in c.rewards:
        assert r.name in known
        parse_reward_options(r.name, reward_options(r.name), r.options)  # raises on an unknown or ill-typed option


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_paths_are_marked_placeholders(name):
    c = _cfg(name)
    assert c.model.path.startswith(PLACEHOLDER)
    paths = [v for r in c.rewards for k, v in r.options.items() if k.endswith("path")]
    assert paths and all(v.startswith(PLACEHOLDER) for v in paths)
    text = (ROOT / "configs" / name).read_text()
    assert f"otca train --config configs/{name} model.path=" in text and "torchrun --nproc_per_node 8" in text
    with pytest.raises(FileNotFoundError) as e:  # as shipped it names the model and the missing directory
        build_policy(c.model, torch.device("cpu"))
    assert str(e.value) == f"model '{c.model.kind}': model.path '{c.model.path}' is not a directory"


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_is_the_paper_config_at_toy_size(name):
    tiny = _cfg(f"tiny/{name}.yaml")
    full = _cfg(FULL[name])
    assert tiny.model.options["tiny"] is True and tiny.model.path is None and tiny.model.kind == full.model.kind
    assert all(r.options == {"tiny": True} for r in tiny.rewards)
    assert len(tiny.rewards) == len(full.rewards)
    same = ("sde", "eta")
    assert [getattr(tiny.sampler, f) for f in same] == [getattr(full.sampler, f) for f in same]
    assert tiny.train.scheme == full.train.scheme
    assert tiny.train.iterations == 2 and tiny.eval.metrics is None


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_trains_end_to_end_through_the_cli(name, tmp_path, capsys):
    out = tmp_path / name
    assert main(["train", "--config", f"configs/tiny/{name}.yaml", f"out_dir={out}"]) == 0
    cfg = load_config(ROOT / "configs" / "tiny" / f"{name}.yaml")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1] and summary["iterations"] == 2
    # every configured reward is scored, before and after, and the two evaluations differ (the weights moved)
    want = {f"reward/{n}" for n in build_reward_set(cfg.rewards).names}  # a multi-objective reward: k columns
    assert set(summary["eval_before"]) == set(summary["eval_after"]) == want
    assert summary["eval_before"] != summary["eval_after"]
    assert all(isinstance(r[k], float) and r[k] == r[k] for r in rows for k in want)  # logged, not NaN
    assert (out / "samples_after.png").is_file() and load_config(out / "config.yaml") == cfg.model_copy(
        update={"out_dir": str(out)}
    )
    assert "run directory" in capsys.readouterr().out
