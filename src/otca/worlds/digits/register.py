"""What the digits world provides, registered on import: model kind ``digits-flux``, prompt set ``digits``
(``digits:train``, ``digits:eval``, ``digits:all``), eval suite ``digits``, the digits rewards and the pretrainer
``digits``.

The core finds this module through the ``otca.worlds`` entry point in pyproject.toml (see :mod:`otca.registry`);
heavy modules are imported only when a registered entry is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import otca.worlds.digits.rewards  # noqa: F401  (registers digit-alignment and stroke-quality)
from otca.evaluate import register_eval_suite, register_prompt_set
from otca.models.base import FlowPolicy
from otca.models.registry import register_policy
from otca.pretraining import register_pretrainer
from otca.worlds.digits.prompts import all_prompts

if TYPE_CHECKING:
    from otca.config import ModelConfig

register_prompt_set("digits")(all_prompts)


@register_policy("digits-flux")
def _digits_flux(cfg: ModelConfig, device: torch.device) -> FlowPolicy:
    """The embedded default generator (:func:`otca.worlds.digits.policy.build_digits_flux`)."""
    from otca.worlds.digits.policy import build_digits_flux

    return build_digits_flux(cfg, device)


@register_eval_suite("digits")
def _digits_suite(pixels: torch.Tensor, prompts: Sequence[str], group_ids: torch.Tensor) -> dict[str, float]:
    """The digits world's eval-only metrics (:func:`otca.worlds.digits.metrics.evaluate_digits`)."""
    from otca.worlds.digits.metrics import evaluate_digits

    return evaluate_digits(pixels, list(prompts), group_ids)


@register_pretrainer("digits")
def _pretrain_digits(out_dir: Path, seed: int) -> list[dict[str, Any]]:
    """The judges (:func:`otca.worlds.digits.judges.train_judges`), then the generator
    (:func:`otca.worlds.digits.pretrain.pretrain_generator`)."""
    from otca.worlds.digits.judges import train_judges
    from otca.worlds.digits.pretrain import pretrain_generator

    return [train_judges(out_dir, seed=seed), pretrain_generator(out_dir, seed=seed)]
