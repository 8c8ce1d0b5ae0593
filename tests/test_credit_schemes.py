"""Credit schemes: the registry contract, shapes and masks, hand-checked advantages, composition identities."""

import math
import uuid

import pytest
import torch
from pydantic import ValidationError

from otca.credit import (
    CreditConfig,
    CreditInputs,
    CreditOutput,
    compose_scheme,
    gdpo_aggregator,
    get_scheme,
    register_scheme,
    scheme_names,
    tcd_step_weights,
)
from otca.flow.schedule import make_sigmas

BUILTIN = ["flow-grpo", "gdpo", "grpo", "moca", "otca", "pcpo", "tcd", "tempflow"]


def make_inputs(B=12, T=6, K=3, G=4, seed=0, mask=None, **kw):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, T + 1, 2, 3, 3, generator=g).cumsum(1)  # a drifting path
    final = latents[:, -1] + 0.1 * torch.randn(B, 2, 3, 3, generator=g)
    rewards = torch.randn(B, K, generator=g) * torch.tensor([1.0, 5.0, 0.2])[:K]
    group_ids = torch.arange(B) // (B // G)
    return CreditInputs.from_trajectory(rewards, group_ids, latents, final, make_sigmas(T, 3.0), mask=mask, **kw)


def test_builtin_schemes_registered():
    assert set(BUILTIN) <= set(scheme_names())


@pytest.mark.parametrize("name", BUILTIN)
def test_every_scheme_contract(name):
    B, T, K = 12, 6, 3
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[3] = False  # a sample with no trained step
    inputs = make_inputs(B, T, K, mask=mask)
    cfg = CreditConfig(adv_clip=1.5)
    out = get_scheme(name)(inputs, cfg)
    assert isinstance(out, CreditOutput)
    assert out.advantages.shape == (B, T) and out.weights.shape == (B, T)
    assert out.per_sample.shape == (B,)
    assert out.objective_advantages.shape == (B, K) and out.coefficients.shape == (B, K)
    for t in (out.advantages, out.weights, out.per_sample, out.objective_advantages, out.coefficients):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert torch.equal(out.advantages[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(out.weights[~mask], torch.zeros(int((~mask).sum())))
    rows = mask.any(1)
    torch.testing.assert_close((out.weights.sum(1) / mask.sum(1).clamp_min(1))[rows], torch.ones(int(rows.sum())))
    assert out.per_sample.abs().max() <= 1.5
    torch.testing.assert_close(out.advantages, out.weights * out.per_sample[:, None])
    assert (out.coefficients >= 0).all()
    torch.testing.assert_close(out.coefficients.sum(1), torch.ones(B))
    for key in ("frac_mixed_sign", "frac_fused_zero", "frac_clipped", "weight_max", "weight_min",
                "adv_mean", "adv_std", "adv_abs_mean", "share/0", "share/1", "share/2"):
        assert isinstance(out.metrics[key], float) and math.isfinite(out.metrics[key]), key
    assert abs(sum(out.metrics[f"share/{k}"] for k in range(K)) - 1) < 1e-5


def test_uniform_weight_identities():
    inputs = make_inputs()
    flat = CreditConfig(w_min=1.0)
    grpo = get_scheme("grpo")(inputs, flat)
    # TCD with w_min = 1 is the uniform broadcast, MOCA + TCD with w_min = 1 is MOCA alone
    assert torch.equal(get_scheme("tcd")(inputs, flat).advantages, grpo.advantages)
    assert torch.equal(get_scheme("otca")(inputs, flat).advantages, get_scheme("moca")(inputs, flat).advantages)
    # grpo is the clipped sum of per-objective z-scores broadcast over every step
    A = grpo.objective_advantages
    torch.testing.assert_close(grpo.advantages, A.sum(1).clamp(-5, 5)[:, None].expand(-1, 6))


def test_otca_is_tcd_weights_times_moca_fused():
    inputs = make_inputs()
    cfg = CreditConfig()
    otca = get_scheme("otca")(inputs, cfg)
    moca = get_scheme("moca")(inputs, cfg)
    tcd = get_scheme("tcd")(inputs, cfg)
    torch.testing.assert_close(otca.advantages, tcd.weights * moca.per_sample[:, None])
    assert otca.weights.min() >= 0.5 - 1e-6
    assert "lambda_mean" in otca.metrics and "lambda_mean" not in tcd.metrics


# Two groups of three samples, two objectives; all steps trained.
R = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0], [0.0, 1.0], [0.0, 1.0], [6.0, 1.0]])
GID = torch.tensor([0, 0, 0, 1, 1, 1])
SIGMAS = make_sigmas(3)
MASK = torch.ones(6, 3, dtype=torch.bool)


