"""TCD (Eq. 6-8): a hand-built trajectory, Eq. 8 sums, mean-1 floor properties, masks, precision."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otca.credit import eq8_weights, similarity_to_final, tcd_gains, tcd_weights, tcd_weights_from_gains

# A 3-step trajectory in 2-D against final = (1, 0): the angle to the final latent is 90, 45, 60, 0 degrees,
# so S = [0, 1/sqrt2, 1/2, 1] and the gains are [1/sqrt2, 1/2 - 1/sqrt2, 1/2] (the middle step moves away).
LATENTS = torch.tensor([[[0.0, 3.0], [2.0, 2.0], [1.0, math.sqrt(3)], [5.0, 0.0]]]).reshape(1, 4, 1, 2)
FINAL = torch.tensor([[[1.0, 0.0]]])  # [1, 1, 2]


def test_hand_built_trajectory():
    r2 = math.sqrt(2)
    torch.testing.assert_close(similarity_to_final(LATENTS, FINAL), torch.tensor([[0.0, 1 / r2, 0.5, 1.0]]))
    gains = tcd_gains(LATENTS, FINAL)
    torch.testing.assert_close(gains, torch.tensor([[1 / r2, 0.5 - 1 / r2, 0.5]]))
    eps = 1e-6
    total = 1 / r2 + 0.5 + 3 * eps
    w = torch.tensor([[(1 / r2 + eps) / total, eps / total, (0.5 + eps) / total]])  # ~ [2 - sqrt2, 0, sqrt2 - 1]
    torch.testing.assert_close(eq8_weights(gains, eps=eps), w)
    torch.testing.assert_close(w, torch.tensor([[2 - r2, 0.0, r2 - 1]]), atol=1e-5, rtol=0)
    w_hat = tcd_weights(LATENTS, FINAL, eps=eps, w_min=0.5)
    torch.testing.assert_close(w_hat, 0.5 + 0.5 * 3 * w)  # ~ [1.379, 0.5, 1.121]
    assert abs(w_hat.mean().item() - 1) < 1e-6


def test_similarity_matches_torch_cosine_and_is_fp32_without_grad():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 5, 4, 2, 2, generator=g, requires_grad=True)
    final = torch.randn(3, 4, 2, 2, generator=g)
    S = similarity_to_final(latents.to(torch.bfloat16), final.to(torch.bfloat16))
    assert S.dtype == torch.float32 and not S.requires_grad
    z = latents.detach().to(torch.bfloat16).float().flatten(2)  # [3, 5, 16]
    f = final.to(torch.bfloat16).float().flatten(1)[:, None]  # [3, 1, 16]
    want = torch.nn.functional.cosine_similarity(z, f, dim=2)
    torch.testing.assert_close(S, want, atol=1e-6, rtol=1e-6)


def test_similarity_is_scale_invariant_and_zero_latent_is_zero():
    S = similarity_to_final(LATENTS * torch.tensor([1.0, 7.0, 0.1, 3.0]).reshape(1, 4, 1, 1), FINAL)
    torch.testing.assert_close(S, similarity_to_final(LATENTS, FINAL))
    zero = torch.zeros(1, 2, 1, 2)
    assert torch.equal(similarity_to_final(zero, FINAL), torch.zeros(1, 2))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="latents, final: expected"):
        tcd_gains(torch.zeros(2, 4, 3), torch.zeros(2, 4))


def test_all_negative_gains_give_uniform_weights():
    dS = -torch.rand(4, 6)
    torch.testing.assert_close(eq8_weights(dS), torch.full((4, 6), 1 / 6))
    torch.testing.assert_close(tcd_weights_from_gains(dS), torch.ones(4, 6))


def test_eq8_over_mask_ignores_untrained_steps():
    g = torch.Generator().manual_seed(1)
    dS = torch.randn(5, 8, generator=g)
    mask = torch.rand(5, 8, generator=g) > 0.4
    mask[0] = False  # a row with no trained step
    w = eq8_weights(dS, mask)
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(w.sum(1)[1:], torch.ones(4))
    assert torch.equal(w[0], torch.zeros(8))
    # what happens on untrained steps does not change the trained steps' weights
    w2 = eq8_weights(torch.where(mask, dS, 100 * torch.randn(5, 8, generator=g)), mask)
    torch.testing.assert_close(w2, w)
    # the same as Eq. 8 computed on the trained steps alone (plain loop)
    for i in range(1, 5):
        kept = (dS[i][mask[i]].relu() + 1e-6)
        torch.testing.assert_close(w[i][mask[i]], kept / kept.sum())


def test_w_min_one_is_uniform_and_bad_options_raise():
    dS = torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(tcd_weights_from_gains(dS, mask, w_min=1.0), mask.float())
    with pytest.raises(ValueError, match="w_min"):
        tcd_weights_from_gains(dS, mask, w_min=1.5)
    with pytest.raises(ValueError, match="eps: expected > 0"):
        eq8_weights(dS, mask, eps=0.0)


finite = st.floats(-1.0, 1.0, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.lists(st.tuples(finite, st.booleans()), min_size=1, max_size=12), min_size=1, max_size=6),
    w_min=st.floats(0.0, 1.0),
    eps=st.sampled_from([1e-6, 1e-3, 1.0]),
)
def test_mean_one_weights_properties(rows, w_min, eps):
    T = max(len(r) for r in rows)
    pad = [r + [(0.0, False)] * (T - len(r)) for r in rows]
    dS = torch.tensor([[v for v, _ in r] for r in pad])
    mask = torch.tensor([[m for _, m in r] for r in pad])
    w = eq8_weights(dS, mask, eps)
    w_hat = tcd_weights_from_gains(dS, mask, eps, w_min)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[~mask], torch.zeros(int((~mask).sum())))
    for i in range(len(rows)):
        if mask[i].any():
            assert abs(w[i].sum().item() - 1) < 1e-5
            assert abs(w_hat[i][mask[i]].mean().item() - 1) < 1e-5
            assert w_hat[i][mask[i]].min().item() >= w_min - 1e-6
        else:
            assert torch.equal(w_hat[i], torch.zeros(T))
