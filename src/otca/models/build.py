"""Building a diffusers ``model.kind``: the local model directory, the options, the components (weights or a
tiny twin), text encoders or an embedding cache, then :func:`~otca.models.prepare.prepare_denoisers` and the
device; and writing components back in the layout the loaders read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from otca.models.conditioning import FrozenTextEncoders, TextFn
from otca.models.embedding_cache import PromptEmbeddingCache
from otca.models.options import DiffusersOptions, parse_options
from otca.models.prepare import cast_module, prepare_denoisers

if TYPE_CHECKING:
    from otca.config import ModelConfig
    from otca.models.diffusers_policy import DiffusersPolicy

P = TypeVar("P", bound="DiffusersPolicy")
D = TypeVar("D", bound=DiffusersOptions)


def model_dir(cfg: ModelConfig) -> Path:
    """``cfg.path`` as an existing local directory, or a one-line error naming the model kind and the path."""
    if cfg.path is None:
        raise FileNotFoundError(
            f"model '{cfg.kind}': model.path is not set (expected a local diffusers model directory, "
            f"or model.options.tiny: true for random tiny weights)"
        )
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model '{cfg.kind}': model.path '{root}' is not a directory")
    return root


def subfolder(root: Path, name: str, kind: str) -> Path:
    """``root / name``, which must be a directory of the diffusers layout (one-line error otherwise)."""
    path = root / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"model '{kind}': '{root}' has no '{name}' folder (expected a diffusers model directory)"
        )
    return path


def tiny_and_path_exclusive(cfg: ModelConfig, tiny: bool) -> None:
    """Tiny random weights and a model directory exclude each other (one-line error naming both)."""
    if tiny and cfg.path is not None:
        raise ValueError(
            f"model '{cfg.kind}': model.options.tiny builds random weights in-process; leave model.path unset "
            f"(got '{cfg.path}')"
        )



@dataclasses.dataclass(frozen=True)
class BuildInputs(Generic[D]):
    """What an adapter assembles its policy from: the validated options and the components by diffusers
    sub-folder name, with how the build read them (:func:`build_diffusers_policy`; tests build it directly)."""

    opts: D
    parts: dict[str, Any]
    dtype: torch.dtype = torch.float32  # cfg.dtype: the denoisers and text encoders
    vae_dtype: torch.dtype = torch.float32
    root: Path | None = None  # the model directory; None for tiny random weights
    cache: PromptEmbeddingCache | None = None  # None: the text encoders are in parts

    def text(self, encoder_cls: type[FrozenTextEncoders], max_sequence_length: int) -> TextFn:
        """The policy's prompt-embedding function: the cache when given, else ``encoder_cls`` on its
        ``text_parts`` of ``parts`` (the encoders cast to ``dtype``)."""
        if self.cache is not None:
            return self.cache
        encoders = [cast_module(self.parts[k], self.dtype) for k in encoder_cls.text_parts[0::2]]
        tokenizers = [self.parts[k] for k in encoder_cls.text_parts[1::2]]
        return encoder_cls(encoders, tokenizers, max_sequence_length=max_sequence_length)


def build_diffusers_policy(
    cfg: ModelConfig,
    device: torch.device,
    policy_cls: type[DiffusersPolicy],
    schema: type[D],
    tiny: Callable[..., dict[str, Any]],
    assemble: Callable[[BuildInputs[D]], P],
) -> P:
    """Every diffusers ``model.kind`` builder: ``cfg.options`` parsed with ``schema``; the parts from
    ``tiny(seed, text=...)`` or ``policy_cls.load_components`` at ``cfg.path``, text encoders only without an
    embedding cache (written for ``policy_cls.kind`` with the fields of ``policy_cls.cond_type``); the policy
    from ``assemble``; ``cfg.gradient_checkpointing`` and ``cfg.lora`` on its denoisers
    (:func:`prepare_denoisers`); the policy on ``device``."""
    opts = parse_options(schema, cfg.options)
    tiny_and_path_exclusive(cfg, opts.tiny)
    dtype, vae_dtype = getattr(torch, cfg.dtype), getattr(torch, opts.vae_dtype)
    root = None if opts.tiny else model_dir(cfg)
    # The cache is read before the weights: a bad file fails before gigabytes load.
    cache = None
    if opts.embeddings is not None:
        cache = PromptEmbeddingCache(opts.embeddings, policy_cls.kind, policy_cls.cond_type.field_names())
    if root is None:
        parts = tiny(opts.seed, text=cache is None)
    else:
        parts = policy_cls.load_components(root, text=cache is None, dtype=dtype, vae_dtype=vae_dtype)
    policy = assemble(BuildInputs(opts, parts, dtype, vae_dtype, root, cache))
    prepare_denoisers(policy.denoisers(), cfg)
    return policy.to(device)


def save_components(components: dict[str, Any], out_dir: str | Path) -> Path:
    """Write each component (a diffusers/transformers model or tokenizer) to ``out_dir/<name>`` with
    ``save_pretrained``: the directory layout the adapters' loaders read."""
    out = Path(out_dir)
    for name, component in components.items():
        if component is not None:
            component.save_pretrained(out / name)
    return out
