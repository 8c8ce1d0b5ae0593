"""The embedded default generator: a tiny diffusers FLUX on 16x16 digits, behind the real FLUX adapter.

The shipped weights live in ``src/otca/assets``: ``digits_flux.{safetensors,json}`` (the transformer and its
diffusers config, plus how it was pretrained) and ``digits_text.{safetensors,json}`` (the text encoder and its
config, vocabulary included). :func:`save_digits_generator` writes exactly what :func:`load_digits_policy` reads.

Model kind ``digits-flux`` (:func:`build_digits_flux`) goes through the same options parsing and the same
preparation of the trained network (gradient checkpointing, LoRA kept in fp32) as the diffusers kinds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from pydantic import Field

from otca.models.build import tiny_and_path_exclusive
from otca.models.flux import FluxPolicy
from otca.models.options import AdapterOptions, parse_options
from otca.models.prepare import prepare_denoisers
from otca.worlds.digits.text import DigitsTextEncoder, TextEncoderConfig, prompt_vocabulary
from otca.worlds.digits.vae import PixelCodec

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
FLUX_WEIGHTS, FLUX_CONFIG = "digits_flux.safetensors", "digits_flux.json"
TEXT_WEIGHTS, TEXT_CONFIG = "digits_text.safetensors", "digits_text.json"
T = TypeVar("T")

if TYPE_CHECKING:
    from otca.config import ModelConfig

# Real CFG off by default: the base model must leave headroom for RL (see the guidance table in
# tests/test_digits_policy.py); raise it to get cleaner, better-aligned digits.
DEFAULT_TRUE_CFG = 1.0

# FluxTransformer2DModel at ~300k parameters: 16 image tokens of 16 channels (2x2-packed [4, 8, 8] latents),
# 2 heads of 32 dims; the rope axes (8 + 12 + 12) must add up to the head dim.
TINY_FLUX_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)


def default_text_config() -> TextEncoderConfig:
    """The text encoder matching :data:`TINY_FLUX_CONFIG` (D = joint_attention_dim, P = pooled_projection_dim)."""
    return TextEncoderConfig(
        vocab=prompt_vocabulary(),
        width=TINY_FLUX_CONFIG["joint_attention_dim"],
        pooled_dim=TINY_FLUX_CONFIG["pooled_projection_dim"],
    )


def digits_networks(seed: int = 0) -> tuple[torch.nn.Module, DigitsTextEncoder]:
    """A freshly initialised tiny FLUX transformer and text encoder (seeded; the global RNG is left untouched)."""
    from diffusers import FluxTransformer2DModel  # lazy: diffusers costs seconds to import

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = cast(torch.nn.Module, FluxTransformer2DModel(**TINY_FLUX_CONFIG))  # a diffusers ModelMixin
        return transformer, DigitsTextEncoder(default_text_config())


def digits_policy(
    transformer: torch.nn.Module,
    text_encoder: DigitsTextEncoder,
    *,
    true_cfg_scale: float = DEFAULT_TRUE_CFG,
    negative_prompt: str = "",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FluxPolicy:
    """The digits networks behind the FLUX adapter, with the exact pixel codec (the text encoder gets frozen)."""
    if next(transformer.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        transformer = transformer.to(dtype=dtype)
    policy = FluxPolicy(
        transformer, text_encoder, PixelCodec(), true_cfg_scale=true_cfg_scale, negative_prompt=negative_prompt
    )
    return policy.to(device)


def build_digits_policy(
    random_init: bool = True,
    *,
    seed: int = 0,
    true_cfg_scale: float = DEFAULT_TRUE_CFG,
    negative_prompt: str = "",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FluxPolicy:
    """The digits policy with freshly initialised weights (tests); ``random_init=False`` loads the shipped ones."""
    options: dict[str, Any] = dict(
        true_cfg_scale=true_cfg_scale, negative_prompt=negative_prompt, device=device, dtype=dtype
    )
    if not random_init:
        return load_digits_policy(**options)
    return digits_policy(*digits_networks(seed), **options)


def save_digits_generator(
    out_dir: str | Path, transformer: torch.nn.Module, text_encoder: DigitsTextEncoder, pretraining: dict
) -> list[Path]:
    """Write the four asset files (weights as safetensors, configs as JSON) to ``out_dir``; returns their paths."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / FLUX_WEIGHTS, out / FLUX_CONFIG, out / TEXT_WEIGHTS, out / TEXT_CONFIG]
    save_file({k: v.detach().float().contiguous() for k, v in transformer.state_dict().items()}, files[0])
    config = dict(cast(Any, transformer).config)  # a diffusers model: its config is a dict
    files[1].write_text(json.dumps({"transformer": config, "pretraining": pretraining}, indent=1))
    save_file({k: v.detach().float().contiguous() for k, v in text_encoder.state_dict().items()}, files[2])
    files[3].write_text(json.dumps(text_encoder.config.to_dict(), indent=1))
    return files


