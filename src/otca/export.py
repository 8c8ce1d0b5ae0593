"""``otca export RUN``: a run's trained weights in the formats diffusers loads.

Three formats, one per denoiser of the policy (``transformer``, and ``transformer_2`` of a two-expert Wan 2.2):

* ``lora``: the LoRA adapters as the pipeline's ``save_lora_weights`` writes them (peft's state dict with the
  adapter name removed, keys prefixed ``transformer.``, the adapter config as ``lora_adapter_metadata`` so rank
  and alpha survive). Load with ``pipe.load_lora_weights(OUT)``; the second expert's file with
  ``pipe.load_lora_weights(OUT, weight_name="pytorch_lora_weights_transformer_2.safetensors",
  load_into_transformer_2=True)``.
* ``merged``: the LoRA update merged into the base weights, ``W + (alpha / r) B A``, written as a plain
  ``from_pretrained`` folder ``OUT/<denoiser>`` (config plus one safetensors file, in the weights' dtype).
* ``full``: the weights of a full fine-tuning run, ``save_pretrained`` into ``OUT/<denoiser>``.

``auto`` picks ``lora`` for a LoRA run and ``full`` otherwise. A run is read back through its own
``config.yaml`` and latest checkpoint (optionally its EMA weights), so any model kind whose denoisers are
diffusers models exports the same way. Conventions read from diffusers' ``loaders/lora_pipeline.py``,
``loaders/peft.py`` and ``training_utils._collate_lora_metadata`` (installed 0.42).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FORMATS = ("auto", "lora", "merged", "full")
LORA_FILE = "pytorch_lora_weights.safetensors"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' SAFETENSORS_WEIGHTS_NAME
ADAPTER = "default"  # the adapter name otca.models.lora injects under

# The pipeline LoRA mixin whose save_lora_weights matches each denoiser class (its load_lora_weights reads it).
_LORA_MIXINS = {
    "FluxTransformer2DModel": "FluxLoraLoaderMixin",
    "SD3Transformer2DModel": "SD3LoraLoaderMixin",
    "WanTransformer3DModel": "WanLoraLoaderMixin",
}


def denoisers_by_name(policy: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The trained networks by their attribute (= pipeline component) name: ``{"transformer": ..., ...}``."""
    holder: Any = policy
    nets: list[torch.nn.Module] = holder.denoisers() if hasattr(policy, "denoisers") else [holder.transformer]
    names = {id(m): n for n, m in policy.named_children()}
    out: dict[str, torch.nn.Module] = {}
    for net in nets:
        if id(net) not in names:
            raise ValueError(f"export: denoiser {type(net).__name__} is not a direct child of the policy")
        out[names[id(net)]] = net
    return out


def _lora_layers(net: torch.nn.Module) -> dict[str, Any]:
    """peft LoRA layers of ``net`` by module name."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in net.named_modules() if isinstance(m, LoraLayer)}


def _peft_config_holder(policy: torch.nn.Module, name: str, net: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module carrying the LoRA config (the denoiser, or the whole policy when LoRA was added to it) and the
    denoiser's key prefix inside that module's state dict."""
    if hasattr(net, "peft_config"):
        return net, ""
    if hasattr(policy, "peft_config"):
        return policy, name + "."
    raise ValueError(f"export: '{name}' has LoRA layers but no peft_config on it or on the policy")


def lora_state_dict(
    policy: torch.nn.Module, name: str, net: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, adapter metadata)`` of one denoiser's LoRA in diffusers naming (no ``transformer.`` prefix:
    ``save_lora_weights`` adds it): ``blocks.0.attn.to_q.lora_A.weight`` etc., fp32, contiguous, on CPU."""
    from peft import get_peft_model_state_dict

    holder, prefix = _peft_config_holder(policy, name, net)
    full = get_peft_model_state_dict(holder, adapter_name=ADAPTER)
    sd = {k[len(prefix):]: v.detach().float().contiguous().cpu() for k, v in full.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"export: no LoRA weights found under '{name}'")
    peft_config: Any = holder.peft_config
    metadata: dict[str, Any] = peft_config[ADAPTER].to_dict()
    return sd, metadata


def merged_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s state dict with every LoRA layer folded into its base layer (``W + delta``, delta from peft's
    ``get_delta_weight``: ``(alpha / r) B A``, computed in fp32 then cast to the base dtype) and the peft
    wrapping removed from the names; ``net`` itself is not changed."""
    layers = _lora_layers(net)
    out: dict[str, torch.Tensor] = {}
    for key, t in net.state_dict().items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = t.detach()
    with torch.no_grad():
        for mname, layer in layers.items():
            base = layer.get_base_layer()
            delta = layer.get_delta_weight(ADAPTER).float()
            out[f"{mname}.weight"] = (base.weight.float() + delta).to(base.weight.dtype)
    return {k: v.contiguous().cpu() for k, v in out.items()}