def hand_inputs(**kw):
    return CreditInputs(R, GID, MASK, SIGMAS, **kw)


def test_grpo_hand_checked():
    out = get_scheme("grpo")(hand_inputs(), CreditConfig(adv_clip=100.0))
    r3 = math.sqrt(3)
    # group 0: objective 0 -> [-1, 0, 1]; objective 1 -> [-1, -1, 2] / sqrt(3)
    # group 1: objective 0 -> [-1, -1, 2] * 6/3 / (6/sqrt3) = [-1, -1, 2] / sqrt(3); objective 1 constant -> 0
    want = torch.tensor([-1 - 1 / r3, -1 / r3, 1 + 2 / r3, -1 / r3, -1 / r3, 2 / r3])
    torch.testing.assert_close(out.per_sample, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.advantages, want[:, None].expand(6, 3), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.coefficients, torch.full((6, 2), 0.5))
    # share: |A| summed per objective over the batch
    a0, a1 = 2 + 4 / r3, 4 / r3
    assert abs(out.metrics["share/0"] - a0 / (a0 + a1)) < 1e-6
    # no sample has one objective > 0 and another < 0 (a 0 has no sign): sample 1 is (0, -1/sqrt3)
    assert out.metrics["frac_mixed_sign"] == 0.0
    # with the clip at 1: clipped before the (here uniform) weights
    clipped = get_scheme("grpo")(hand_inputs(), CreditConfig(adv_clip=1.0))
    torch.testing.assert_close(clipped.per_sample, want.clamp(-1, 1))
    assert clipped.metrics["frac_clipped"] == pytest.approx(3 / 6)


def test_flow_grpo_hand_checked_group_and_batch_std():
    cfg = CreditConfig(adv_clip=100.0)
    out = get_scheme("flow-grpo")(hand_inputs(reward_weights=torch.tensor([1.0, 2.0])), cfg)
    s = torch.tensor([1.0, 2.0, 9.0, 2.0, 2.0, 8.0])  # r0 + 2 r1
    g0 = (s[:3] - 4) / (s[:3].std(unbiased=False) + 1e-4)
    g1 = (s[3:] - 4) / (s[3:].std(unbiased=False) + 1e-4)
    torch.testing.assert_close(out.per_sample, torch.cat([g0, g1]))
    torch.testing.assert_close(out.coefficients, torch.tensor([[1 / 3, 2 / 3]]).expand(6, 2))
    inputs = hand_inputs(reward_weights=torch.tensor([1.0, 2.0]))
    batch = get_scheme("flow-grpo")(inputs, cfg.model_copy(update={"batch_std": True}))
    sd = s.std(unbiased=False)
    torch.testing.assert_close(batch.per_sample, torch.cat([s[:3] - 4, s[3:] - 4]) / (sd + 1e-4))


def test_gdpo_hand_checked():
    out = get_scheme("gdpo")(hand_inputs(), CreditConfig(adv_clip=100.0))
    r3 = math.sqrt(3)
    d = 1e-4  # GDPO's eps on both std's (std of objective 0 in group 0 is 1, the others sqrt(3))
    pre = torch.tensor(
        [-1 / (1 + d) - 1 / (r3 + d), -1 / (r3 + d), 1 / (1 + d) + 2 / (r3 + d)]
        + [-2 / (2 * r3 + d), -2 / (2 * r3 + d), 4 / (2 * r3 + d)]
    )
    torch.testing.assert_close(out.per_sample, (pre - pre.mean()) / (pre.std() + 1e-4), atol=1e-6, rtol=1e-6)


