"""Credit and PPO diagnostics of a run: zero-variance groups, the per-step weight profile, run averages.

Pure functions of tensors and logged rows; the figures drawn from them are in :mod:`otca.plots`.
"""

from __future__ import annotations

import torch

from otca.credit.group import group_center


def zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> int:
    """Number of groups whose every objective is constant within the group (they get zero advantage).

    rewards: [B, K]; group_ids: [B]. Uses the credit core's own constant-group test.
    """
    constant = group_center(rewards, group_ids)[2].all(dim=1)  # [B]: the sample's group is constant in every column
    return int(group_ids[constant].unique().numel())


def step_weight_profile(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean temporal weight of each step over the samples that train it: weights, mask [B, T] -> [T]."""
    m = mask.float()
    return (weights * m).sum(0) / m.sum(0).clamp_min(1.0)


def run_diagnostics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Credit and PPO diagnostics averaged over a run's metrics rows: ``mean_<key>`` for the ``credit/``,
    ``train/clip_frac`` and ``train/approx_kl`` keys, and the largest first-step ratio deviation."""
    keys = [k for k in (rows[0] if rows else {}) if k.startswith(("credit/", "train/clip_frac", "train/approx_kl"))]
    out = {f"mean_{k}": sum(r[k] for r in rows) / len(rows) for k in keys}
    if rows:
        out["max_train/ratio_first_step_max_dev"] = max(r["train/ratio_first_step_max_dev"] for r in rows)
    return out


class LossMetrics:
    """Count-weighted means of :func:`otca.flow.policy_loss`'s metrics over the calls of an update (each call's
    metrics weighted by its number of trained entries), with the extreme ratios over all calls."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0
        self.rmin, self.rmax = float("inf"), float("-inf")

    def add(self, m: dict[str, float], n: int) -> None:
        if n == 0:
            return
        self.n += n
        for k, v in m.items():
            if k in ("ratio_min", "ratio_max", "num_trained"):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.rmin = min(self.rmin, m["ratio_min"])
        self.rmax = max(self.rmax, m["ratio_max"])

    def ratio_dev(self) -> float:
        return max(abs(self.rmin - 1.0), abs(self.rmax - 1.0)) if self.n else float("nan")

    def result(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        out.update(ratio_min=self.rmin, ratio_max=self.rmax)
        return out
