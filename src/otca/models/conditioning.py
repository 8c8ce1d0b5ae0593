"""Text conditioning of the diffusers adapters: the sliceable batch of embeddings (:class:`BatchedCond`) and the
frozen text encoders that produce it (:class:`FrozenTextEncoders`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from otca.models.prepare import freeze

C = TypeVar("C", bound="BatchedCond")

# prompts -> text embeddings {field: [B, ...]}: frozen text encoders or a precomputed embedding cache.
TextFn = Callable[[list[str]], dict[str, torch.Tensor]]


class BatchedCond:
    """Mixin for a frozen dataclass of text conditioning whose tensor fields are all batched along dim 0.

    A field ``neg_<name>`` holds the negative-prompt (unconditional) counterpart of ``<name>``; the negatives are
    present all together or not at all (only when the policy runs classifier-free guidance). Index it along the
    batch (``cond[2:4]``, ``cond[idx_tensor]``; an int keeps the batch dimension) to cut micro-batches.
    """

    # Set by @dataclass on each subclass; declared so that mypy sees a dataclass in ``dataclasses.fields``/``replace``.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        name = type(self).__name__
        sizes = {f: len(t) for f, t in self._tensors().items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{name}: every field must have the same batch size, got {sizes}")
        neg = [f for f in self.field_names() if getattr(self, "neg_" + f) is not None]
        if neg and len(neg) != len(self.field_names()):
            raise ValueError(f"{name}: the negative fields must be given all together, got only {neg}")
        for f in neg:
            pos, negt = getattr(self, f), getattr(self, "neg_" + f)
            if pos.shape != negt.shape:
                raise ValueError(
                    f"{name}: neg_{f} {tuple(negt.shape)} must match {f} {tuple(pos.shape)} "
                    "(both passes run as one batch)"
                )

    @classmethod
    def field_names(cls) -> list[str]:
        """The positive (prompt) field names: the fields of a text encoder's output and of an embedding cache."""
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("neg_")]

    @classmethod
    def build(cls: type[C], positive: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None = None) -> C:
        """The conditioning from text embeddings ``{field: [B, ...]}`` and optional negatives of the same shapes."""
        neg = {"neg_" + k: v for k, v in (negative or {}).items()}
        return cls(**positive, **neg)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def positive(self) -> dict[str, torch.Tensor]:
        """The prompt embeddings by field name."""
        return {f: getattr(self, f) for f in self.field_names()}

    def negative(self) -> dict[str, torch.Tensor] | None:
        """The negative-prompt embeddings by (positive) field name, or None without CFG."""
        if getattr(self, "neg_" + self.field_names()[0]) is None:
            return None
        return {f: getattr(self, "neg_" + f) for f in self.field_names()}

    def __len__(self) -> int:
        return len(next(iter(self._tensors().values())))

    def __getitem__(self: C, idx: int | slice | Sequence[int] | torch.Tensor) -> C:
        """The sub-batch ``idx``."""
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        return dataclasses.replace(self, **{f: t[idx] for f, t in self._tensors().items()})

    def to(self: C, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> C:
        """The same conditioning on ``device`` and in ``dtype`` (None keeps each as it is)."""
        return dataclasses.replace(self, **{f: t.to(device=device, dtype=dtype) for f, t in self._tensors().items()})



class FrozenTextEncoders(torch.nn.Module):
    """A pipeline's frozen text encoders with their tokenizers; a subclass's ``forward`` maps prompts to the
    embeddings ``{field: [B, ...]}``.

    ``text_parts`` (set by the subclass) names the pipeline folders ``(encoder, tokenizer, encoder_2, ...)``; the
    i-th encoder becomes the submodule of its folder's name (so state-dict keys follow the folders), its tokenizer
    ``tokenizers[i]``. ``max_sequence_length`` is the token count of the long (T5-family) encoder.
    """

    text_parts: tuple[str, ...]

    def __init__(self, encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any], *, max_sequence_length: int):
        super().__init__()
        names = self.text_parts[0::2]
        if not len(encoders) == len(tokenizers) == len(names):
            raise ValueError(
                f"{type(self).__name__}: expected {len(names)} encoders and tokenizers ({', '.join(names)}), "
                f"got {len(encoders)} and {len(tokenizers)}"
            )
        for name, encoder in zip(names, encoders, strict=True):
            self.add_module(name, freeze(encoder))
        self.tokenizers = tuple(tokenizers)
        self.max_sequence_length = max_sequence_length

    @staticmethod
    def _device(encoder: torch.nn.Module) -> torch.device:
        """Where ``encoder``'s inputs go."""
        return next(encoder.parameters()).device

