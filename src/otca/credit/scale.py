"""Advantage-scale normalisation, applied identically after any scheme (``credit.adv_scale``).

Schemes hand the update advantages of very different size: on the embedded default the mean |A| over trained
steps is about 1.3-1.5 for the weighted-sum schemes and 0.3 for the MOCA ones (docs/credit-schemes.md). With
the ratio rarely clipped, a scheme with smaller advantages simply takes smaller steps, which confounds a
comparison of credit *direction* with step *size*. ``unit-mean-abs`` rescales each iteration's advantages by one
positive number so that their mean |A| over the trained entries is 1:

    s = 1 / mean_{(i, t) in mask} |A[i, t]|,   A' = s * A,   per_sample' = s * per_sample

One scalar per iteration: the direction of the update and every ratio between entries are unchanged, only the
step size is equalised across schemes. An iteration whose advantages are all 0 is left as it is.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch

from otca.credit.schemes import CreditOutput

AdvScale = Literal["none", "unit-mean-abs"]


def unit_mean_abs_factor(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The factor ``1 / mean |A|`` over the entries of ``mask [B, T]`` of ``advantages [B, T]`` (a 0-dim tensor);
    1 when there is no trained entry or every trained advantage is 0."""
    m = mask.to(advantages.dtype)  # [B, T]
    n = m.sum()
    mean_abs = (advantages.abs() * m).sum() / n.clamp_min(1)  # []
    return torch.where((n > 0) & (mean_abs > 0), 1.0 / mean_abs.clamp_min(torch.finfo(advantages.dtype).tiny),
                       torch.ones_like(mean_abs))


def scale_advantages(out: CreditOutput, mask: torch.Tensor, mode: AdvScale) -> CreditOutput:
    """``out`` with its advantages ``[B, T]`` and ``per_sample [B]`` rescaled by ``mode`` ('none': unchanged);
    the factor is added to the metrics as ``adv_scale`` and ``adv_abs_mean`` is recomputed after scaling."""
    if mode == "none":
        return out
    if mode != "unit-mean-abs":
        raise ValueError(f"credit.adv_scale: expected 'none' or 'unit-mean-abs', got {mode!r}")
    s = unit_mean_abs_factor(out.advantages, mask)  # []
    adv = out.advantages * s  # [B, T]
    m = mask.to(adv.dtype)
    metrics = {**out.metrics, "adv_scale": float(s),
               "adv_abs_mean": float((adv.abs() * m).sum() / m.sum().clamp_min(1))}
    return replace(out, advantages=adv, per_sample=out.per_sample * s, metrics=metrics)
