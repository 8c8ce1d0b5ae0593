"""The typed options of a reward (a config's ``rewards[i].options``): one base that every reward extends.

``build_reward(name, **options)`` validates the options through the reward's class before anything is built,
so a misspelt or ill-typed option is a one-line error naming the reward and the option, as an unknown
``model.options`` key is for a generator. Fields a reward has no use for are listed in its ``unused``: setting
one is an error too, never silently ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

OptionsT = TypeVar("OptionsT", bound="RewardOptions")


class RewardOptionError(ValueError):
    """A reward option that does not fit the reward's options class (one line, names the reward and option)."""


class RewardOptions(BaseModel):
    """What every reward can be told; a reward's options class adds its own fields (weight paths, ...)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    unused: ClassVar[tuple[str, ...]] = ()
    """Base fields this reward has no use for (a weight-free reward has no device or backbone)."""

    device: str = "cpu"
    """Device the reward model runs on (scores come back as float32 on CPU)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype of the reward model's weights; preprocessing and the returned scores are float32."""
    batch_size: int = Field(default=16, ge=1)
    """Samples scored per forward pass of the reward model."""
    tiny: bool = False
    """Build a tiny random backbone of the same architecture in-process instead of loading weights (a test/demo
    twin whose scores mean nothing; no files). Weight paths must then be unset."""
    seed: int = 0
    """Seed of the tiny random backbone (the global RNG is left untouched)."""
    frames: bool = False
    """Also score videos ``[B, C, F, H, W]`` with an image reward, as the mean over frames."""


def parse_reward_options(reward: str, schema: type[OptionsT], options: dict[str, Any]) -> OptionsT:
    """``options`` validated against ``schema``; a bad key or value is a one-line :class:`RewardOptionError`."""
    try:
        opts = schema.model_validate(dict(options))
    except ValidationError as e:
        err = e.errors()[0]
        option = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            raise RewardOptionError(f"reward '{reward}': unknown option '{option}'") from None
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise RewardOptionError(
            f"reward '{reward}': option '{option}': {err['msg']} (got {err.get('input')!r}){more}"
        ) from None
    unused = [k for k in schema.unused if k in opts.model_fields_set]
    if unused:
        raise RewardOptionError(f"reward '{reward}': option '{unused[0]}' does not apply to this reward")
    return opts


class WeightFreeOptions(RewardOptions):
    """Options of a reward computed by a formula, without a model or weights: none of the base fields apply."""

    unused = ("device", "dtype", "batch_size", "tiny", "seed", "frames")
