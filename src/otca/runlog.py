"""A run directory's logs: ``metrics.jsonl`` (one row per iteration), ``eval.jsonl`` (one row per evaluation),
TensorBoard scalars beside them, ``summary.json``, and the per-iteration credit tensors of ``save_credit``.

The trainer writes through a :class:`RunLog` (only the main process writes; the others get one with
``write=False``); ``otca compare`` and ``otca analyze-credit`` read the same files back through it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
SUMMARY = "summary.json"


class RunLog:
    """Append-only JSON-lines logs of one run directory, mirrored to TensorBoard (``tb/``)."""

    def __init__(self, run_dir: str | Path, write: bool = True):
        self.run_dir = Path(run_dir)
        self.write = write
        self._writer: Any = None  # SummaryWriter, made on the first scalar

    # ------------------------------------------------------------------ writing

    def append(self, row: dict[str, float]) -> None:
        """One iteration's row (``row['iteration']`` is the step) to metrics.jsonl and TensorBoard."""
        if not self.write:
            return
        self._append_line(METRICS, row)
        for k, v in row.items():
            if k != "iteration":
                self._scalar(k, v, int(row["iteration"]))

    def append_eval(self, iteration: int, metrics: dict[str, float]) -> None:
        """An evaluation after ``iteration`` iterations to eval.jsonl and TensorBoard (under ``eval/``)."""
        if not self.write:
            return
        self._append_line(EVAL, {"iteration": iteration, **metrics})
        for k, v in metrics.items():
            self._scalar(k if k.startswith("eval/") else f"eval/{k}", v, iteration)

    def truncate(self, iteration: int) -> None:
        """Drop rows written after the checkpoint of ``iteration``: training rows of iterations ``>= iteration``,
        evaluations after ``iteration``; a resumed run's logs then equal an uninterrupted run's."""
        if not self.write:
            return
        for name, last in ((METRICS, iteration - 1), (EVAL, iteration)):
            path = self.run_dir / name
            if path.is_file():
                lines = [line for line in path.read_text().splitlines()
                         if line and json.loads(line)["iteration"] <= last]
                path.write_text("".join(line + "\n" for line in lines))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.write:
            (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=1))

    def write_credit(self, iteration: int, tensors: dict[str, torch.Tensor]) -> None:
        """``credit/iter-XXXXXX.safetensors``: one iteration's global credit inputs and outputs."""
        if not self.write:
            return
        from safetensors.torch import save_file

        (self.run_dir / "credit").mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "credit" / f"iter-{iteration:06d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ reading

    def rows(self) -> list[dict[str, float]]:
        """The rows of metrics.jsonl (empty when there is none yet)."""
        return self._read(METRICS)

    def eval_rows(self) -> list[dict[str, float]]:
        return self._read(EVAL)

    def summary(self) -> dict[str, Any] | None:
        path = self.run_dir / SUMMARY
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------ internals

    def _append_line(self, name: str, row: dict[str, Any]) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _scalar(self, key: str, value: float, step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        self._writer.add_scalar(key, value, step)

    def _read(self, name: str) -> list[dict[str, float]]:
        path = self.run_dir / name
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


@contextmanager
def timed(times: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``times['time/<phase>']`` (one iteration's phase timings)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        key = f"time/{phase}"
        times[key] = times.get(key, 0.0) + time.perf_counter() - start