def test_moca_by_hand():
    # one group of four; both objectives have mean 0 and std sqrt(20/3), so A = rewards / sqrt(20/3).
    # The gains are equal for all samples: std(q) = 0, e = |q| / eps is huge and tanh(e) = 1.
    rewards = torch.tensor([[3.0, 1.0], [1.0, -3.0], [-1.0, 3.0], [-3.0, -1.0]])
    gid = torch.zeros(4, dtype=torch.long)
    gains = torch.full((4, 2), 0.1)
    inputs = CreditInputs(rewards, gid, torch.ones(4, 2, dtype=torch.bool), make_sigmas(2), gains)
    out = get_scheme("moca")(inputs, CreditConfig())
    a = 1 / math.sqrt(20 / 3)
    torch.testing.assert_close(out.objective_advantages, rewards * a)
    # sample 0: all positive, lam ~ 1 -> clip(0.5, a, 3a) = 0.5; sample 1: mixed, sum < 0 -> lam 0 -> exactly 0;
    # sample 2: mixed, sum > 0 -> lam / 2 = 0.5; sample 3: all negative -> the mildest, max A = -a
    torch.testing.assert_close(out.per_sample, torch.tensor([0.5, 0.0, 0.5, -a]), atol=1e-6, rtol=0)
    assert out.per_sample[1].item() == 0.0
    torch.testing.assert_close(out.coefficients[3], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out.coefficients[1], torch.tensor([3 / 4, 1 / 4]))  # 0 = 3/4 a - 1/4 3a
    assert out.metrics["frac_mixed_sign"] == 0.5
    assert out.metrics["frac_fused_zero"] == 0.25
    assert out.metrics["lambda_mean"] == pytest.approx(0.5, abs=1e-6)  # lambda ~ 1 for samples 0 and 2


def test_mask_changes_only_which_steps_are_trained():
    inputs = make_inputs()
    mask = torch.ones(12, 6, dtype=torch.bool)
    mask[:, -1] = False  # DanceGRPO drops the last transition
    masked = CreditInputs(inputs.rewards, inputs.group_ids, mask, inputs.sigmas, inputs.gains)
    for name in BUILTIN:
        full = get_scheme(name)(inputs, CreditConfig())
        part = get_scheme(name)(masked, CreditConfig())
        torch.testing.assert_close(part.per_sample, full.per_sample)  # the aggregate ignores the mask
        assert torch.equal(part.advantages[:, -1], torch.zeros(12))
        torch.testing.assert_close(part.weights[:, :-1].mean(1), torch.ones(12))


def test_clip_happens_before_temporal_weights():
    inputs = make_inputs()
    out = get_scheme("tcd")(inputs, CreditConfig(adv_clip=0.5))
    assert out.per_sample.abs().max() <= 0.5
    assert out.advantages.abs().max() > 0.5  # the weights redistribute the clipped advantage over steps
    torch.testing.assert_close(out.advantages.mean(1), out.per_sample)  # mean-1 weights keep the total


def test_gain_schemes_need_gains():
    inputs = hand_inputs()
    for name in ("tcd", "moca", "otca"):
        with pytest.raises(ValueError, match="CreditInputs.gains: this scheme needs the TCD similarity gains"):
            get_scheme(name)(inputs, CreditConfig())
    for name in ("grpo", "flow-grpo", "gdpo", "pcpo", "tempflow"):
        get_scheme(name)(inputs, CreditConfig())


def test_reward_weights_and_names():
    one = get_scheme("grpo")(hand_inputs(reward_weights=torch.tensor([1.0, 0.0])), CreditConfig())
    alone = get_scheme("grpo")(CreditInputs(R[:, :1], GID, MASK, SIGMAS), CreditConfig())
    torch.testing.assert_close(one.per_sample, alone.per_sample)
    named = get_scheme("grpo")(hand_inputs(reward_names=("clip", "hps")), CreditConfig())
    assert {"share/clip", "share/hps"} <= set(named.metrics)


