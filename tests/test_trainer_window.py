"""The SDE window, the CPS transition and the GRPO-Guard ratio guard wired into the trainer, through its public
phases on the embedded default at toy size (CPU, seconds each). The references are hand-computed: MixGRPO's
sliding window positions, and the first step's guarded loss ``-A / dt`` (ratio exactly 1)."""

from __future__ import annotations

import math

import torch

from otca.config import RunConfig, load_config
from otca.trainer import Trainer

torch.set_num_threads(1)

T = 6
TINY = [
    "train.iterations=1",
    "train.prompts_per_iter=2",
    "train.group_size=2",
    "train.micro_batch=4",
    f"sampler.num_steps={T}",
    "sampler.eval_steps=2",
    "eval.samples_per_prompt=1",
    "eval.metrics=null",
    "progress=false",
    "plots=false",
]


def tiny(tmp_path, *overrides: str) -> RunConfig:
    return load_config(None, [*TINY, f"out_dir={tmp_path}", *overrides])


class CountingVelocity(torch.nn.Module):
    """The trainer's velocity module, recording the noise level of every call (one per micro-batch and step)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.sigmas: list[float] = []

    def forward(self, x, sigma, cond):
        self.sigmas.append(float(sigma[0]))
        return self.inner(x, sigma, cond)


def iteration(tr: Trainer, it: int):
    """One iteration through the public phases: (trajectories, credit, update stats)."""
    batch = tr.sample_prompts(it)
    traj, cond = tr.rollout(batch, it)
    credit = tr.assign_credit(traj, tr.score(traj, batch), batch, it)
    return traj, credit, tr.update(traj, cond, credit)


def test_a_sliding_window_trains_only_its_steps_and_moves_with_the_iteration(tmp_path):
    # size 2 within [0, T - 1): MixGRPO's progressive window, start = it mod 5, cut at T - 1 = 5
    tr = Trainer(tiny(tmp_path, "sampler.sde_window.size=2", "train.inner_epochs=2"))
    counting = CountingVelocity(tr.model)
    tr.model = counting
    sig = tr.sigmas.tolist()
    for it, want in [(0, [0, 1]), (3, [3, 4]), (4, [4]), (5, [0, 1])]:
        counting.sigmas.clear()
        traj, credit, stats = iteration(tr, it)
        n = traj.log_probs.shape[0]
        steps = [k for k in range(T) if credit.mask[:, k].any()]
        assert steps == want
        assert bool(credit.mask[:, want].all())  # every sample trains every window step
        # stochastic (finite log-density) inside the window, deterministic (NaN) outside
        assert [k for k in range(T) if bool(torch.isfinite(traj.log_probs[:, k]).all())] == want
        assert bool(torch.isnan(traj.log_probs[:, [k for k in range(T) if k not in want]]).all())
        # the rollout calls the network on every step, the update only on the window's (2 epochs, one micro-batch)
        assert counting.sigmas[:T] == sig[:T]
        assert counting.sigmas[T:] == [sig[k] for k in want] * 2
        assert stats["ratio_first_step_max_dev"] == 0.0  # the first optimizer step re-evaluates the sampled steps
        assert credit.mask.shape == (n, T)


def test_a_random_window_is_one_draw_per_iteration_the_same_for_every_trainer(tmp_path):
    cfg = tiny(tmp_path, "sampler.sde_window.size=3", "sampler.sde_window.mode=random")
    a, b = Trainer(cfg), Trainer(cfg)
    windows = [a.sde_steps(it) for it in range(8)]
    for it, w in enumerate(windows):
        on = w.nonzero().flatten().tolist()
        assert len(on) == 3 and on == list(range(on[0], on[0] + 3)) and on[-1] <= T - 2
        assert torch.equal(b.sde_steps(it), w)
    assert len({tuple(w.tolist()) for w in windows}) > 1
    assert Trainer(tiny(tmp_path)).sde_steps(0) is None


def test_the_ratio_guard_keeps_a_ratio_of_exactly_one_and_weights_each_step_by_one_over_dt(tmp_path):
    # GRPO-Guard on the first optimizer step: log r = 0 and mean_theta = mean_old, so r_hat = 1 and each
    # entry's loss is -A / dt (the clipped surrogate at ratio 1, times delta = 1 / dt)
    losses = {}
    for guard in ("none", "ratio-norm"):
        tr = Trainer(tiny(tmp_path / guard, f"train.ratio_guard={guard}", "sampler.sde_window.size=3"))
        traj, credit, stats = iteration(tr, 0)
        assert (traj.means is not None) == (guard == "ratio-norm")
        assert stats["ratio_first_step_max_dev"] == 0.0
        assert stats["ratio_min"] == stats["ratio_max"] == 1.0
        dt = (tr.sigmas[:-1] - tr.sigmas[1:]).double()  # [T]
        weight = 1 / dt if guard == "ratio-norm" else torch.ones(T, dtype=torch.float64)
        m = credit.mask
        want = float((-credit.advantages.double() * weight[None, :])[m].mean())
        assert math.isclose(stats["policy_loss"], want, rel_tol=1e-5, abs_tol=1e-7)
        losses[guard] = stats["policy_loss"]
    assert losses["none"] != losses["ratio-norm"]


def test_the_guard_trains_two_epochs_with_finite_ratios_under_cps(tmp_path):
    tr = Trainer(tiny(tmp_path, "sampler.sde=cps", "train.ratio_guard=ratio-norm", "train.inner_epochs=2",
                      "train.lr=1e-3", "train.clip_range=1e-5"))
    traj, credit, stats = iteration(tr, 0)
    assert not bool(credit.mask[:, T - 1].any())  # CPS's deterministic last step is never trained
    assert bool(torch.isnan(traj.log_probs[:, T - 1]).all()) and bool(torch.isfinite(traj.log_probs[:, :-1]).all())
    assert stats["ratio_first_step_max_dev"] == 0.0
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["ratio_max"] > 1.0 or stats["ratio_min"] < 1.0  # the second epoch sees moved weights