def _lora_mixin(net: torch.nn.Module) -> Any:
    import diffusers

    cls = type(net).__name__
    if cls not in _LORA_MIXINS:
        raise ValueError(f"export: no diffusers LoRA format known for {cls} (known: {', '.join(sorted(_LORA_MIXINS))})")
    return getattr(diffusers.loaders.lora_pipeline, _LORA_MIXINS[cls])


def export_policy(policy: torch.nn.Module, out_dir: str | Path, fmt: str = "auto") -> dict[str, Any]:
    """Write ``policy``'s denoisers to ``out_dir`` in ``fmt`` (module docstring); returns what was written
    (also saved as ``out_dir/export.json``)."""
    if fmt not in FORMATS:
        raise ValueError(f"export format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nets = denoisers_by_name(policy)
    has_lora = any(_lora_layers(n) for n in nets.values())
    fmt = ("lora" if has_lora else "full") if fmt == "auto" else fmt
    if fmt in ("lora", "merged") and not has_lora:
        raise ValueError(f"export format '{fmt}': the run has no LoRA adapters (use 'full')")
    if fmt == "full" and has_lora:
        raise ValueError("export format 'full': the run trained LoRA adapters (use 'lora' or 'merged')")
    written: dict[str, str] = {}
    for name, net in nets.items():
        if fmt == "lora":
            sd, metadata = lora_state_dict(policy, name, net)
            weight_name = LORA_FILE if name == "transformer" else f"pytorch_lora_weights_{name}.safetensors"
            _lora_mixin(net).save_lora_weights(
                out, transformer_lora_layers=sd, weight_name=weight_name, transformer_lora_adapter_metadata=metadata
            )
            written[name] = weight_name
        elif fmt == "merged":
            from safetensors.torch import save_file

            (out / name).mkdir(exist_ok=True)
            net.save_config(out / name)  # type: ignore[operator]
            save_file(merged_state_dict(net), str(out / name / WEIGHTS_FILE), metadata={"format": "pt"})
            written[name] = f"{name}/"
        else:
            net.save_pretrained(out / name)  # type: ignore[operator]
            written[name] = f"{name}/"
    info = {"format": fmt, "files": written}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    return info


def load_run_policy(run_dir: str | Path, ema: bool = False) -> torch.nn.Module:
    """A run's policy on CPU, built from its ``config.yaml`` with its latest checkpoint's trained weights (or EMA)."""
    from otca.checkpoint import latest_checkpoint, load_checkpoint
    from otca.config import load_config
    from otca.models.registry import build_policy

    run = Path(run_dir)
    cfg = load_config(run / "config.yaml", [f"out_dir={run}"])
    policy: torch.nn.Module = build_policy(cfg.model, torch.device("cpu"))  # type: ignore[assignment]
    ck = load_checkpoint(latest_checkpoint(run))
    weights = ck["ema"] if ema else ck["weights"]
    if weights is None:
        raise ValueError(f"export --ema: run '{run}' has no EMA weights in its latest checkpoint")
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    if set(params) != set(weights):
        diff = sorted(set(params) ^ set(weights))
        raise ValueError(
            f"export: checkpoint of '{run}' does not match its model: {len(diff)} mismatched, e.g. {diff[0]}"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n].to(p.dtype))
    return policy


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, fmt: str = "auto", ema: bool = False) -> Path:
    """``otca export RUN``: the run's latest weights to ``out_dir`` (default ``RUN/export``) in ``fmt``."""
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "export"
    export_policy(load_run_policy(run_dir, ema=ema), out, fmt)
    return out