def _from_json(path: Path, build: Callable[[dict], T]) -> T:
    """``build(the JSON at path)``; a missing, unreadable or unfit file is a one-line error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"digits generator: missing {path} (create it with `otca pretrain`)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"digits generator: {path} is not valid JSON ({e})") from None
    try:
        return build(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"digits generator: {path} is not a valid config ({type(e).__name__}: {e})") from None


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"digits generator: missing {path} (create it with `otca pretrain`)")
    try:
        module.load_state_dict(load_file(path), strict=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"digits generator: {path} is corrupt or does not match its JSON config ({first_line})"
        ) from None


def load_digits_policy(
    assets_dir: str | Path | None = None,
    *,
    true_cfg_scale: float = DEFAULT_TRUE_CFG,
    negative_prompt: str = "",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FluxPolicy:
    """The pretrained digits policy from ``assets_dir`` (default: the weights shipped in ``otca/assets``).

    Only the transformer is trainable. A missing or corrupt file is a one-line error naming it.
    """
    from diffusers import FluxTransformer2DModel

    root = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    transformer = _from_json(root / FLUX_CONFIG, lambda d: FluxTransformer2DModel.from_config(d["transformer"]))
    text_encoder = _from_json(root / TEXT_CONFIG, lambda d: DigitsTextEncoder(TextEncoderConfig.from_dict(d)))
    _load_weights(transformer, root / FLUX_WEIGHTS)
    _load_weights(text_encoder, root / TEXT_WEIGHTS)
    return digits_policy(
        transformer, text_encoder, true_cfg_scale=true_cfg_scale, negative_prompt=negative_prompt,
        device=device, dtype=dtype,
    )


class DigitsOptions(AdapterOptions):
    """``model.options`` of model kind ``digits-flux`` (weights: ``model.path``, a folder of the four asset files
    written by ``otca pretrain``; unset for the shipped ones)."""

    true_cfg_scale: float = Field(DEFAULT_TRUE_CFG, ge=1)
    """Real classifier-free guidance against negative_prompt, on when > 1; off by default (see DEFAULT_TRUE_CFG)."""
    negative_prompt: str = ""
    """The unconditional prompt of classifier-free guidance."""
    tiny: bool = False
    """Freshly initialised (untrained) digits networks instead of pretrained weights; model.path must be unset."""
    seed: int = 0
    """Seed of the fresh networks with tiny (the global RNG is left untouched)."""


def build_digits_flux(cfg: ModelConfig, device: torch.device) -> FluxPolicy:
    """Model kind ``digits-flux``: the digits policy from ``cfg.path`` (default: the shipped weights), or fresh
    networks with ``options.tiny``; the transformer in ``cfg.dtype`` with ``cfg.gradient_checkpointing`` and
    ``cfg.lora`` (:func:`~otca.models.prepare.prepare_denoisers`), the text encoder frozen in fp32."""
    opts = parse_options(DigitsOptions, cfg.options)
    tiny_and_path_exclusive(cfg, opts.tiny)
    dtype = getattr(torch, cfg.dtype)
    common = dict(true_cfg_scale=opts.true_cfg_scale, negative_prompt=opts.negative_prompt, dtype=dtype)
    if opts.tiny:
        policy = digits_policy(*digits_networks(opts.seed), **common)
    else:
        policy = load_digits_policy(cfg.path, **common)
    prepare_denoisers(policy.denoisers(), cfg)
    return policy.to(device)
