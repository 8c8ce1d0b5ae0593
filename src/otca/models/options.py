"""The typed ``model.options`` of the adapters: a strict pydantic base, the options every diffusers kind shares,
and their parsing into a one-line config error."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Opts = TypeVar("Opts", bound=BaseModel)


class AdapterOptions(BaseModel):
    """Base of every adapter's ``model.options`` schema: unknown keys are errors, every field is documented."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class DiffusersOptions(AdapterOptions):
    """The ``model.options`` every diffusers adapter takes; an adapter's schema adds its guidance and text length
    and documents its default size under ``resolution``."""

    tiny: bool = False
    """Build random tiny weights in-process (no files); model.path must then be unset."""
    seed: int = 0
    """Seed of the tiny random weights (the global RNG is left untouched)."""
    negative_prompt: str = ""
    """The unconditional prompt of classifier-free guidance."""
    resolution: int | None = Field(None, gt=0)
    """Square image (frame) side in pixels; default: the model's."""
    height: int | None = Field(None, gt=0)
    """Image (frame) height in pixels (overrides resolution)."""
    width: int | None = Field(None, gt=0)
    """Image (frame) width in pixels (overrides resolution)."""
    embeddings: str | None = None
    """Precomputed prompt embeddings (a file of the policy's save_prompt_embeddings); the text encoders are not
    loaded."""
    vae_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the VAE (decoding only)."""

    def size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` in pixels: each given side, else ``resolution``, else the default passed in."""
        return self.height or self.resolution or height, self.width or self.resolution or width


def parse_options(schema: type[Opts], options: dict[str, Any]) -> Opts:
    """``model.options`` validated against ``schema``; a bad key or value is a one-line error naming the field."""
    from otca.config import ConfigError, format_validation_error

    try:
        return schema.model_validate(dict(options))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "model.options")) from None

