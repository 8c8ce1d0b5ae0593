"""Group normalisation and the linear reward aggregators: hand-computed values and a plain-loop reference."""

import math

import pytest
import torch

from otca.credit import gdpo_advantages, group_normalize, normalize_then_sum, sum_then_normalize


def loop_group_normalize(rewards, group_ids, std, eps, scope):
    """Obviously-correct reference: one group, one objective at a time, torch.std / torch.mean."""
    out = torch.zeros_like(rewards, dtype=torch.float64)
    r = rewards.double()
    for k in range(r.shape[1]):
        batch_sd = r[:, k].std(unbiased=(std == "unbiased")) if r.shape[0] > 1 else torch.tensor(0.0)
        for g in group_ids.unique():
            idx = (group_ids == g).nonzero().flatten()
            x = r[idx, k]
            if bool((x == x[0]).all()):
                continue  # a constant group gives 0
            sd = batch_sd if scope == "batch" else x.std(unbiased=(std == "unbiased"))
            out[idx, k] = (x - x.mean()) / (sd + eps)
    return out


@pytest.mark.parametrize("std", ["unbiased", "population"])
@pytest.mark.parametrize("scope", ["group", "batch"])
@pytest.mark.parametrize("seed", range(4))
def test_vectorized_matches_loop(std, scope, seed):
    g = torch.Generator().manual_seed(seed)
    B, K = 37, 3
    rewards = torch.randn(B, K, generator=g) * torch.tensor([1.0, 10.0, 0.01])
    # ids are unsorted, sparse and include a single-sample group and a constant group
    group_ids = torch.randint(0, 6, (B,), generator=g) * 17 + 3
    group_ids[0] = 999
    const = group_ids == group_ids[1]
    rewards[const] = 0.1
    got = group_normalize(rewards, group_ids, std=std, eps=1e-6, scope=scope)
    want = loop_group_normalize(rewards, group_ids, std, 1e-6, scope)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_hand_computed_unbiased_and_population():
    rewards = torch.tensor([[1.0], [2.0], [3.0], [5.0], [5.0]])
    group_ids = torch.tensor([0, 0, 0, 1, 1])
    # group 0: mean 2, unbiased std 1, population std sqrt(2/3); group 1 is constant
    unb = group_normalize(rewards, group_ids, eps=0.0)
    torch.testing.assert_close(unb.flatten(), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0]))
    pop = group_normalize(rewards, group_ids, std="population", eps=0.0)
    s = math.sqrt(2 / 3)
    torch.testing.assert_close(pop.flatten(), torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0]))


def test_batch_scope_uses_one_std_and_group_means():
    rewards = torch.tensor([[0.0], [2.0], [10.0], [14.0]])
    group_ids = torch.tensor([0, 0, 1, 1])
    batch_sd = torch.tensor([0.0, 2.0, 10.0, 14.0]).std(unbiased=False).item()
    got = group_normalize(rewards, group_ids, std="population", eps=0.0, scope="batch").flatten()
    torch.testing.assert_close(got, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / batch_sd)


def test_zero_variance_and_single_sample_groups_are_exact_zero():
    # 0.1 is not exactly representable: a naive (r - mean) / (0 + eps) gives rounding noise / eps
    rewards = torch.tensor([[0.1, 7.0], [0.1, 7.0], [0.1, 7.0], [0.3, -1.0]])
    group_ids = torch.tensor([4, 4, 4, 9])  # group 9 has one sample
    for std in ("unbiased", "population"):
        for scope in ("group", "batch"):
            a = group_normalize(rewards, group_ids, std=std, eps=1e-8, scope=scope)
            assert torch.equal(a, torch.zeros_like(a)), (std, scope)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="group_ids: expected shape \\[3\\]"):
        group_normalize(torch.zeros(3, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids: expected an integer tensor"):
        group_normalize(torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="std: expected"):
        group_normalize(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), std="sample")
    with pytest.raises(ValueError, match="scope: expected"):
        group_normalize(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), scope="global")
    with pytest.raises(ValueError, match="expected a \\[B, K\\] tensor"):
        group_normalize(torch.randn(3), torch.zeros(3, dtype=torch.long))


# One prompt group of 3 and one constant group of 2, two objectives.
R = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0], [4.0, 4.0], [4.0, 4.0]])
GID = torch.tensor([0, 0, 0, 1, 1])


def test_normalize_then_sum_hand_computed():
    # objective 0: mean 2, std 1 -> [-1, 0, 1]; objective 1: mean 1, std sqrt(3) -> [-1, -1, 2] / sqrt(3)
    z, A = normalize_then_sum(R, GID, torch.tensor([1.0, 2.0]), eps=0.0)
    r3 = math.sqrt(3)
    torch.testing.assert_close(A[:3], torch.tensor([[-1.0, -1 / r3], [0.0, -1 / r3], [1.0, 2 / r3]]))
    torch.testing.assert_close(z, torch.tensor([-1 - 2 / r3, -2 / r3, 1 + 4 / r3, 0.0, 0.0]))


def test_sum_then_normalize_hand_computed_and_exact_split():
    beta = torch.tensor([1.0, 2.0])
    z, A = sum_then_normalize(R, GID, beta)  # Flow-GRPO defaults: population std, eps 1e-4
    s = torch.tensor([1.0, 2.0, 9.0])  # r0 + 2 r1 in group 0; mean 4, population std sqrt(38/3)
    sd = math.sqrt(((1 - 4) ** 2 + (2 - 4) ** 2 + (9 - 4) ** 2) / 3)
    torch.testing.assert_close(z, torch.cat([(s - 4) / (sd + 1e-4), torch.zeros(2)]))
    torch.testing.assert_close(A @ beta, z)
    torch.testing.assert_close(A[:3, 0], torch.tensor([-1.0, 0.0, 1.0]) / (sd + 1e-4))
    assert torch.equal(A[3:], torch.zeros(2, 2))


def test_sum_then_normalize_constant_sum_with_varying_parts_gives_zero_parts():
    # the objectives trade off exactly: the weighted sum is constant, so z = 0 and so are its parts
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    z, A = sum_then_normalize(r, torch.zeros(3, dtype=torch.long), torch.ones(2))
    assert torch.equal(z, torch.zeros(3)) and torch.equal(A, torch.zeros(3, 2))


def test_gdpo_hand_computed():
    z, A = gdpo_advantages(R, GID, torch.ones(2))  # torch std, eps 1e-4 in both normalisations
    pre = (A @ torch.ones(2)).double()
    r3 = math.sqrt(3)
    expect_pre = torch.tensor([-1 - 1 / r3, -1 / r3, 1 + 2 / r3, 0, 0], dtype=torch.float64)
    expect_pre[:3] *= 1 / (1 + 1e-4)  # approximately: eps 1e-4 on std 1 and sqrt(3)
    torch.testing.assert_close(pre, expect_pre, atol=3e-4, rtol=0)
    want = (pre - pre.mean()) / (pre.std() + 1e-4)
    torch.testing.assert_close(z.double(), want, atol=1e-6, rtol=1e-6)
    assert abs(z.mean().item()) < 1e-6  # batch-wise renormalised


def test_weights_shape_checked():
    with pytest.raises(ValueError, match="reward_weights: expected shape \\[2\\]"):
        normalize_then_sum(R, GID, torch.ones(3))
