"""Checkpoints: trainable weights (and their EMA) as safetensors, optimizer and loop state beside them.

A checkpoint is never half-visible. It is written into ``iter-XXXXXX.tmp``, every file is fsynced, a ``complete``
marker listing each file's size and CRC-32 is written last, and only then is the folder renamed into place (and
the folder fsynced). :func:`latest_checkpoint` takes the newest folder whose marker and files agree, so a write
interrupted at any point (a kill, a full disk) leaves the previous checkpoint in use; a visible checkpoint whose
files were damaged afterwards is skipped with a logged line in favour of the one before it. The ``latest`` text
file is kept up to date for people and scripts; resuming does not depend on it.

A checkpoint may hold no weights (``weights=None``): the trainer writes one at iteration 0, after the evaluation
before training, so that "before" and the elapsed time survive a kill in the first iteration.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from otca.faults import fault_point

WEIGHTS = "trainable.safetensors"
EMA = "ema.safetensors"
OPTIM = "optimizer.pt"
STATE = "state.json"
COMPLETE = "complete"
_NAME = re.compile(r"^iter-(\d{6,})$")


class CheckpointError(RuntimeError):
    pass


class NoCheckpointError(CheckpointError):
    """The run directory has no checkpoint folder at all (as opposed to only damaged ones)."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    weights: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    state: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoints/iter-XXXXXX`` (the run after ``iteration`` iterations) atomically; see the module doc.

    ``weights=None``: a state-only checkpoint (no tensors). An ``OSError`` while writing (a full disk) removes the
    temporary folder and is re-raised as a :class:`CheckpointError` naming the checkpoint; the previous checkpoints
    are untouched.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter-{iteration:06d}"
    final, tmp = root / name, root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        writers: list[tuple[str, Callable[[Path], object]]] = []
        if weights is not None:
            writers.append((WEIGHTS, lambda p: save_file(_cpu(weights), str(p))))
        if ema is not None:
            writers.append((EMA, lambda p: save_file(_cpu(ema), str(p))))
        if optimizer_state is not None:
            writers.append((OPTIM, lambda p: torch.save(optimizer_state, p)))
        writers.append((STATE, lambda p: p.write_text(json.dumps({"iteration": iteration, **state}, indent=1))))
        for fname, write in writers:
            write(tmp / fname)
            _fsync(tmp / fname)
            fault_point(f"checkpoint-{fname.split('.')[0]}", iteration)
        marker = {f: {"bytes": (tmp / f).stat().st_size, "crc32": _crc32(tmp / f)} for f, _ in writers}
        _atomic_write_text(tmp / COMPLETE, json.dumps(marker, indent=1))
        _fsync(tmp)
        fault_point("checkpoint-complete", iteration)
        if final.exists():  # the same iteration written again: keep a usable copy until the new one is in place
            old = root / (name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(root)
        fault_point("checkpoint-rename", iteration)
        _atomic_write_text(root / "latest", name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint '{final}': could not write it ({e.strerror or e}); "
                              f"the previous checkpoint is still usable") from e
    return final


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def verify_checkpoint(ckpt: Path) -> str | None:
    """Why ``ckpt`` is unusable (no ``complete`` marker; a missing, truncated or altered file), or None."""
    ckpt = Path(ckpt)
    try:
        marker = json.loads((ckpt / COMPLETE).read_text())
    except FileNotFoundError:
        if all((ckpt / f).is_file() for f in (WEIGHTS, OPTIM, STATE)):
            return None  # written before the marker existed (renamed into place whole, like today's)
        return f"no '{COMPLETE}' marker (an interrupted write)"
    except (OSError, ValueError) as e:
        return f"unreadable '{COMPLETE}' marker ({e})"
    if STATE not in marker:
        return f"'{COMPLETE}' marker lists no {STATE}"
    for f, want in marker.items():
        p = ckpt / f
        if not p.is_file():
            return f"missing file '{f}'"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"file '{f}' has {size} bytes, {want['bytes']} were written (truncated)"
        if _crc32(p) != want["crc32"]:
            return f"file '{f}' does not match its CRC-32 (corrupt)"
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    """The visible checkpoint folders of a run, oldest first (complete or not)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(run_dir: Path, with_weights: bool = True, log: Callable[[str], None] | None = None) -> Path:
    """The newest sound checkpoint of ``run_dir`` (one with weights unless ``with_weights=False``).

    Damaged ones are skipped, each with a line to ``log`` (default: stderr); no sound one is a one-line
    :class:`CheckpointError` naming the newest damaged file, or :class:`NoCheckpointError` when there is none.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    root = Path(run_dir) / "checkpoints"
    first_problem = None
    for ckpt in reversed(checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            if not with_weights or (ckpt / WEIGHTS).is_file():
                return ckpt
            continue
        first_problem = first_problem or f"checkpoint '{ckpt}': {problem}"
        log(f"otca: skipping checkpoint '{ckpt}': {problem}")
    if first_problem is not None:
        raise CheckpointError(f"no usable checkpoint in '{root}'; the newest: {first_problem}")
    raise NoCheckpointError(f"no checkpoint to resume from in '{root}' (expected folders iter-XXXXXX)")


def load_checkpoint(ckpt: Path) -> dict[str, Any]:
    """``{'weights' (None for a state-only checkpoint), 'ema' (or None), 'optimizer' (or None), 'state'}``.

    A file that cannot be read is a :class:`CheckpointError` naming it.
    """
    ckpt = Path(ckpt)
    if not (ckpt / STATE).is_file():
        raise CheckpointError(f"checkpoint '{ckpt}': missing file '{STATE}'")

    def read(fname: str, how: Callable[[Path], Any]) -> Any:
        p = ckpt / fname
        if not p.is_file():
            return None
        try:
            return how(p)
        except Exception as e:  # safetensors, pickle and json errors alike: name the file
            raise CheckpointError(f"checkpoint file '{p}' is unreadable ({type(e).__name__}: {e})") from e

    return {
        "weights": read(WEIGHTS, lambda p: load_file(str(p))),
        "ema": read(EMA, lambda p: load_file(str(p))),
        "optimizer": read(OPTIM, lambda p: torch.load(p, weights_only=True)),
        "state": read(STATE, lambda p: json.loads(p.read_text())),
    }
