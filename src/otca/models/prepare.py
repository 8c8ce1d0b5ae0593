"""Which parts of a policy train: frozen encoders, dtype casts, and the trained networks' gradient checkpointing
and LoRA (``model.gradient_checkpointing``, ``model.lora``), applied the same way for every model kind."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

if TYPE_CHECKING:
    from otca.config import ModelConfig

M = TypeVar("M", bound=torch.nn.Module)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (no dropout): text encoders and VAEs are never trained."""
    module.requires_grad_(False)
    return module.eval()



def cast_module(module: M, dtype: torch.dtype) -> M:
    """``module`` in ``dtype``, calling ``.to`` only when the dtype differs: diffusers warns on every ``.to(dtype)``
    that its ``_keep_in_fp32_modules`` get cast too. Only tiny weights are cast here; real weights load in their
    dtype through ``from_pretrained``, which keeps those modules in fp32."""
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module


def prepare_denoisers(denoisers: Iterable[torch.nn.Module], cfg: ModelConfig) -> None:
    """Apply ``cfg.gradient_checkpointing`` and ``cfg.lora`` to the trained networks (in place).

    LoRA weights are kept in fp32 whatever the base dtype (peft's ``autocast_adapter_dtype``, which
    ``inject_adapter_in_model`` does not apply): an AdamW step of lr 1e-5 is below bf16's resolution for weights
    of size ~1e-2 and would round to no change. peft's LoRA forward casts its input to the adapter dtype and the
    sum back to the base output's dtype, so the network still computes in ``cfg.dtype``.
    """
    from otca.models.lora import add_lora

    for net in denoisers:
        if cfg.gradient_checkpointing:
            cast(Any, net).enable_gradient_checkpointing()  # a diffusers ModelMixin's method
        if cfg.lora is not None:
            add_lora(net, cfg.lora)
            for p in net.parameters():
                if p.requires_grad:
                    p.data = p.data.float()

