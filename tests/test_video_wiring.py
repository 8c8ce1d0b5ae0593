"""The video world wired into otca: its registered names, model kind ``video-wan`` (the options and preparation
path of every kind), reward ``video-align``, ``otca pretrain --world``, GIF sample grids, and training on
configs/video.yaml end to end and resumed (CPU, seconds each)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from otca.config import load_config
from otca.runlog import RunLog

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "video.yaml"
TINY = [
    "train.prompts_per_iter=2",
    "train.group_size=2",
    "train.micro_batch=4",
    "sampler.num_steps=3",
    "sampler.eval_steps=2",
    "eval.samples_per_prompt=1",
    "progress=false",
]
PROMPTS = ["a handwritten three drifting left", "a seven moving up quickly", "a neat five creeping right"]
SIGMAS = torch.tensor([0.9, 0.5, 0.1])


def _build(**model):
    from otca.config import ModelConfig
    from otca.models.registry import build_policy

    return build_policy(ModelConfig(**{"kind": "video-wan", **model}), torch.device("cpu"))


def test_the_video_world_is_declared_and_registers_what_it_provides():
    from otca.evaluate import EVAL_SUITES, load_prompts
    from otca.models.registry import policy_kinds
    from otca.pretraining import pretrainer_names
    from otca.rewards.registry import reward_names

    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="otca.worlds")}
    assert eps.get("video") == "otca.worlds.video.register"
    assert "video-wan" in policy_kinds() and "video" in EVAL_SUITES and "video-align" in reward_names()
    assert {"digits", "video"} <= set(pretrainer_names())
    assert len(load_prompts("video:eval")) == 80
    assert load_prompts("video:train")[0] == "a handwritten zero drifting left"


# --- model kind 'video-wan' ------------------------------------------------------------------------------------


def test_default_kind_is_the_shipped_policy_bit_for_bit():
    from otca.worlds.video.policy import DEFAULT_GUIDANCE, load_video_policy

    policy, ref = _build(), load_video_policy()
    assert policy.guidance_scale == DEFAULT_GUIDANCE
    x = policy.init_latents(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v, v_ref = policy.velocity(x, SIGMAS, policy.encode(PROMPTS)), ref.velocity(x, SIGMAS, ref.encode(PROMPTS))
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        "transformer." + n for n, _ in policy.transformer.named_parameters()
    }


def test_unknown_or_bad_option_is_a_one_line_error_naming_it(tmp_path):
    from otca.config import ConfigError

    with pytest.raises(ConfigError, match="guidance_scal") as e:
        _build(options={"guidance_scal": 2.0})
    assert "\n" not in str(e.value) and "model.options" in str(e.value)
    with pytest.raises(ConfigError, match="guidance_scale"):
        _build(options={"guidance_scale": 0.5})
    with pytest.raises(ValueError, match="model.path"):
        _build(path=str(tmp_path), options={"tiny": True})
    with pytest.raises(FileNotFoundError, match="video_wan.json"):
        _build(path=str(tmp_path))


def test_options_reach_the_policy_and_tiny_is_a_seeded_fresh_network():
    from otca.worlds.video.policy import build_video_policy

    policy = _build(options={"guidance_scale": 3.0, "negative_prompt": "a neat one creeping up"})
    assert policy.guidance_scale == 3.0 and policy.negative_prompt == "a neat one creeping up"
    fresh, other = _build(options={"tiny": True, "seed": 3}), _build(options={"tiny": True, "seed": 4})
    ref = build_video_policy(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(fresh.state_dict().values(), ref.state_dict().values(), strict=True))
    assert not torch.equal(fresh.transformer.proj_out.weight, other.transformer.proj_out.weight)


def test_lora_and_checkpointing_as_for_wan():
    from _helpers import check_checkpointing_keeps_gradients, check_full_and_lora_trainables

    check_full_and_lora_trainables(lambda **kw: _build(**kw), PROMPTS, SIGMAS)
    check_checkpointing_keeps_gradients(lambda **kw: _build(**kw), PROMPTS, SIGMAS)


def test_lora_weights_stay_fp32_over_a_bf16_network():
    from otca.config import LoraConfig

    policy = _build(dtype="bfloat16", lora=LoraConfig(rank=2))
    trained = dict((n, p) for n, p in policy.named_parameters() if p.requires_grad)
    assert trained and all(".lora_" in n and p.dtype == torch.float32 for n, p in trained.items())
    assert {p.dtype for p in policy.transformer.parameters() if not p.requires_grad} == {torch.bfloat16}
    x = policy.init_latents(3, torch.Generator().manual_seed(0))
    v = policy.velocity(x, SIGMAS, policy.encode(PROMPTS))
    assert torch.isfinite(v).all()
    v.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained.values())


# --- reward 'video-align' --------------------------------------------------------------------------------------


def test_video_align_is_the_three_rewards_as_columns():
    from otca.rewards.options import RewardOptionError
    from otca.rewards.registry import build_reward
    from otca.worlds.video.data import sample_clips
    from otca.worlds.video.rewards import REWARD_NAMES, motion_quality, text_alignment, visual_quality

    reward = build_reward("video-align")
    assert reward.names == REWARD_NAMES
    b = sample_clips(6, torch.Generator().manual_seed(0), "test")
    prompts = b.prompts(torch.Generator().manual_seed(1))
    r = reward(b.clips, prompts)
    assert r.shape == (6, 3) and r.dtype == torch.float32
    torch.testing.assert_close(r, torch.stack([visual_quality(b.clips), motion_quality(b.clips),
                                               text_alignment(b.clips, prompts)], dim=1))
    with pytest.raises(RewardOptionError, match="video-align.*'device'"):
        build_reward("video-align", device="cuda")
    with pytest.raises(RewardOptionError, match="unknown option 'colums'"):
        build_reward("video-align", colums=["vq"])


# --- otca pretrain --world ---------------------------------------------------------------------------------------


def test_pretrain_chooses_the_registered_world(tmp_path, monkeypatch, capsys):
    import otca.worlds.video.pretrain as vp
    from otca.cli import main

    calls = []
    monkeypatch.setattr(vp, "pretrain_video_generator", lambda out, **kw: calls.append((Path(out), kw)) or {"ok": 1})
    assert main(["pretrain", "--world", "video", "--out", str(tmp_path / "w"), "--seed", "3"]) == 0
    assert calls == [(tmp_path / "w", {"seed": 3})]
    assert main(["pretrain", "--world", "vidoe", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown pretrainer 'vidoe'" in err and "digits, video" in err


# --- sample figures of videos ----------------------------------------------------------------------------------


def test_video_pixels_give_an_animated_gif_grid_and_a_frame_strip(tmp_path):
    from PIL import Image

    from otca.plots import save_grid

    n, f, h, w = 5, 4, 3, 2
    pixels = torch.rand(n, 1, f, h, w)
    files = save_grid(pixels, [f"p{i}" for i in range(n)], tmp_path / "s.png", per_row=2)
    assert files == [tmp_path / "s.gif", tmp_path / "s.png"] and all(p.is_file() for p in files)
    gif = Image.open(tmp_path / "s.gif")
    assert gif.n_frames == f
    scale, gap = 3, 1
    assert gif.size == (2 * (w * scale + gap) - gap, 3 * (h * scale + gap) - gap)  # 2 columns, 3 rows
    for k in range(f):
        gif.seek(k)
        img = torch.tensor(list(gif.convert("L").getdata()), dtype=torch.float32).reshape(gif.size[1], gif.size[0])
        for i in range(n):  # clip i at row i // 2, column i % 2; each pixel a 3x3 block
            r, c = divmod(i, 2)
            for y in range(h):
                for x in range(w):
                    got = img[r * (h * scale + gap) + y * scale + 1, c * (w * scale + gap) + x * scale + 1]
                    assert abs(float(got) - round(float(pixels[i, 0, k, y, x]) * 255)) <= 1
        assert float(img[-1, -1]) == pytest.approx(128, abs=1)  # the unused sixth cell is grey
    # images keep their one PNG
    assert save_grid(pixels[:, :, 0], ["p"] * n, tmp_path / "i.png", per_row=2) == [tmp_path / "i.png"]
    assert not (tmp_path / "i.gif").exists()


# --- training on configs/video.yaml ----------------------------------------------------------------------------


def _train(tmp_path: Path, *overrides: str, name: str = "run"):
    from otca.trainer import Trainer

    cfg = load_config(CONFIG, [*TINY, f"out_dir={tmp_path / name}", *overrides])
    tr = Trainer(cfg)
    return tr, tr.train()


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / ckpt / "trainable.safetensors"))


def test_two_iterations_on_the_video_config_write_the_run_directory_with_videos(tmp_path):
    tr, summary = _train(tmp_path, "train.iterations=2")
    d = tr.run_dir
    for f in ["config.yaml", "metrics.jsonl", "summary.json", "samples_before.gif", "samples_after.gif",
              "samples_before.png", "samples_after.png", "credit_weights.png"]:
        assert (d / f).is_file(), f
    names = {"reward/video-visual-quality", "reward/video-motion-quality", "reward/video-text-alignment"}
    rows = RunLog(d).rows()
    assert [r["iteration"] for r in rows] == [0, 1] and names <= set(rows[0])
    for key in [*names, "eval/dynamic_degree", "eval/direction_accuracy", "eval/digit_accuracy", "eval/fvd"]:
        assert key in summary["eval_before"] and key in summary["eval_after"], key
    assert rows[0]["train/ratio_first_step_max_dev"] == 0.0
    base = {n: p.detach() for n, p in _build().named_parameters() if p.requires_grad}
    final = _weights(d)
    assert final.keys() == base.keys() and any(not torch.equal(final[n], base[n]) for n in final)


def test_resume_after_one_iteration_equals_the_uninterrupted_run(tmp_path):
    from otca.trainer import Trainer

    off = ["plots=false", "eval.metrics=null"]
    full, _ = _train(tmp_path, "train.iterations=2", *off, name="full")
    part, _ = _train(tmp_path, "train.iterations=1", *off, name="part")
    resumed = Trainer(load_config(part.run_dir / "config.yaml", ["train.iterations=2"]), part.run_dir)
    resumed.resume()
    assert resumed.start_iteration == 1
    resumed.train()
    wa, wb = _weights(full.run_dir), _weights(part.run_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)

    def strip(r):  # wall-clock values differ between any two runs
        return {k: v for k, v in r.items() if k != "wall_seconds" and not k.startswith("time/")}

    assert [strip(r) for r in RunLog(full.run_dir).rows()] == [strip(r) for r in RunLog(part.run_dir).rows()]


def test_compare_draws_one_curve_per_objective_of_the_multi_objective_reward(tmp_path):
    from otca.compare import compare

    tiny = [o for o in TINY if not o.startswith("progress")]  # compare sets progress itself
    values = compare(str(CONFIG), [*tiny, "train.iterations=1", "plots=false"], schemes=["otca"], seeds=[0],
                     out_dir=tmp_path / "cmp", jobs=1)
    assert (tmp_path / "cmp" / "curves_iteration.png").is_file()
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert all(f"reward/{n}" in table for n in ("video-visual-quality", "video-motion-quality",
                                                   "video-text-alignment"))
    assert values
