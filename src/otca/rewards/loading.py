"""Loading reward weights safely and offline: path checks, checkpoints, dtypes, option checks.

Contracts (see ``docs/design.md``):
  * every path check fails with a one-line ``FileNotFoundError`` naming the reward, the file and the option
    to set;
  * checkpoints load through safetensors or ``torch.load(weights_only=True)``; no remote code, ever;
  * heavy packages (transformers) are imported inside the functions that need them, so ``import
    otca.rewards`` and reward registration stay cheap;
  * ``options.tiny: true`` builds a tiny random backbone (:mod:`otca.testing.rewards`) in-process instead of
    loading files: a test/demo twin whose scores carry no meaning, so that configs run offline end to end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def option_hint(reward: str, option: str) -> str:
    """The tail of every path error: which option of which reward to set."""
    return f"(set options.{option} of reward '{reward}')"


def require_file(reward: str, path: str | Path | None, option: str = "path", what: str = "weights file") -> Path:
    """``path`` as a Path if it is an existing file, else a one-line FileNotFoundError naming everything."""
    if not path:
        raise FileNotFoundError(f"reward '{reward}': no {what} given {option_hint(reward, option)}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"reward '{reward}': {what} '{p}' not found {option_hint(reward, option)}")
    return p


def require_dir(
    reward: str, path: str | Path | None, option: str, what: str, needs: Sequence[str] = ()
) -> Path:
    """``path`` as a Path if it is a directory holding every file in ``needs``, else a one-line error."""
    if not path:
        raise FileNotFoundError(f"reward '{reward}': no {what} given {option_hint(reward, option)}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"reward '{reward}': {what} '{p}' not found {option_hint(reward, option)}")
    for name in needs:
        if not (p / name).is_file():
            raise FileNotFoundError(
                f"reward '{reward}': '{p / name}' not found: {what} '{p}' is incomplete {option_hint(reward, option)}"
            )
    return p


def load_checkpoint(reward: str, path: Path) -> Any:
    """A checkpoint's content, loaded safely on CPU: safetensors, or pickle restricted to tensors and containers.

    Some released files (the LAION aesthetic head) store tensors on ``cuda:0``: ``map_location`` fixes that.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an unsafe pickle is refused, never executed
            raise ValueError(
                f"reward '{reward}': '{path}' is not loadable with torch.load(weights_only=True): "
                f"{type(e).__name__}: {str(e).splitlines()[0]}"
            ) from e
    raise ValueError(
        f"reward '{reward}': '{path}' has suffix '{path.suffix}', expected .safetensors, .pt, .pth or .bin"
    )


def tensor_dict(reward: str, path: Path, obj: Any, key: str | None = None) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` mapping inside a loaded checkpoint (under ``key`` when given)."""
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"reward '{reward}': '{path}' has no '{key}' entry (found {found})")
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"reward '{reward}': '{path}' does not hold a {{name: tensor}} state dict")
    return dict(obj)


def torch_dtype(reward: str, name: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"reward '{reward}': dtype '{name}' unknown, expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def tiny_backbone(reward: str, tiny: bool, **paths: str | None) -> bool:
    """``tiny``, after checking that no weight path is set along with it (one-line error naming the option)."""
    given = [k for k, v in paths.items() if v]
    if tiny and given:
        raise ValueError(
            f"reward '{reward}': options.tiny builds a random backbone in-process; leave options.{given[0]} unset"
        )
    return tiny


def positive_int(reward: str, option: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"reward '{reward}': option {option}={value!r}, expected a positive integer")
    return value


def transformers_module():
    """transformers, imported on first use only (it costs seconds and is needed only by model rewards)."""
    import transformers

    return transformers


def square_side(reward: str, n_tokens: int, what: str) -> int:
    """sqrt of a square patch count (position-embedding rows minus the class token)."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"reward '{reward}': {what} has {n_tokens} patch positions, not a square grid")
    return side
