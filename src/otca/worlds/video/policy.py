"""The video world's generator: a tiny diffusers ``WanTransformer3DModel`` behind the real Wan adapter.

The policy is :class:`~otca.models.wan.WanPolicy` itself, with the exact :class:`VideoPixelCodec` as its VAE and
the tiny :class:`VideoTextEncoder` as its text encoder: latents ``[B, 4, F, 8, 8]``, timestep ``1000 * sigma``,
classifier-free guidance against the empty prompt inside ``velocity``, pixels ``[B, 1, F, 16, 16]`` from
``decode``. The shipped weights live in ``src/otca/assets``: ``video_wan.{safetensors,json}`` (the transformer
with its diffusers config and how it was pretrained) and ``video_text.{safetensors,json}``.
:func:`save_video_generator` writes exactly what :func:`load_video_policy` reads.

Model kind ``video-wan`` (:func:`build_video_wan`) goes through the same options parsing and the same preparation
of the trained network (gradient checkpointing, LoRA kept in fp32) as the diffusers kinds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from pydantic import Field

from otca.models.build import tiny_and_path_exclusive
from otca.models.options import AdapterOptions, parse_options
from otca.models.prepare import prepare_denoisers
from otca.worlds.video.codec import VideoPixelCodec
from otca.worlds.video.data import CANVAS, FRAMES
from otca.worlds.video.text import VideoTextConfig, VideoTextEncoder, prompt_vocabulary

if TYPE_CHECKING:
    from otca.config import ModelConfig
    from otca.models.wan import WanPolicy

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
WAN_WEIGHTS, WAN_CONFIG = "video_wan.safetensors", "video_wan.json"
TEXT_WEIGHTS, TEXT_CONFIG = "video_text.safetensors", "video_text.json"
T = TypeVar("T")

# Guidance of the base policy (rollout and training); see pretrain.py's record for the judges at other scales.
DEFAULT_GUIDANCE = 2.0

# WanTransformer3DModel at ~240k parameters: 4 x 4 x 4 tokens (patches of 2 x 2 x 2 latents of 4 channels:
# 4 x 4 pixels of two frames; half the tokens of 1 x 2 x 2 patches, half the CPU time per step), 2 heads of
# 32 dims (rope: 12 temporal + 10 + 10 spatial), 4 blocks.
TINY_WAN_CONFIG = dict(
    patch_size=(2, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=128,
    num_layers=4,
    rope_max_seq_len=32,
)


def default_text_config() -> VideoTextConfig:
    """The text encoder matching :data:`TINY_WAN_CONFIG` (width = text_dim)."""
    return VideoTextConfig(vocab=prompt_vocabulary(), width=int(TINY_WAN_CONFIG["text_dim"]))  # type: ignore[call-overload]


def video_networks(seed: int = 0) -> tuple[torch.nn.Module, VideoTextEncoder]:
    """A freshly initialised tiny Wan transformer and text encoder (seeded; the global RNG is left untouched)."""
    from diffusers import WanTransformer3DModel  # lazy: diffusers costs seconds to import

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer: torch.nn.Module = WanTransformer3DModel(**TINY_WAN_CONFIG)  # type: ignore[no-untyped-call, assignment]
        return transformer, VideoTextEncoder(default_text_config())


def video_policy(
    transformer: torch.nn.Module,
    text_encoder: VideoTextEncoder,
    *,
    guidance_scale: float = DEFAULT_GUIDANCE,
    negative_prompt: str = "",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanPolicy:
    """The video networks behind the Wan adapter, with the exact codec; the text encoder is frozen."""
    from otca.models.wan import WanPolicy

    if next(transformer.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        transformer = transformer.to(dtype=dtype)
    text_encoder.requires_grad_(False).eval()
    policy = WanPolicy(
        transformer, VideoPixelCodec(), text_encoder,
        height=CANVAS, width=CANVAS, num_frames=FRAMES, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
    )
    return policy.to(device)


def save_video_generator(
    out_dir: str | Path, transformer: torch.nn.Module, text_encoder: VideoTextEncoder, pretraining: dict[str, Any]
) -> list[Path]:
    """Write the four asset files (weights as safetensors, configs as JSON) to ``out_dir``; returns their paths."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / WAN_WEIGHTS, out / WAN_CONFIG, out / TEXT_WEIGHTS, out / TEXT_CONFIG]
    save_file({k: v.detach().float().contiguous() for k, v in transformer.state_dict().items()}, files[0])
    items = dict(transformer.config).items()  # type: ignore[arg-type]
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in items}
    files[1].write_text(json.dumps({"transformer": config, "pretraining": pretraining}, indent=1))
    save_file({k: v.detach().float().contiguous() for k, v in text_encoder.state_dict().items()}, files[2])
    files[3].write_text(json.dumps(text_encoder.config.to_dict(), indent=1))
    return files


