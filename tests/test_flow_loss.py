"""policy_loss: a hand-computed 2x3 example for both objectives, rho = 1, autograd vs hand gradients, masking
with inf/NaN, chunked accumulation with a normalizer, the KL term, a plain-loop reference, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otca.flow import OBJECTIVES, policy_loss

# rho = [[1, 1.2, 0.8], [1.05, 0.5, 2.0]], the last entry masked out; clip range 0.1
RHO = [[1.0, 1.2, 0.8], [1.05, 0.5, 2.0]]
ADV = torch.tensor([[1.0, 1.0, -1.0], [-2.0, 2.0, 0.5]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
EPS = 0.1


def _example():
    old = torch.tensor([[-1.0, -2.0, 0.5], [0.0, 1.0, -3.0]])
    return old + torch.log(torch.tensor(RHO)), old


def test_clip_hand_computed():
    # -min(rho A, clip(rho) A): -1 ; -min(1.2, 1.1) = -1.1 ; -min(-0.8, -0.9) = 0.9 ;
    # -min(-2.1, -2.1) = 2.1 ; -min(1.0, 1.8) = -1.0  -> sum -0.1 over 5 trained entries
    log_probs, old = _example()
    loss, m = policy_loss(log_probs, old, ADV, MASK, clip_range=EPS)
    assert loss.item() == pytest.approx(-0.1 / 5, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(3 / 5)  # 1.2, 0.8, 0.5 lie outside [0.9, 1.1]
    assert m["ratio_mean"] == pytest.approx((1 + 1.2 + 0.8 + 1.05 + 0.5) / 5, abs=1e-6)
    assert m["ratio_min"] == pytest.approx(0.5, abs=1e-6)
    assert m["ratio_max"] == pytest.approx(1.2, abs=1e-6)  # the masked 2.0 is not seen
    kls = [r - 1 - math.log(r) for r in (1.0, 1.2, 0.8, 1.05, 0.5)]
    assert m["approx_kl"] == pytest.approx(sum(kls) / 5, abs=1e-6)
    assert m["policy_loss"] == pytest.approx(loss.item(), abs=1e-7)
    assert m["num_trained"] == 5.0 and "kl" not in m


def test_log_hinge_hand_computed():
    # max(0, eps |A| - A log rho): 0.1 ; 0.1 - log 1.2 < 0 -> 0 ; 0.1 + log 0.8 < 0 -> 0 ;
    # 0.2 + 2 log 1.05 ; 0.2 - 2 log 0.5
    log_probs, old = _example()
    loss, _ = policy_loss(log_probs, old, ADV, MASK, clip_range=EPS, objective="log-hinge")
    expected = (0.1 + (0.2 + 2 * math.log(1.05)) + (0.2 - 2 * math.log(0.5))) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_rho_one_gives_minus_mean_advantage():
    adv = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    lp = torch.randn(4, 6)
    loss, m = policy_loss(lp, lp.clone(), adv, mask)
    torch.testing.assert_close(loss, -adv[mask].mean())
    assert m["clip_frac"] == 0.0 and m["ratio_min"] == m["ratio_max"] == 1.0 and m["approx_kl"] == 0.0
    hinge, _ = policy_loss(lp, lp.clone(), adv, mask, objective="log-hinge", clip_range=0.01)
    torch.testing.assert_close(hinge, 0.01 * adv[mask].abs().mean())


def _gradient_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(5, 8, generator=g)
    # log-ratios in (-0.3, 0.3) but away from the clip boundaries +-0.1 (log(1.1) ~ 0.0953)
    log_ratio = (torch.rand(5, 8, generator=g) * 0.6 - 0.3).clamp_min(-0.3)
    log_ratio = torch.where((log_ratio.abs() - 0.1).abs() < 0.02, log_ratio * 0.5, log_ratio)
    adv = torch.randn(5, 8, generator=g)
    mask = torch.rand(5, 8, generator=g) > 0.25
    return (old + log_ratio).requires_grad_(True), old, adv, mask


def _kl_loss_and_grad(objective, seed, kl_coef):
    """A :func:`_gradient_case` with a random KL term ``[5, 8]``: its tensors ``(log_probs, old, adv, mask, kl)``,
    the loss and the loss's gradient with respect to log_probs."""
    log_probs, old, adv, mask = _gradient_case(seed=seed)
    kl = torch.rand(5, 8)
    loss, _ = policy_loss(log_probs, old, adv, mask, objective=objective, kl=kl, kl_coef=kl_coef)
    (grad,) = torch.autograd.grad(loss, log_probs)
    return (log_probs, old, adv, mask, kl), loss, grad


def test_clip_gradient_matches_hand_formula():
    log_probs, old, adv, mask = _gradient_case()
    loss, _ = policy_loss(log_probs, old, adv, mask, clip_range=EPS)
    loss.backward()
    rho = torch.exp(log_probs.detach() - old)
    n = mask.sum()
    # The gradient is -A rho / N except where the ratio is clipped on the side the advantage pushes it to.
    clipped = ((rho > 1 + EPS) & (adv > 0)) | ((rho < 1 - EPS) & (adv < 0))
    expected = torch.where(mask & ~clipped, -adv * rho / n, 0.0)
    assert clipped[mask].any() and (~clipped)[mask].any()
    torch.testing.assert_close(log_probs.grad, expected)
    inside = (rho - 1).abs() <= EPS
    assert bool((log_probs.grad[mask & inside] == (-adv * rho / n)[mask & inside]).all())