def test_std_and_eps_overrides():
    pop = get_scheme("grpo")(hand_inputs(), CreditConfig(std="population", eps_std=1e-4, adv_clip=100.0))
    z0 = torch.tensor([-1.0, 0.0, 1.0]) / (math.sqrt(2 / 3) + 1e-4)
    torch.testing.assert_close(pop.objective_advantages[:3, 0], z0)


def test_registry_user_scheme_duplicate_and_unknown():
    name = f"user-{uuid.uuid4().hex[:8]}"

    @register_scheme(name)
    def halve(inputs, config):
        out = get_scheme("grpo")(inputs, config)
        return CreditOutput(out.advantages / 2, out.weights, out.per_sample / 2, out.objective_advantages,
                            out.coefficients, out.metrics)

    assert name in scheme_names()
    inputs = make_inputs()
    torch.testing.assert_close(get_scheme(name)(inputs, CreditConfig()).advantages,
                               get_scheme("grpo")(inputs, CreditConfig()).advantages / 2)
    with pytest.raises(ValueError, match="already registered"):
        register_scheme(name)(halve)
    with pytest.raises(ValueError, match="already registered"):
        register_scheme("otca")(halve)
    with pytest.raises(KeyError, match="unknown credit scheme 'nope': known are .*otca"):
        get_scheme("nope")
    # a cross-ablation composed from the library's parts, without touching the library
    combo = f"tcd-gdpo-{uuid.uuid4().hex[:8]}"
    register_scheme(combo)(compose_scheme(tcd_step_weights, gdpo_aggregator))
    out = get_scheme(combo)(inputs, CreditConfig())
    torch.testing.assert_close(out.advantages,
                               get_scheme("tcd")(inputs, CreditConfig()).weights
                               * get_scheme("gdpo")(inputs, CreditConfig()).per_sample[:, None])


def test_config_contract():
    cfg = CreditConfig()
    assert (cfg.adv_clip, cfg.w_min, cfg.eps_w, cfg.eps_moca, cfg.tol) == (5.0, 0.5, 1e-6, 1e-6, 1e-8)
    assert all(f.description for f in CreditConfig.model_fields.values())  # a docstring under every field
    with pytest.raises(ValidationError, match="extra"):
        CreditConfig(adv_clipp=3.0)
    with pytest.raises(ValidationError):
        cfg.w_min = 0.3  # frozen
    for bad in ({"w_min": 1.5}, {"adv_clip": 0.0}, {"eps_w": 0.0}, {"std": "sample"}, {"eps_std": float("nan")}):
        with pytest.raises(ValidationError):
            CreditConfig(**bad)


def test_inputs_validation_messages():
    T = 3
    ok = dict(rewards=R, group_ids=GID, mask=MASK, sigmas=SIGMAS)
    cases = [
        ({"rewards": R[:, 0]}, "CreditInputs.rewards: expected a float \\[B, K\\]"),
        ({"rewards": torch.tensor([[1.0, float("nan")]] * 6)}, "NaN/inf in objective column\\(s\\) \\[1\\]"),
        ({"group_ids": GID.float()}, "CreditInputs.group_ids: expected an integer \\[6\\]"),
        ({"mask": MASK.float()}, "CreditInputs.mask: expected a bool \\[6, T\\]"),
        ({"sigmas": make_sigmas(T + 1)}, "CreditInputs.sigmas: expected shape \\[4\\]"),
        ({"sigmas": SIGMAS.flip(0)}, "CreditInputs.sigmas: expected strictly decreasing"),
        ({"gains": torch.zeros(6, T + 1)}, "CreditInputs.gains: expected shape \\[6, 3\\]"),
        ({"reward_weights": torch.tensor([-1.0, 2.0])}, "CreditInputs.reward_weights: expected \\[2\\] values >= 0"),
        ({"reward_names": ("a",)}, "CreditInputs.reward_names: expected 2 names"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            CreditInputs(**{**ok, **change})