def _from_json(path: Path, build: Callable[[dict[str, Any]], T]) -> T:
    """``build(the JSON at path)``; a missing, unreadable or unfit file is a one-line error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"video generator: missing {path} (create it with "
                                f"`otca pretrain --world video`)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"video generator: {path} is not valid JSON ({e})") from None
    try:
        return build(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"video generator: {path} is not a valid config ({type(e).__name__}: {e})") from None


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"video generator: missing {path} (create it with "
                                f"`otca pretrain --world video`)")
    try:
        module.load_state_dict(load_file(path), strict=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"video generator: {path} is corrupt or does not match its JSON config ({first_line})"
                         ) from None


def load_video_networks(assets_dir: str | Path | None = None) -> tuple[torch.nn.Module, VideoTextEncoder]:
    """The pretrained transformer and text encoder from ``assets_dir`` (default: the shipped ``otca/assets``)."""
    from diffusers import WanTransformer3DModel

    root = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    transformer = _from_json(root / WAN_CONFIG, lambda d: WanTransformer3DModel.from_config(d["transformer"]))  # type: ignore[no-untyped-call]
    text_encoder = _from_json(root / TEXT_CONFIG, lambda d: VideoTextEncoder(VideoTextConfig.from_dict(d)))
    _load_weights(transformer, root / WAN_WEIGHTS)
    _load_weights(text_encoder, root / TEXT_WEIGHTS)
    return transformer, text_encoder


def load_video_policy(
    assets_dir: str | Path | None = None,
    *,
    guidance_scale: float = DEFAULT_GUIDANCE,
    negative_prompt: str = "",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanPolicy:
    """The pretrained video policy (only the transformer trainable); a missing or corrupt file is a one-line
    error naming it."""
    transformer, text_encoder = load_video_networks(assets_dir)
    return video_policy(transformer, text_encoder, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                        device=device, dtype=dtype)


def build_video_policy(
    random_init: bool = True,
    *,
    seed: int = 0,
    guidance_scale: float = DEFAULT_GUIDANCE,
    negative_prompt: str = "",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanPolicy:
    """The video policy with freshly initialised weights (tests); ``random_init=False`` loads the shipped ones."""
    options = dict(guidance_scale=guidance_scale, negative_prompt=negative_prompt, device=device, dtype=dtype)
    if not random_init:
        return load_video_policy(**options)  # type: ignore[arg-type]
    return video_policy(*video_networks(seed), **options)  # type: ignore[arg-type]


class VideoOptions(AdapterOptions):
    """``model.options`` of model kind ``video-wan`` (weights: ``model.path``, a folder of the four asset files
    written by ``otca pretrain --world video``; unset for the shipped ones)."""

    guidance_scale: float = Field(DEFAULT_GUIDANCE, ge=1)
    """Classifier-free guidance against negative_prompt inside the Wan adapter's velocity, on when > 1."""
    negative_prompt: str = ""
    """The unconditional prompt of classifier-free guidance."""
    tiny: bool = False
    """Freshly initialised (untrained) video networks instead of pretrained weights; model.path must be unset."""
    seed: int = 0
    """Seed of the fresh networks with tiny (the global RNG is left untouched)."""


def build_video_wan(cfg: ModelConfig, device: torch.device) -> WanPolicy:
    """Model kind ``video-wan``: the video policy from ``cfg.path`` (default: the shipped weights), or fresh
    networks with ``options.tiny``; the transformer in ``cfg.dtype`` with ``cfg.gradient_checkpointing`` and
    ``cfg.lora`` (:func:`~otca.models.prepare.prepare_denoisers`, as for every kind), the text encoder frozen in
    fp32."""
    opts = parse_options(VideoOptions, cfg.options)
    tiny_and_path_exclusive(cfg, opts.tiny)
    dtype = getattr(torch, cfg.dtype)
    common: dict[str, Any] = dict(guidance_scale=opts.guidance_scale, negative_prompt=opts.negative_prompt, dtype=dtype)
    if opts.tiny:
        policy = video_policy(*video_networks(opts.seed), **common)
    else:
        policy = load_video_policy(cfg.path, **common)
    prepare_denoisers(policy.denoisers(), cfg)
    return policy.to(device)
