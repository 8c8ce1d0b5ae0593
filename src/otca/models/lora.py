"""LoRA through peft: freeze the base weights and train adapters on the named modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from otca.config import LoraConfig


def add_lora(module: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Inject LoRA adapters (peft) into ``module`` in place; afterwards only LoRA weights require grad."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    for p in module.parameters():
        p.requires_grad_(False)
    # peft annotates lora_alpha as int but computes the scale alpha / r in floats: a fractional alpha is fine
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]
        target_modules=list(cfg.target_modules),
        init_lora_weights=True,
    )
    inject_adapter_in_model(peft_cfg, module)
    n = sum(p.numel() for name, p in module.named_parameters() if "lora_" in name and p.requires_grad)
    if n == 0:
        raise ValueError(f"model.lora.target_modules {list(cfg.target_modules)}: no module of the model matches")
    return module
