"""The trainer's optional credit inputs and hooks: step_rewards for schemes that declare them, the advantage-scale
option, and the reward-hacking monitor of periodic evaluations (tiny end-to-end runs)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from otca.config import load_config
from otca.monitor import alarm_metrics, drift_alarms
from otca.rollout import velocity_in_chunks
from otca.runlog import RunLog
from otca.step_rewards import clean_predictions
from otca.trainer import Trainer
from otca.weights import eval_mode

TINY = ["train.prompts_per_iter=2", "train.group_size=4", "train.micro_batch=4", "sampler.num_steps=4",
        "sampler.eval_steps=4", "eval.samples_per_prompt=1", "progress=false", "plots=false"]


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY, f"out_dir={tmp_path / 'run'}", "train.iterations=2", *overrides])


def test_step_moca_gets_step_rewards_equal_to_recomputed_clean_predictions(tmp_path):
    cfg = _cfg(tmp_path, "train.scheme=step-moca", "save_credit=true", "eval.metrics=null")
    Trainer(cfg).train()
    rows = RunLog(cfg.out_dir).rows()
    names = ["digit-alignment", "stroke-quality", "jpeg-compressibility"]
    assert all(f"credit/coef_early/{n}" in r and f"credit/coef_late/{n}" in r for r in rows for n in names)
    saved = load_file(str(Path(cfg.out_dir) / "credit" / "iter-000000.safetensors"))
    sr = saved["step_rewards"]
    T = cfg.sampler.num_steps
    assert sr.shape == (8, T + 1, 3)
    torch.testing.assert_close(sr[:, T - 1], saved["rewards"])  # the scored final is x0_hat of state T-1

    # independently: a fresh trainer (the same initial weights), iteration 0's rollout, x0_hat recomputed
    fresh = Trainer(cfg)
    batch = fresh.sample_prompts(0)
    traj, cond = fresh.rollout(batch, 0)
    assert traj.x0_hats is not None

    def velocity(x, sigma):
        return velocity_in_chunks(fresh.model, x, sigma, cond, cfg.train.micro_batch)

    with eval_mode(fresh.policy):
        views = clean_predictions(velocity, traj.latents, traj.sigmas)  # [b, T+1, *latent]
        want = torch.stack([fresh.rewards(fresh.policy.decode(views[:, t]).float().clamp(0, 1), batch.prompts)
                            for t in range(T + 1)], 1)
    torch.testing.assert_close(sr, want, rtol=1e-5, atol=1e-5)


def test_reward_gain_runs_and_grpo_keeps_no_clean_predictions(tmp_path):
    cfg = _cfg(tmp_path, "train.scheme=reward-gain", "eval.metrics=null")
    tr = Trainer(cfg)
    assert tr.needs == {"step_rewards"}
    tr.train()
    assert len(RunLog(cfg.out_dir).rows()) == 2
    g = Trainer(_cfg(tmp_path / "g", "train.scheme=grpo", "eval.metrics=null"))
    assert g.needs == frozenset() and g.rollout(g.sample_prompts(0), 0)[0].x0_hats is None


def test_unit_mean_abs_scale_logs_mean_abs_advantage_one(tmp_path):
    cfg = _cfg(tmp_path, "train.scheme=otca", "train.credit.adv_scale=unit-mean-abs", "eval.metrics=null")
    Trainer(cfg).train()
    for r in RunLog(cfg.out_dir).rows():
        assert r["credit/adv_abs_mean"] == pytest.approx(1.0, rel=1e-5)
        assert r["credit/adv_scale"] > 0


def test_periodic_evaluations_carry_the_monitor_columns(tmp_path):
    cfg = _cfg(tmp_path, "train.iterations=3", "eval.every=1", "eval.monitor.tolerance=0")
    Trainer(cfg).train()
    log = RunLog(cfg.out_dir)
    evals, rows, summary = log.eval_rows(), log.rows(), log.summary()
    assert [e["iteration"] for e in evals] == [1, 2, 3]
    history = [{"iteration": 0, **summary["eval_before"]}]
    m = cfg.eval.monitor
    for e, r in zip(evals[:2], rows[:2], strict=True):  # the periodic ones (the last eval is the final one)
        history.append({k: v for k, v in e.items() if not k.startswith("monitor/")})
        want = alarm_metrics(drift_alarms(history, m.signals, window=m.window, tolerance=m.tolerance), m.signals)
        assert {k: v for k, v in e.items() if k.startswith("monitor/")} == pytest.approx(want)
        assert r["monitor/alarm"] == want["monitor/alarm"]


def test_step_rewards_every_two_uses_the_running_profile_between_and_resumes_exactly(tmp_path):
    from otca.credit import CreditInputs, gain_profile, get_scheme

    every = ["train.scheme=step-moca", "train.step_rewards_every=2", "train.step_profile_decay=0.25",
             "save_credit=true", "eval.metrics=null", "train.iterations=3"]
    cfg = _cfg(tmp_path / "full", *every)
    tr = Trainer(cfg)
    assert [tr.measures_step_rewards(i) for i in range(4)] == [True, False, True, False]
    tr.train()
    saved = [load_file(str(Path(cfg.out_dir) / "credit" / f"iter-{i:06d}.safetensors")) for i in range(3)]
    assert ["step_rewards" in s for s in saved] == [True, False, True]
    # iteration 1 is credited with iteration 0's mean scaled gains [K, T], the same for every sample
    s0, s1 = saved[:2]
    mask0 = s0["mask"].bool()
    profile = gain_profile(s0["step_rewards"], mask0)
    inputs = CreditInputs(s1["rewards"], s1["group_ids"], s1["mask"].bool(), tr.sigmas, s1["gains"],
                          tr.reward_weights, tuple(tr.rewards.names), gain_profile=profile)
    want = get_scheme("step-moca")(inputs, cfg.train.credit)
    torch.testing.assert_close(s1["advantages"], want.advantages)
    # and after iteration 2 the profile is 0.25 * that + 0.75 * iteration 2's
    s2 = saved[2]
    torch.testing.assert_close(tr.gain_profile, 0.25 * profile + 0.75 * gain_profile(s2["step_rewards"],
                                                                                     s2["mask"].bool()))

    # killed after iteration 1 (the profile lives in the checkpoint), resumed: the same run
    part_cfg = _cfg(tmp_path / "part", *every[:-1], "train.iterations=1")
    Trainer(part_cfg).train()
    resumed = Trainer(load_config(Path(part_cfg.out_dir) / "config.yaml", ["train.iterations=3"]))
    resumed.resume()
    assert resumed.start_iteration == 1 and resumed.gain_profile is not None
    resumed.train()

    def strip(r):  # wall-clock values differ between any two runs
        return {k: v for k, v in r.items() if k != "wall_seconds" and not k.startswith("time/")}
    assert [strip(r) for r in RunLog(cfg.out_dir).rows()] == [strip(r) for r in RunLog(part_cfg.out_dir).rows()]


def test_monitor_signals_the_eval_suite_does_not_report_are_named_on_one_line(tmp_path, capsys):
    signals = "eval.monitor.signals={eval/nope: up, eval/fidelity_fd: down}"
    Trainer(_cfg(tmp_path, "train.iterations=1", "eval.every=1", signals)).train()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "eval.monitor.signals" in ln]
    assert len(lines) == 1 and "['eval/nope'] not reported" in lines[0] and "(not watched)" in lines[0]
    assert "eval/judge_alignment" in lines[0]  # what the suite does report
    Trainer(_cfg(tmp_path / "digits", "train.iterations=1", "eval.every=1")).train()  # digits reports both
    Trainer(_cfg(tmp_path / "off", "train.iterations=1", "eval.every=1", "eval.metrics=null")).train()  # by choice
    assert "eval.monitor.signals" not in capsys.readouterr().err


def test_the_video_config_monitors_metrics_its_eval_suite_reports():
    from otca.config import load_config
    from otca.evaluate import EVAL_SUITES
    from otca.registry import load_worlds

    load_worlds()
    cfg = load_config(Path(__file__).parents[1] / "configs" / "video.yaml")
    from otca.worlds.video.prompts import all_prompts

    clips = torch.rand(4, 1, 8, 16, 16)  # [B, 1, F, H, W]
    reported = EVAL_SUITES.get(cfg.eval.metrics)(clips, all_prompts("eval")[:4], torch.tensor([0, 0, 1, 1]))
    assert set(cfg.eval.monitor.signals) <= set(reported)
