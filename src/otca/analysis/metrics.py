"""The credit analysis's pure metrics: per-step reward gains, and how well TCD's similarity gains ``dS [N, T]`` track
them per trajectory (Pearson, Spearman, pairwise order agreement, recall@k, argmax distance), summarised over
trajectories as :class:`Stat` (the paper's Table 5 columns, Sec. 6.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

METRIC_RANGES = {
    "pearson": "[-1, 1]",
    "spearman": "[-1, 1]",
    "pairwise_order_agreement": "[0, 1]",
    "recall@3": "[0, 1]",
    "recall@5": "[0, 1]",
    "argmax_distance": "[0, T-1]",
    "pearson_pooled": "[-1, 1]",
}
ZSUM = "z-sum"


# ------------------------------------------------------------------ pure metric functions


def reward_gains(scores: torch.Tensor) -> torch.Tensor:
    """Per-transition reward gains ``dR_k = R_{k+1} - R_k``: ``scores [N, T+1, ...] -> [N, T, ...]``.

    The same differencing as TCD's Eq. 7 (our reading), so ``dR[:, k]`` and ``dS[:, k]`` both belong to
    transition ``k`` (``latents[:, k] -> latents[:, k+1]``).
    """
    return scores[:, 1:] - scores[:, :-1]  # [N, T, ...]


def zscore_sum(scores: torch.Tensor) -> torch.Tensor:
    """``scores [N, S, K] -> [N, S]``: each objective standardised over all of its ``N*S`` values, then summed.

    Standardising puts objectives with different units on one scale before adding them; an objective with
    no spread contributes 0. (A per-objective mean shift does not change gains; only the scale matters.)
    """
    flat = scores.double().reshape(-1, scores.shape[-1])  # [N*S, K]
    z = (scores.double() - flat.mean(0)) / flat.std(0, unbiased=False).clamp_min(1e-12)  # [N, S, K]
    return z.sum(-1)  # [N, S]


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a, b [N, T]``: ``[N]`` float64; NaN where a row is constant."""
    a, b = a.double(), b.double()
    a = a - a.mean(1, keepdim=True)  # [N, T]
    b = b - b.mean(1, keepdim=True)  # [N, T]
    den = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)  # [N]
    return torch.where(den > 0, (a * b).sum(1) / den, torch.full_like(den, math.nan))  # [N]


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks within each row of ``x [N, T]``, ties given their average rank (scipy's 'average')."""
    below = (x[:, None, :] < x[:, :, None]).sum(2)  # [N, T]: entries strictly smaller than x[:, k]
    equal = (x[:, None, :] == x[:, :, None]).sum(2)  # [N, T]: entries equal to x[:, k], itself included
    return below.double() + (equal.double() + 1) / 2  # [N, T]


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row: the Pearson correlation of the average ranks ``[N]``."""
    return pearson_rows(average_ranks(a), average_ranks(b))  # [N]


def order_agreement_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise order agreement ``[N]``: the fraction of step pairs ``j < k`` ordered the same way by ``a`` and
    ``b``, i.e. ``sign(a_j - a_k) == sign(b_j - b_k)`` (a tie agrees only with a tie). Without ties it is
    ``(1 + Kendall's tau) / 2``."""
    T = a.shape[1]
    sa = torch.sign(a[:, :, None] - a[:, None, :])  # [N, T, T]
    sb = torch.sign(b[:, :, None] - b[:, None, :])  # [N, T, T]
    upper = torch.ones(T, T, dtype=torch.bool, device=a.device).triu(1)  # [T, T] pairs j < k
    return (sa == sb)[:, upper].double().mean(1)  # [N]


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of the ``k`` largest entries of each row; ties go to the earlier step."""
    return torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]  # [N, k]


def recall_at_k_rows(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Recall@k ``[N]``: ``|topk(a) ∩ topk(b)| / k`` for each row (``1 <= k <= T``)."""
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"recall@k: expected 1 <= k <= T={a.shape[1]}, got k={k}")
    hits = top_k(a, k)[:, :, None] == top_k(b, k)[:, None, :]  # [N, k, k]
    return hits.any(2).double().sum(1) / k  # [N]


def argmax_distance_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|argmax a - argmax b|`` in steps for each row ``[N]`` (the first maximum on ties)."""
    return (a.argmax(1) - b.argmax(1)).abs().double()  # [N]


@dataclass(frozen=True)
class Stat:
    """A per-trajectory metric summarised over trajectories: mean, population std, and the count ``n`` of
    trajectories where it is defined (a correlation is undefined on a constant row)."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f}" if math.isnan(self.std) else f"{self.mean:.4f} ± {self.std:.3f}"


def summarize(values: torch.Tensor) -> Stat:
    """Mean and population std of the finite entries of ``values [N]`` (NaN, 0 when there are none)."""
    v = values[torch.isfinite(values)].double()  # [n]
    if v.numel() == 0:
        return Stat(math.nan, math.nan, 0)
    return Stat(float(v.mean()), float(v.std(unbiased=False)), int(v.numel()))


def proxy_metrics(dS: torch.Tensor, dR: torch.Tensor, ks: Sequence[int] = (3, 5)) -> dict[str, Stat]:
    """Table 5 for one reward: how well the gains ``dS [N, T]`` track the reward gains ``dR [N, T]``.

    - ``pearson`` / ``spearman``: per-trajectory correlation over the steps;
    - ``pairwise_order_agreement``: :func:`order_agreement_rows`;
    - ``recall@k``: :func:`recall_at_k_rows` for each ``k`` in ``ks`` below T (at ``k = T`` it is always 1);
    - ``argmax_distance``: :func:`argmax_distance_rows`;
    - ``pearson_pooled``: one Pearson correlation over all ``N*T`` (trajectory, step) pairs (``n = N*T``,
      std NaN: a single value): the paper's "global correlation" reading, beside the per-trajectory mean.
    """
    if dS.shape != dR.shape or dS.dim() != 2:
        raise ValueError(f"dS, dR: expected two [N, T] tensors, got {list(dS.shape)} and {list(dR.shape)}")
    out = {
        "pearson": summarize(pearson_rows(dS, dR)),
        "spearman": summarize(spearman_rows(dS, dR)),
        "pairwise_order_agreement": summarize(order_agreement_rows(dS, dR)),
    }
    for k in ks:
        if k < dS.shape[1]:
            out[f"recall@{k}"] = summarize(recall_at_k_rows(dS, dR, k))
    out["argmax_distance"] = summarize(argmax_distance_rows(dS, dR))
    pooled = pearson_rows(dS.reshape(1, -1), dR.reshape(1, -1))  # [1]
    out["pearson_pooled"] = Stat(float(pooled[0]), math.nan, dS.numel())
    return out
