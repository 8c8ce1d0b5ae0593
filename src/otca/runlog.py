"""A run directory's logs: ``metrics.jsonl`` (one row per iteration), ``eval.jsonl`` (one row per evaluation),
TensorBoard scalars beside them, ``summary.json``, and the per-iteration credit tensors of ``save_credit``.

The trainer writes through a :class:`RunLog` (only the main process writes; the others get one with
``write=False``); ``otca compare`` and ``otca analyze-credit`` read the same files back through it.
"""

from __future__ import annotations

import json
import os
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
        self._purge_step: int | None = None  # set by restore(): TensorBoard events from this step on are dropped

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

    def positions(self) -> dict[str, int]:
        """Byte lengths of metrics.jsonl and eval.jsonl now (0 for a file not written yet): what a checkpoint
        records so that :meth:`restore` puts the logs back exactly where they were."""
        return {name: (self.run_dir / name).stat().st_size if (self.run_dir / name).is_file() else 0
                for name in (METRICS, EVAL)}

    def restore(self, positions: dict[str, int], pending: dict[str, float] | None = None) -> None:
        """Cut metrics.jsonl and eval.jsonl back to ``positions`` (from :meth:`positions`), then append
        ``pending``, the row of the iteration that ended with the checkpoint (written after it). Whatever a killed
        run wrote later, half lines included, is gone; the logs then continue as an uninterrupted run's do."""
        if not self.write:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS, EVAL):
            path, size = self.run_dir / name, positions.get(name, 0)
            have = path.stat().st_size if path.is_file() else 0
            if have < size:
                raise ValueError(f"run log '{path}' has {have} bytes, the checkpoint recorded {size}: it was "
                                 f"shortened after the checkpoint, so the run cannot be resumed exactly")
            with open(path, "a") as f:
                f.truncate(size)
        last = [r["iteration"] for r in self.rows()[-1:]]
        self._purge_step = int(pending["iteration"]) if pending is not None else (int(last[0]) + 1 if last else 0)
        for r in self.eval_rows():  # kept evaluations that the TensorBoard purge would drop
            if r["iteration"] >= self._purge_step:
                for k, v in r.items():
                    if k != "iteration":
                        self._scalar(k if k.startswith("eval/") else f"eval/{k}", v, int(r["iteration"]))
        if pending is not None:
            self.append(pending)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json, replaced atomically (a kill leaves the old one or the new one, never half of one)."""
        if self.write:
            tmp = self.run_dir / (SUMMARY + ".tmp")
            tmp.write_text(json.dumps(summary, indent=1))
            os.replace(tmp, self.run_dir / SUMMARY)

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

            self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self._purge_step)
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
