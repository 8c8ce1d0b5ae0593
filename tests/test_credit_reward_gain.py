"""Reward-gain step weights (otca.credit.reward_gain) and the optional-input declarations, checked by hand."""

import pytest
import torch

from otca.credit import (
    OPTIONAL_INPUTS,
    CreditConfig,
    CreditInputs,
    ema_profile,
    gain_profile,
    get_scheme,
    objective_gains,
    objective_step_weights,
    requires,
    reward_gain_weights,
    reward_step_gains,
    scaled_step_gains,
    scheme_needs,
)
from otca.flow.schedule import make_sigmas

EPS = 1e-6


def tcd_formula(g, w_min, eps=EPS):
    """TCD Eq. 8 with the floor, written out for one row of gains (all steps trained)."""
    r = [max(x, 0.0) + eps for x in g]
    return [w_min + (1 - w_min) * len(g) * x / sum(r) for x in r]


def inputs_with(step_rewards, rewards=None, mask=None, **kw):
    B, T1, K = step_rewards.shape
    rewards = step_rewards[:, -1] if rewards is None else rewards
    mask = torch.ones(B, T1 - 1, dtype=torch.bool) if mask is None else mask
    return CreditInputs(rewards, torch.arange(B) // 2, mask, make_sigmas(T1 - 1), step_rewards=step_rewards, **kw)


def test_gains_and_scaling_by_hand():
    sr = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])  # [1, 3, 2]; objective 1 is constant
    torch.testing.assert_close(reward_step_gains(sr), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    sd = (torch.tensor([0.0, 1.0, 1.0]).var(unbiased=False)).sqrt()  # sqrt(2/9)
    torch.testing.assert_close(scaled_step_gains(sr), torch.tensor([[[1 / sd, 0.0], [0.0, 0.0]]]))
    with pytest.raises(ValueError, match="step_rewards: expected a \\[B, T\\+1, K\\] tensor with T >= 1"):
        reward_step_gains(torch.zeros(2, 1, 3))


def test_reward_gain_weights_by_hand():
    # two samples, T = 3, K = 2 with objective weights beta = (1, 2)
    sr = torch.tensor([
        [[0.0, 0.0], [2.0, 0.0], [2.0, 1.0], [1.0, 1.0]],
        [[1.0, 0.5], [1.0, 0.5], [3.0, 0.5], [3.0, 1.5]],
    ])
    beta = torch.tensor([1.0, 2.0])
    sd = sr.reshape(-1, 2).std(0, unbiased=False)
    g = (sr[:, 1:] - sr[:, :-1]) / sd  # [2, 3, 2]
    combined = (g * beta).sum(-1)  # [2, 3]
    for w_min in (0.0, 0.5, 1.0):
        got = reward_gain_weights(inputs_with(sr, reward_weights=beta), CreditConfig(w_min=w_min))
        want = torch.tensor([tcd_formula(row.tolist(), w_min) for row in combined])
        torch.testing.assert_close(got, want)
    # objective 1 has half the spread (sd 0.48 vs 0.99) and twice the weight: its unit gains (step 1 of sample 0,
    # step 2 of sample 1) beat objective 0's gains of 2; without beta and scaling, objective 0's would win
    w = reward_gain_weights(inputs_with(sr, reward_weights=beta), CreditConfig())
    assert w.argmax(1).tolist() == [1, 2]
    assert (sr[:, 1:] - sr[:, :-1]).sum(-1).argmax(1).tolist() == [0, 1]


def test_objective_step_weights_by_hand_and_mask():
    g = torch.tensor([[[1.0, -1.0], [-1.0, 3.0], [0.0, 1.0]]])  # [1, T=3, K=2]
    w = objective_step_weights(g, None, EPS, 0.5)  # [1, 3, 2]
    torch.testing.assert_close(w[0, :, 0], torch.tensor(tcd_formula([1.0, -1.0, 0.0], 0.5)))
    torch.testing.assert_close(w[0, :, 1], torch.tensor(tcd_formula([-1.0, 3.0, 1.0], 0.5)))
    mask = torch.tensor([[True, True, False]])
    wm = objective_step_weights(g, mask, EPS, 0.5)
    assert torch.equal(wm[0, 2], torch.zeros(2))
    torch.testing.assert_close(wm[0, :2, 0], torch.tensor(tcd_formula([1.0, -1.0], 0.5)))
    torch.testing.assert_close(wm[0, :2].mean(0), torch.ones(2))


def test_reward_gain_schemes_identities():
    g = torch.Generator().manual_seed(0)
    B, T, K = 8, 5, 3
    sr = torch.randn(B, T + 1, K, generator=g).cumsum(1)
    rewards = torch.randn(B, K, generator=g)
    gains = torch.randn(B, T, generator=g)
    inputs = CreditInputs(rewards, torch.arange(B) // 4, torch.ones(B, T, dtype=torch.bool), make_sigmas(T), gains,
                          step_rewards=sr)
    flat = CreditConfig(w_min=1.0)
    assert torch.equal(get_scheme("reward-gain")(inputs, flat).advantages, get_scheme("grpo")(inputs, flat).advantages)
    cfg = CreditConfig()
    rg, grpo = get_scheme("reward-gain")(inputs, cfg), get_scheme("grpo")(inputs, cfg)
    torch.testing.assert_close(rg.advantages, reward_gain_weights(inputs, cfg) * grpo.per_sample[:, None])
    rgm, moca = get_scheme("reward-gain-moca")(inputs, cfg), get_scheme("moca")(inputs, cfg)
    torch.testing.assert_close(rgm.per_sample, moca.per_sample)
    torch.testing.assert_close(rgm.advantages, rg.weights * moca.per_sample[:, None])


def test_missing_step_rewards_is_a_one_line_error():
    inputs = CreditInputs(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.ones(4, 3, dtype=torch.bool),
                          make_sigmas(3), torch.zeros(4, 3))
    for name in ("reward-gain", "reward-gain-moca", "step-moca"):
        with pytest.raises(ValueError, match="^CreditInputs.step_rewards: this scheme needs the rewards") as err:
            get_scheme(name)(inputs, CreditConfig())
        assert "\n" not in str(err.value)


def test_step_rewards_validation():
    ok = dict(rewards=torch.randn(4, 2), group_ids=torch.zeros(4, dtype=torch.long),
              mask=torch.ones(4, 3, dtype=torch.bool), sigmas=make_sigmas(3))
    with pytest.raises(ValueError, match="CreditInputs.step_rewards: expected a float \\[4, 4, 2\\] tensor"):
        CreditInputs(**ok, step_rewards=torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="CreditInputs.step_rewards: expected finite values"):
        CreditInputs(**ok, step_rewards=torch.full((4, 4, 2), float("nan")))
    CreditInputs(**ok, step_rewards=torch.zeros(4, 4, 2))


def test_a_gain_profile_stands_in_for_step_rewards_whose_gains_every_sample_shares():
    # step_rewards[b, t, k] = base[t, k] + offset[b, k]: every sample has the same gains, its own final reward
    g = torch.Generator().manual_seed(3)
    B, T, K = 6, 5, 3
    base, offset = torch.randn(T + 1, K, generator=g), torch.randn(B, 1, K, generator=g)
    sr = base.unsqueeze(0) + offset  # [B, T+1, K]
    gains = torch.rand(B, T, generator=g)
    measured = inputs_with(sr, gains=gains)
    profile = gain_profile(sr)  # [K, T]
    torch.testing.assert_close(profile, scaled_step_gains(sr)[0].T)
    stand_in = CreditInputs(measured.rewards, measured.group_ids, measured.mask, measured.sigmas, gains=gains,
                            gain_profile=profile)
    torch.testing.assert_close(objective_gains(stand_in), scaled_step_gains(sr))
    for name in ("reward-gain", "reward-gain-moca", "step-moca"):
        a, b = get_scheme(name)(measured, CreditConfig()), get_scheme(name)(stand_in, CreditConfig())
        torch.testing.assert_close(b.advantages, a.advantages)
        torch.testing.assert_close(b.weights, a.weights)


def test_gain_profile_validation():
    ok = dict(rewards=torch.randn(4, 2), group_ids=torch.zeros(4, dtype=torch.long),
              mask=torch.ones(4, 3, dtype=torch.bool), sigmas=make_sigmas(3))
    with pytest.raises(ValueError, match="CreditInputs.gain_profile: expected a float \\[2, 3\\] tensor"):
        CreditInputs(**ok, gain_profile=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="CreditInputs.gain_profile: expected finite values"):
        CreditInputs(**ok, gain_profile=torch.full((2, 3), float("inf")))
    CreditInputs(**ok, gain_profile=torch.zeros(2, 3))


def test_schemes_declare_their_optional_inputs():
    want = {
        "grpo": set(), "flow-grpo": set(), "gdpo": set(), "pcpo": set(), "tempflow": set(),
        "tcd": {"gains"}, "moca": {"gains"}, "otca": {"gains"},
        "reward-gain": {"step_rewards"}, "reward-gain-moca": {"gains", "step_rewards"},
        "step-moca": {"gains", "step_rewards"}, "profile-moca": {"gains"},
    }
    for name, needs in want.items():
        assert scheme_needs(get_scheme(name)) == needs, name
    assert OPTIONAL_INPUTS == {"gains", "step_rewards"}
    with pytest.raises(ValueError, match="requires: unknown optional input\\(s\\) \\['latents'\\]"):
        requires("latents")
    assert scheme_needs(lambda inputs, config: None) == frozenset()


def test_gain_profile_and_ema_against_loops():
    g = torch.Generator().manual_seed(3)
    B, T, K = 6, 4, 2
    sr = torch.randn(B, T + 1, K, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[:, 2] = False  # a transition nobody trains
    scaled = scaled_step_gains(sr)
    prof = gain_profile(sr, mask)
    for j in range(K):
        for t in range(T):
            rows = [scaled[b, t, j] for b in range(B) if mask[b, t]]
            want = sum(rows) / len(rows) if rows else 0.0
            assert float(prof[j, t]) == pytest.approx(float(want), abs=1e-6)
    torch.testing.assert_close(gain_profile(sr), scaled.mean(0).T)
    a, b = torch.ones(K, T), torch.zeros(K, T)
    torch.testing.assert_close(ema_profile(None, a, 0.9), a)
    torch.testing.assert_close(ema_profile(a, b, 0.75), torch.full((K, T), 0.75))
    with pytest.raises(ValueError, match="decay"):
        ema_profile(a, b, 1.0)
