"""MOCA: Alg. 1 against a literal per-sample loop, the clip identity, the min-norm point, Eq. 12-14 by hand."""

import itertools
import math

import pytest
import torch

from otca.credit import exploration_strength, moca_coefficients, moca_fuse, trajectory_score


def alg1_loop(A: list[float], lam: float, tol: float = 1e-8) -> list[float]:
    """Alg. 1 of the paper, line by line, for one sample (Python floats)."""
    K = len(A)
    s_min, s_max = min(A), max(A)
    if s_max - s_min < tol:  # Case 1
        k_star = A.index(s_max)  # argmax, first on ties
        return [1.0 if k == k_star else 0.0 for k in range(K)]
    z_hat = min(max(lam / 2, s_min), s_max)
    for k in range(K):  # Case 2
        if abs(A[k] - z_hat) < tol:
            return [1.0 if j == k else 0.0 for j in range(K)]
    order = sorted(range(K), key=lambda k: A[k])  # Python's sort is stable
    c = [0.0] * K
    for j in range(K - 1):  # Case 3
        lo, hi = A[order[j]], A[order[j + 1]]
        if lo <= z_hat <= hi:
            c[order[j]] = (hi - z_hat) / (hi - lo)
            c[order[j + 1]] = (z_hat - lo) / (hi - lo)
            break
    return c


