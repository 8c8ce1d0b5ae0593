"""Borrowed weights and modes: a module run for one block (or one call) with other parameter values or in eval
mode, and put back as it was afterwards. The trainer evaluates its EMA weights and calls its KL reference this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode for the duration of a block (restores the previous mode)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextmanager
def swapped(params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Copy ``weights`` (e.g. the EMA) into ``params`` for the duration of a block; ``None``: leave them."""
    if weights is None:
        yield
        return
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def call_with_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], *args: Any) -> Any:
    """``module(*args)`` with some of its parameters replaced by ``weights`` (by name) for this call only.

    A name that is not a parameter of ``module`` is an error: ``functional_call(strict=False)`` alone would
    silently keep the live weight (and a KL to a reference policy would silently be 0).
    """
    names = {n for n, _ in module.named_parameters()}
    unknown = [n for n in weights if n not in names]
    if unknown:
        raise ValueError(f"reference weights: '{unknown[0]}' is not a parameter of the model "
                         f"({len(unknown)} unknown names)")
    return torch.func.functional_call(module, weights, args, strict=False)
