"""VideoAlign's files: model_config.json (frame sampling, head width, LoRA scale, normalization) and its
checkpoints, read as KwaiVGI/VideoAlign (219ab9d) utils.py ``load_model_from_checkpoint`` does:
``checkpoint-N/model.pth`` (full, possibly PEFT-wrapped state dict) or ``adapter_model.safetensors`` +
``non_lora_state_dict.pth``; LoRA deltas are merged as ``W + (alpha / r) B A`` (``alpha / sqrt(r)`` with
rsLoRA), and the 4.45-era parameter names are mapped onto transformers 5's Qwen2-VL.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from otca.rewards.loading import load_checkpoint, option_hint, require_file, tensor_dict

DIMS = ("VQ", "MQ", "TA")
"""VideoReward's objectives in head order: visual quality, motion quality, text alignment."""


@dataclass(frozen=True)
class VideoAlignSpec:
    """What model_config.json fixes: frame sampling, head width, LoRA scale, normalization."""

    fps: float | None
    num_frames: int | None
    max_pixels: int
    output_dim: int
    lora_scale: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None


def read_spec(reward: str, path: Path) -> VideoAlignSpec:
    """Parse VideoAlign's model_config.json; settings this port does not reproduce are errors."""
    cfg = json.loads(path.read_text())
    data, model, lora = cfg.get("data_config", {}), cfg.get("model_config", {}), cfg.get("peft_lora_config", {})
    expect = {
        ("data_config", "sample_type"): (data.get("sample_type", "uniform"), "uniform"),
        ("data_config", "prompt_template_type"): (data.get("prompt_template_type"), "detailed_special"),
        ("model_config", "use_special_tokens"): (model.get("use_special_tokens"), True),
        ("model_config", "reward_token"): (model.get("reward_token", "special"), "special"),
    }
    for (section, key), (got, want) in expect.items():
        if got != want:
            raise ValueError(f"reward '{reward}': '{path}' {section}.{key}={got!r}, only {want!r} is supported")
    scale = None
    if lora.get("lora_enable"):
        r, alpha = lora.get("lora_r", 16), lora.get("lora_alpha", 32)  # VideoAlign PEFTLoraConfig defaults
        scale = alpha / math.sqrt(r) if lora.get("use_rslora") else alpha / r
    inf = cfg.get("inference_config")
    # One value per entry of DIMS (three).
    mean = cast("tuple[float, float, float]", tuple(float(inf[f"{d}_mean"]) for d in DIMS)) if inf else None
    std = cast("tuple[float, float, float]", tuple(float(inf[f"{d}_std"]) for d in DIMS)) if inf else None
    return VideoAlignSpec(
        fps=None if data.get("num_frames") is not None else float(data.get("fps", 2.0)),
        num_frames=data.get("num_frames"),
        max_pixels=int(data.get("max_frame_pixels", 240 * 320)),  # VideoAlign DataConfig defaults
        output_dim=int(model.get("output_dim", 1)),
        lora_scale=scale,
        mean=mean,
        std=std,
    )


def checkpoint_dir(reward: str, root: Path, step: int | None) -> Path:
    """``root/checkpoint-<step>``, the latest one when ``step`` is None (as VideoAlign picks it)."""
    found = {int(p.name.split("-")[-1]): p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()}
    if not found:
        raise FileNotFoundError(f"reward '{reward}': no checkpoint-<step> directory in '{root}' "
                                + option_hint(reward, "path"))
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"reward '{reward}': '{root / f'checkpoint-{step}'}' not found, have steps "
                                f"{sorted(found)} " + option_hint(reward, "checkpoint_step"))
    return found[step]


def load_reward_state(reward: str, ckpt: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a VideoAlign checkpoint directory, keys with PEFT's wrappers removed:
    ``base_model.model.`` prefix, ``.base_layer`` and the ``.default`` adapter name."""
    full = ckpt / "model.pth"
    if full.is_file():
        raw = tensor_dict(reward, full, load_checkpoint(reward, full))
    else:
        adapter = require_file(reward, ckpt / "adapter_model.safetensors", "path", "LoRA adapter file")
        rest = require_file(reward, ckpt / "non_lora_state_dict.pth", "path", "non-LoRA weights file")
        raw = {**tensor_dict(reward, rest, load_checkpoint(reward, rest)),
               **tensor_dict(reward, adapter, load_checkpoint(reward, adapter))}
    out = {}
    for key, value in raw.items():
        k = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = value
    return out


# transformers 4.45 (VideoAlign's pin) named the decoder ``model.*`` and the vision tower ``visual.*``;
# transformers 5 nests both under ``model``. First match wins.
_LAYOUT = (
    ("model.language_model.", "model.language_model."),
    ("model.visual.", "model.visual."),
    ("visual.", "model.visual."),
    ("model.", "model.language_model."),
)


def current_name(key: str) -> str | None:
    for old, new in _LAYOUT:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


@torch.no_grad()
def apply_reward_state(reward: str, model, state: dict[str, torch.Tensor], lora_scale: float | None) -> torch.Tensor:
    """Write a normalized VideoAlign state dict into a transformers-5 ``Qwen2VLForConditionalGeneration``
    (full tensors first, then merged LoRA deltas) and return the reward head weight ``[output_dim, hidden]``.

    ``lm_head`` is skipped: it is tied to the embeddings in Qwen2-VL-2B and unused by the score. Any other
    key the model does not have is an error, as is a shape mismatch.
    """
    params = dict(model.named_parameters())
    head, lora, unknown = None, {}, []
    for key, value in state.items():
        if key == "rm_head.weight":
            head = value
        elif key.startswith("lm_head."):
            continue
        elif ".lora_A." in key or ".lora_B." in key:
            lora[key] = value
        else:
            name = current_name(key)
            if name not in params or params[name].shape != value.shape:
                unknown.append(key)
            else:
                params[name].copy_(value)
    if head is None:
        raise ValueError(f"reward '{reward}': checkpoint has no rm_head.weight")
    for key_a in [k for k in lora if ".lora_A." in k]:
        module = key_a.split(".lora_A.")[0]
        name = current_name(module + ".weight")
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        if lora_scale is None:
            raise ValueError(f"reward '{reward}': checkpoint has LoRA weights but peft_lora_config.lora_enable is off")
        if name not in params or key_b not in lora:
            unknown.append(key_a)
            continue
        delta = lora[key_b].float() @ lora[key_a].float()  # [out, r] @ [r, in]
        params[name].add_((lora_scale * delta).to(params[name].dtype))
    if unknown:
        raise ValueError(f"reward '{reward}': checkpoint keys that fit no Qwen2-VL parameter (name or shape): "
                         f"{unknown[:5]} ({len(unknown)} in all)")
    return head