def test_log_hinge_gradient_matches_hand_formula():
    log_probs, old, adv, mask = _gradient_case(seed=1)
    loss, _ = policy_loss(log_probs, old, adv, mask, clip_range=EPS, objective="log-hinge")
    loss.backward()
    log_rho = log_probs.detach() - old
    active = EPS * adv.abs() - adv * log_rho > 0
    expected = torch.where(mask & active, -adv / mask.sum(), 0.0)
    torch.testing.assert_close(log_probs.grad, expected)


@pytest.mark.parametrize("objective", ["clip", "log-hinge"])
def test_masked_entries_contribute_nothing_even_inf_and_nan(objective):
    (log_probs, old, adv, mask, kl), clean, clean_grad = _kl_loss_and_grad(objective, seed=2, kl_coef=0.5)

    poisoned = [t.detach().clone() for t in (log_probs, old, adv, kl)]
    for t, bad in zip(poisoned, (math.inf, -math.inf, math.nan, math.nan), strict=True):
        t[~mask] = bad
    lp_bad = poisoned[0].requires_grad_(True)
    loss, m = policy_loss(lp_bad, poisoned[1], poisoned[2], mask, objective=objective, kl=poisoned[3], kl_coef=0.5)
    (grad,) = torch.autograd.grad(loss, lp_bad)
    assert torch.equal(loss, clean)
    assert torch.equal(grad, clean_grad) and bool((grad[~mask] == 0).all())
    assert all(math.isfinite(value) for value in m.values())


@pytest.mark.parametrize("objective", ["clip", "log-hinge"])
def test_normalizer_chunks_reproduce_the_full_mean(objective):
    (log_probs, old, adv, mask, kl), full, full_grad = _kl_loss_and_grad(objective, seed=3, kl_coef=0.1)
    n = int(mask.sum())
    chunks = [
        policy_loss(log_probs[:, s], old[:, s], adv[:, s], mask[:, s], objective=objective, kl=kl[:, s],
                    kl_coef=0.1, normalizer=n)[0]
        for s in (slice(0, 3), slice(3, 4), slice(4, 8))
    ]
    total = sum(chunks)
    (chunk_grad,) = torch.autograd.grad(total, log_probs)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(chunk_grad, full_grad)


def test_kl_term_is_added_as_a_masked_mean():
    log_probs, old = _example()
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 100.0]])
    base, _ = policy_loss(log_probs, old, ADV, MASK, clip_range=EPS)
    loss, m = policy_loss(log_probs, old, ADV, MASK, clip_range=EPS, kl=kl, kl_coef=0.5)
    assert m["kl"] == pytest.approx(0.3)
    assert loss.item() == pytest.approx(base.item() + 0.5 * 0.3, abs=1e-6)
    assert m["policy_loss"] == pytest.approx(base.item(), abs=1e-7)


def test_empty_mask_gives_zero_loss_and_nan_metrics():
    log_probs, old = _example()
    loss, m = policy_loss(log_probs.requires_grad_(True), old, ADV, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and bool((log_probs.grad == 0).all())
    assert m["num_trained"] == 0.0 and math.isnan(m["ratio_mean"])


def _loop_reference(lp, old, adv, mask, eps, objective):
    """Plain-python per-entry evaluation of the two objectives, averaged over trained entries."""
    terms = []
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if mask[i][t]:
                log_rho, a = lp[i][t] - old[i][t], adv[i][t]
                rho = math.exp(log_rho)
                if objective == "clip":
                    terms.append(-min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a))
                else:
                    terms.append(max(0.0, eps * abs(a) - a * log_rho))
    return sum(terms) / len(terms)


@settings(max_examples=50, deadline=None)
@given(
    b=st.integers(1, 4),
    t=st.integers(1, 5),
    eps=st.floats(1e-4, 0.3),
    objective=st.sampled_from(sorted(OBJECTIVES.names())),
    seed=st.integers(0, 2**16),
)
def test_matches_plain_loop_and_bounds(b, t, eps, objective, seed):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(b, t, generator=g, dtype=torch.float64)
    lp = old + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = 2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    loss, m = policy_loss(lp, old, adv, mask, clip_range=eps, objective=objective)
    ref = _loop_reference(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), eps, objective)
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert 0.0 <= m["clip_frac"] <= 1.0 and m["ratio_min"] <= m["ratio_mean"] <= m["ratio_max"]
    assert m["approx_kl"] >= 0.0
    rho = torch.exp(lp - old).float()
    if objective == "clip":  # pessimistic: never below the unclipped surrogate -rho A
        assert loss.item() >= (-(rho * adv.float()))[mask].mean().item() - 1e-5
    else:
        assert loss.item() >= 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"advantages": torch.zeros(2, 4)}, "advantages"),
        ({"mask": torch.ones(2, 3)}, "bool"),
        ({"old_log_probs": torch.zeros(6)}, "old_log_probs"),
        ({"objective": "ppo"}, "clip, log-hinge"),
        ({"clip_range": -0.1}, "clip_range"),
        ({"normalizer": 0.0}, "normalizer"),
        ({"kl_coef": 0.1}, "kl"),
        ({"kl": torch.zeros(3, 2), "kl_coef": 0.1}, "kl"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    log_probs, old = _example()
    args = {"log_probs": log_probs, "old_log_probs": old, "advantages": ADV, "mask": MASK}
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args.update(kwargs)
    with pytest.raises((ValueError, KeyError), match=match):
        policy_loss(args["log_probs"], args["old_log_probs"], args["advantages"], args["mask"], **opts)