def random_cases(n: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages with deliberate ties (rounding), all-equal rows, and lambdas hitting an A_k exactly."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, K, generator=g) * 1.5
    A[: n // 3] = torch.round(A[: n // 3] * 2) / 2  # ties and exact hits on a 0.5 grid
    A[n // 3 : n // 2] = A[n // 3 : n // 2, :1]  # all-equal rows (Case 1)
    lam = torch.rand(n, generator=g)
    lam[: n // 4] = torch.round(lam[: n // 4] * 4) / 4  # lam / 2 on a 0.125 grid, often equal to an A_k
    lam[n // 4 : n // 3] = 0.0
    lam[-n // 6 :] = (2 * A[-n // 6 :, 0]).clamp(0, 1)  # lam / 2 == A_0 when A_0 in [0, 0.5]
    return A, lam


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_simplex_and_clip_identity_on_many_cases(K):
    A, lam = random_cases(2500, K, seed=K)  # 12,500 cases over K = 1..5
    z, c = moca_fuse(A, lam)
    assert (c >= 0).all()
    torch.testing.assert_close(c.sum(1), torch.ones(len(A)), atol=1e-6, rtol=0)
    assert ((c > 0).sum(1) <= 2).all()  # sparse: at most the two bracket ends
    clip = torch.minimum(torch.maximum(lam / 2, A.min(1).values), A.max(1).values)
    torch.testing.assert_close(z, clip, atol=1e-6, rtol=0)
    torch.testing.assert_close((c * A).sum(1), z, atol=1e-5, rtol=0)


@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_vectorized_equals_literal_loop(K):
    A, lam = random_cases(600, K, seed=10 + K)
    c = moca_coefficients(A, lam)
    want = torch.tensor(
        [alg1_loop(a, la) for a, la in zip(A.double().tolist(), lam.double().tolist(), strict=True)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(c.double(), want, atol=1e-5, rtol=0)
    # same case decisions: identical support
    assert torch.equal(c > 0, want > 0)


def test_edge_cases_by_hand():
    A = torch.tensor(
        [
            [0.3, 0.3, 0.3],  # Case 1: one-hot on the first argmax
            [-2.0, -1.0, -0.5],  # all negative, lam 0: z = max A (the mildest), Case 2 on index 2
            [-1.0, 2.0, 0.5],  # mixed signs, lam 0: z = 0, Case 3 between -1 and 0.5
            [1.0, 0.25, 2.0],  # all positive, lam 0.5: z_hat = 0.25 hits A_1 (Case 2)
            [0.1, 0.4, 0.4],  # lam 1 -> z_hat = 0.4, tie: the first matching index (1)
            [1.0, -1.0, 1.0],  # lam 2 -> z_hat = 1, first matching index 0
        ]
    )
    lam = torch.tensor([0.7, 0.0, 0.0, 0.5, 1.0, 2.0])
    z, c = moca_fuse(A, lam)
    want_c = torch.tensor(
        [
            [1.0, 0, 0],
            [0, 0, 1.0],
            [0.5 / 1.5, 0, 1.0 / 1.5],
            [0, 1.0, 0],
            [0, 1.0, 0],
            [1.0, 0, 0],
        ]
    )
    torch.testing.assert_close(c, want_c)
    torch.testing.assert_close(z, torch.tensor([0.3, -0.5, 0.0, 0.25, 0.4, 1.0]))
    assert z[2].item() == 0.0  # a fused 0 is exactly 0


def test_k_equals_one_returns_the_advantage():
    A = torch.tensor([[-3.0], [0.0], [2.0]])
    z, c = moca_fuse(A, torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(c, torch.ones(3, 1)) and torch.equal(z, A.flatten())


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="advantages, lam: expected"):
        moca_coefficients(torch.zeros(3, 2), torch.zeros(4))


def simplex_grid(K: int, steps: int) -> torch.Tensor:
    pts = [c for c in itertools.product(range(steps + 1), repeat=K) if sum(c) == steps]
    return torch.tensor(pts, dtype=torch.float64) / steps  # [P, K]


@pytest.mark.parametrize("K", [2, 3])
def test_alg1_minimises_eq13_over_a_simplex_grid(K):
    grid = simplex_grid(K, 60)  # [P, K]
    A, lam = random_cases(300, K, seed=20 + K)
    A, lam = A.double(), lam.double()
    lam[:150] = 0.0  # Eq. 11: the plain minimum-norm point
    z, c = moca_fuse(A.float(), lam.float())
    zz = A @ grid.T  # [n, P]
    grid_best = (zz**2 - lam[:, None] * zz).min(1).values  # [n]
    ours = z.double() ** 2 - lam * z.double()
    assert (ours <= grid_best + 1e-6).all()  # no grid point beats Alg. 1
    # lam = 0: the min-norm value is 0 when the signs straddle 0, else the smallest |A_k|
    straddle = (A[:150].min(1).values < 0) & (A[:150].max(1).values > 0)
    want = torch.where(straddle, 0.0, A[:150].abs().min(1).values)
    torch.testing.assert_close(z[:150].double().abs(), want, atol=1e-6, rtol=0)


def test_exploration_strength_by_hand():
    q = torch.tensor([0.2, 0.4, 0.6, -1.0])
    group_ids = torch.tensor([0, 0, 0, 1])
    A = torch.tensor([[1.0, 0.5], [-1.0, 0.5], [0.3, -0.1], [2.0, 2.0]])
    eps = 1e-6
    lam = exploration_strength(A, q, group_ids, eps=eps)
    sd = 0.2  # unbiased std of [0.2, 0.4, 0.6]; the single-sample group has std 0
    e = [0.2 / (sd + eps), 0.4 / (sd + eps), 0.6 / (sd + eps), 1.0 / eps]
    gate = [1.5 / (1.5 + eps), 0.0, 0.2 / (0.2 + eps), 4 / (4 + eps)]  # relu(sum) / (|sum| + eps)
    torch.testing.assert_close(lam, torch.tensor([g * math.tanh(x) for g, x in zip(gate, e, strict=True)]))
    centred = exploration_strength(A, q, group_ids, eps=eps, center=True)
    e_c = [0.2 / (sd + eps), 0.0, 0.2 / (sd + eps), 0.0]
    torch.testing.assert_close(centred, torch.tensor([g * math.tanh(x) for g, x in zip(gate, e_c, strict=True)]))
    pop = exploration_strength(A, q, group_ids, eps=eps, std="population")
    sd_p = math.sqrt(0.08 / 3)
    torch.testing.assert_close(pop[0], torch.tensor(gate[0] * math.tanh(0.2 / (sd_p + eps))))
    with pytest.raises(ValueError, match="eps: expected > 0"):
        exploration_strength(A, q, group_ids, eps=0.0)


def test_trajectory_score():
    dS = torch.tensor([[0.1, -0.2, 0.3]])
    w = torch.tensor([[0.5, 0.25, 0.25]])
    torch.testing.assert_close(trajectory_score(dS, w), torch.tensor([0.05 - 0.05 + 0.075]))
