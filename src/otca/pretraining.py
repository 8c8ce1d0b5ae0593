"""Pretrainers by world: ``otca pretrain --world NAME`` rebuilds a world's shipped weights from scratch.

A world registers a function ``(out_dir, seed) -> [record, ...]`` that trains its networks, writes their asset
files to ``out_dir`` and returns what each training did (steps, loss, wall time, ...), e.g.::

    @register_pretrainer("digits")
    def pretrain_digits(out_dir: Path, seed: int) -> list[dict]: ...

Run single-threaded (the CLI's default): the thread count changes float summation order, so only then is a
rebuild bit-identical to the shipped weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from otca.registry import Registry

Pretrainer = Callable[[Path, int], list[dict[str, Any]]]
PRETRAINERS: Registry[Pretrainer] = Registry("pretrainer")


def register_pretrainer(name: str) -> Callable[[Pretrainer], Pretrainer]:
    """Decorator for a world's pretrainer ``(out_dir, seed) -> [record, ...]``."""
    return PRETRAINERS.register(name)


def pretrainer_names() -> list[str]:
    return PRETRAINERS.names()


def pretrain_world(name: str, out_dir: str | Path, seed: int = 0) -> list[dict[str, Any]]:
    """Run the pretrainer of world ``name`` into ``out_dir`` (created); an unknown name lists the known ones."""
    fn = PRETRAINERS.get(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return fn(out, seed)
