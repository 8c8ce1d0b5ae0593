"""The SDE window (MixGRPO, Flow-GRPO-Fast): hand-listed sliding positions, the random start's range and
uniformity, the train mask, the mixed SDE/ODE step, and a windowed rollout on a toy policy against a loop of
plain transitions and Euler steps."""

import math

import pytest
import torch

from otca.flow import (
    WindowSpec,
    flow_sde_step,
    get_transition,
    make_sigmas,
    mixed_step,
    ode_step,
    sde_window,
    window_train_mask,
)
from otca.rollout import STREAM_SDE_NOISE, sample_sde, seeded_generator

FLOW_SDE = get_transition("flow-sde")
SEEDED = {"eta": 0.7, "seed": 5, "iteration": 0, "indices": [0, 1]}


def _on(steps: torch.Tensor) -> list[int]:
    return [int(i) for i in steps.nonzero().flatten()]


def test_sliding_window_positions_by_hand():
    # T = 6, size 2, candidates [0, 5): starts 0, 1, 2, 3, 4 (cut at 5), then back to 0; one move per 2 iterations
    spec = WindowSpec(num_steps=6, size=2, iters_per_shift=2)
    got = [_on(sde_window(spec, "sliding", it)) for it in range(12)]
    assert got == [[0, 1], [0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [3, 4], [3, 4], [4], [4], [0, 1], [0, 1]]


def test_sliding_window_with_shift_and_range():
    # MixGRPO-like: size 3, shift 2, candidates [1, 7) of T = 8: starts 1, 3, 5, then back to 1
    spec = WindowSpec(num_steps=8, size=3, lo=1, hi=7, shift=2)
    got = [_on(sde_window(spec, "sliding", it)) for it in range(4)]
    assert got == [[1, 2, 3], [3, 4, 5], [5, 6], [1, 2, 3]]


def test_random_window_range_reproducibility_and_uniformity():
    spec = WindowSpec(num_steps=10, size=3, lo=0, hi=5)  # starts 0, 1, 2 (Flow-GRPO-Fast: range (0, T // 2))
    starts = []
    for it in range(3000):
        steps = sde_window(spec, "random", it, torch.Generator().manual_seed(it))
        on = _on(steps)
        assert len(on) == 3 and on == list(range(on[0], on[0] + 3)) and on[-1] < 5
        starts.append(on[0])
    counts = torch.bincount(torch.tensor(starts), minlength=3).float()
    assert counts.shape == (3,)
    # each start has probability 1/3: 5 binomial standard errors
    assert bool(((counts / 3000 - 1 / 3).abs() < 5 * math.sqrt(2 / 9 / 3000)).all())
    a = sde_window(spec, "random", 7, torch.Generator().manual_seed(42))
    assert torch.equal(a, sde_window(spec, "random", 7, torch.Generator().manual_seed(42)))


def test_default_end_excludes_the_last_step():
    spec = WindowSpec(num_steps=4, size=3)
    assert _on(sde_window(spec, "random", 0, torch.Generator().manual_seed(0))) == [0, 1, 2]
    assert not bool(sde_window(WindowSpec(num_steps=4, size=1), "sliding", 3)[3])


def test_train_mask():
    steps = torch.tensor([False, True, True, False])
    assert window_train_mask(steps, n=2).tolist() == [[False, True, True, False]] * 2
    frac = torch.tensor([[True, True, False, False], [False, False, True, True]])
    assert window_train_mask(steps, frac).tolist() == [[False, True, False, False], [False, False, True, False]]


@pytest.mark.parametrize(
    "spec, mode, match",
    [
        (WindowSpec(num_steps=4, size=0), "sliding", "size: expected an int >= 1"),
        (WindowSpec(num_steps=4, size=4), "sliding", "size: expected at most hi - lo = 3"),
        (WindowSpec(num_steps=4, size=1, lo=3), "random", "lo/hi"),
        (WindowSpec(num_steps=4, size=1, hi=5), "random", "lo/hi"),
        (WindowSpec(num_steps=4, size=1, shift=0), "sliding", "shift"),
    ],
)
def test_bad_spec_is_a_clear_error(spec, mode, match):
    with pytest.raises(ValueError, match=match):
        sde_window(spec, mode, 0)


def test_unknown_mode_lists_the_known():
    with pytest.raises(KeyError, match="random, sliding"):
        sde_window(WindowSpec(num_steps=4, size=1), "progressive", 0)


def test_mixed_step_is_the_transition_inside_and_euler_outside():
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    inside = mixed_step(flow_sde_step, x, v, 0.8, 0.6, stochastic=True, eta=0.7, noise=noise)
    ref = flow_sde_step(x, v, 0.8, 0.6, eta=0.7, noise=noise)
    for a, b in zip(inside, ref, strict=True):
        assert torch.equal(a, b)
    x_next, log_prob, mean, std = mixed_step(flow_sde_step, x, v, 0.8, 0.6, stochastic=False, eta=0.7, noise=noise)
    assert torch.equal(x_next, ode_step(x, v, 0.8, 0.6)) and torch.equal(mean, x_next)
    assert log_prob.shape == (3,) and bool(log_prob.isnan().all()) and bool((std == 0).all())


class _ToyPolicy(torch.nn.Module):
    """A linear velocity field ``v = a x + b`` (the rollout only calls ``velocity``)."""

    def velocity(self, x, sigma, cond):
        return 0.5 * x + 0.1 * sigma.reshape(-1, *([1] * (x.dim() - 1)))


def test_windowed_rollout_equals_a_loop_of_sde_and_euler_steps():
    policy, T = _ToyPolicy(), 6
    sigmas = make_sigmas(T, 3.0)
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    steps = sde_window(WindowSpec(num_steps=T, size=2), "sliding", 2)  # steps 2, 3
    traj = sample_sde(policy, [None, None], x0, sigmas, transition=FLOW_SDE, **SEEDED,
                      sde_steps=steps)
    gens = [seeded_generator(5, 0, STREAM_SDE_NOISE, i) for i in (0, 1)]
    x = x0
    for k in range(T):
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])  # drawn on every step
        v = policy.velocity(x, sigmas[k].expand(2), None)
        if k in (2, 3):
            x, lp, _, _ = flow_sde_step(x, v, float(sigmas[k]), float(sigmas[k + 1]), eta=0.7, noise=noise)
            assert torch.equal(traj.log_probs[:, k], lp)
        else:
            x = ode_step(x, v, float(sigmas[k]), float(sigmas[k + 1]))
            assert bool(traj.log_probs[:, k].isnan().all())
        assert torch.equal(traj.latents[:, k + 1], x)
    # A window at the start sees the full SDE rollout's noise (noise is drawn on every step): same first states.
    full = sample_sde(policy, [None, None], x0, sigmas, transition=FLOW_SDE, **SEEDED)
    first = sample_sde(policy, [None, None], x0, sigmas, transition=FLOW_SDE, **SEEDED,
                       sde_steps=sde_window(WindowSpec(num_steps=T, size=2), "sliding", 0))
    assert torch.equal(first.latents[:, :3], full.latents[:, :3])
    assert torch.equal(first.log_probs[:, :2], full.log_probs[:, :2])
    assert not torch.equal(first.latents[:, 3], full.latents[:, 3])


def test_rollout_keeps_the_transition_means_for_a_ratio_guard():
    policy, T = _ToyPolicy(), 4
    sigmas = make_sigmas(T, 3.0)
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    traj = sample_sde(policy, [None, None], x0, sigmas, transition=FLOW_SDE, **SEEDED,
                      keep_means=True)
    assert traj.means is not None and traj.means.shape == (2, T, 3, 4)
    for k in range(T):
        x = traj.latents[:, k]
        v = policy.velocity(x, sigmas[k].expand(2), None)
        s_k, s_next = float(sigmas[k]), float(sigmas[k + 1])
        _, lp, mean, _ = flow_sde_step(x, v, s_k, s_next, eta=0.7, prev=traj.latents[:, k + 1])
        assert torch.equal(traj.means[:, k], mean) and torch.equal(traj.log_probs[:, k], lp)
    assert sample_sde(policy, [None, None], x0, sigmas, transition=FLOW_SDE, eta=0.7, seed=5, iteration=0,
                      indices=[0, 1]).means is None
