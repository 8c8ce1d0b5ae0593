"""Checkpoints: trainable weights (and their EMA) as safetensors, optimizer and loop state beside them.

A checkpoint is written to a temporary folder and renamed into place, and the ``latest`` pointer is
replaced atomically, so an interrupted write never leaves a half checkpoint that ``--resume`` would read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
EMA = "ema.safetensors"
OPTIM = "optimizer.pt"
STATE = "state.json"


class CheckpointError(RuntimeError):
    pass


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoints/iter-XXXXXX`` (weights after ``iteration`` iterations) and point ``latest`` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter-{iteration:06d}"
    final, tmp = root / name, root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(tmp / EMA))
    torch.save(optimizer_state, tmp / OPTIM)
    (tmp / STATE).write_text(json.dumps({"iteration": iteration, **state}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", name)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        raise CheckpointError(f"no checkpoint to resume from in '{root}' (expected the file '{pointer}')")
    ckpt = root / pointer.read_text().strip()
    if not (ckpt / STATE).is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' is incomplete (missing {STATE})")
    return ckpt


def load_checkpoint(ckpt: Path) -> dict[str, Any]:
    """``{'weights', 'ema' (or None), 'optimizer', 'state'}`` of a checkpoint folder."""
    ckpt = Path(ckpt)
    for f in (WEIGHTS, OPTIM, STATE):
        if not (ckpt / f).is_file():
            raise CheckpointError(f"checkpoint '{ckpt}': missing file '{f}'")
    return {
        "weights": load_file(str(ckpt / WEIGHTS)),
        "ema": load_file(str(ckpt / EMA)) if (ckpt / EMA).is_file() else None,
        "optimizer": torch.load(ckpt / OPTIM, weights_only=True),
        "state": json.loads((ckpt / STATE).read_text()),
    }
