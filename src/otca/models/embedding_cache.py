"""Precomputed prompt embeddings: written once by a policy's text encoders, read back in place of them
(``model.options.embeddings``), so a run need not load the encoders at all."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

EMBEDDINGS_FORMAT = "otca-prompt-embeddings"


def save_prompt_embeddings(
    path: str | Path, model: str, prompts: Sequence[str], embeddings: dict[str, torch.Tensor]
) -> Path:
    """Write the text embeddings of ``prompts`` (each ``[N, ...]``, row i for prompt i) to a safetensors file.

    The prompt list and the model family go in the file's metadata, so that a cache written for one model
    family or one prompt set is never read as another.
    """
    from safetensors.torch import save_file

    prompts = list(prompts)
    if len(set(prompts)) != len(prompts):
        raise ValueError("save_prompt_embeddings: prompts must be unique")
    for k, t in embeddings.items():
        if len(t) != len(prompts):
            raise ValueError(f"save_prompt_embeddings: '{k}' has {len(t)} rows for {len(prompts)} prompts")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": EMBEDDINGS_FORMAT, "model": model, "prompts": json.dumps(prompts)}
    save_file({k: t.detach().contiguous().cpu() for k, t in embeddings.items()}, out, metadata=meta)
    return out


class PromptEmbeddingCache:
    """Text embeddings read from a file of :func:`save_prompt_embeddings`: ``cache(prompts) -> {field: [B, ...]}``.

    It stands in for the text encoders (same call contract), so a run need not load them at all. Only the
    asked rows are read from the file on each call: a cache of many long T5 sequences never sits in memory.
    """

    def __init__(self, path: str | Path, model: str, fields: Sequence[str]):
        from safetensors import safe_open

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"model '{model}': model.options.embeddings file '{self.path}' not found")
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != EMBEDDINGS_FORMAT or meta.get("model") != model:
                raise ValueError(
                    f"embeddings file '{self.path}': expected {EMBEDDINGS_FORMAT} written for model '{model}', got "
                    f"format {meta.get('format')!r}, model {meta.get('model')!r}"
                )
            missing = sorted(set(fields) - set(f.keys()))
            if missing:
                raise ValueError(f"embeddings file '{self.path}': missing tensors {missing} for model '{model}'")
        self.fields = tuple(fields)
        self.index = {p: i for i, p in enumerate(json.loads(meta["prompts"]))}

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = []
        for p in prompts:
            if p not in self.index:
                raise KeyError(
                    f"embeddings file '{self.path}' has no entry for prompt {p!r} ({len(self.index)} prompts cached; "
                    f"write the file again with these prompts)"
                )
            rows.append(self.index[p])
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return {k: torch.cat([f.get_slice(k)[i : i + 1] for i in rows]) for k in self.fields}  # {field: [B, ...]}

