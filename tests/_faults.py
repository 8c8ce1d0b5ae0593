"""The fault-injection harness: real ``otca train`` processes killed with SIGKILL (at a fault point named by
``OTCA_FAULT_AT``, or after a random delay), resumed with ``otca train --resume``, and compared with an
uninterrupted run: weights, EMA, optimizer state, metrics.jsonl, eval.jsonl and summary.json, wall-clock values
aside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from otca.checkpoint import latest_checkpoint

# a run of seconds that still passes every phase: 3 iterations, a checkpoint after each, an evaluation in the
# loop (after iteration 2), two optimizer steps per iteration (micro-batches [0,2) | [2,4) [4,6)), EMA and a KL term
TINY_RUN = [
    "train.iterations=3",
    "train.prompts_per_iter=2",
    "train.group_size=3",
    "train.micro_batch=2",
    "train.updates_per_iter=2",
    "train.ema_decay=0.9",
    "train.kl_coef=0.05",
    "sampler.num_steps=3",
    "sampler.eval_steps=2",
    "eval.samples_per_prompt=1",
    "eval.every=2",
    "eval.metrics=null",
    "prompts.eval=digits:eval",
    "checkpoint_every=1",
    "plots=false",
    "progress=false",
]


def otca_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OTCA_FAULT_AT"}
    env["OMP_NUM_THREADS"] = "1"
    if fault is not None:
        env["OTCA_FAULT_AT"] = fault
    return env


def _args(run_dir: Path, extra: tuple[str, ...], resume: bool) -> list[str]:
    return ["--resume", str(run_dir), *extra] if resume else [*TINY_RUN, f"out_dir={run_dir}", *extra]


def fresh_train(run_dir: Path, *extra: str, fault: str | None = None, resume: bool = False,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m otca train`` (or ``... --resume run_dir``) in a new interpreter (~30 s of start-up here)."""
    return subprocess.run([sys.executable, "-m", "otca", "train", *_args(run_dir, extra, resume)],
                          env=otca_env(fault), timeout=timeout, capture_output=True, text=True)


class TrainServer:
    """``otca train`` runs, each in its own process forked from a warm server (``tests/_train_server.py``)."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.n = 0
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_train_server.py"))],
                                     env=otca_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self._line()) == {"ready": True}

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the train server died"
        return line

    def train(self, run_dir: Path, *extra: str, fault: str | None = None, resume: bool = False,
              kill_after: float | None = None) -> tuple[int, str, float]:
        """(exit code, -9 when killed; stderr; seconds) of ``otca train`` [``--resume run_dir``] ``extra``."""
        assert self.proc.stdin is not None
        self.n += 1
        err = self.logs / f"run-{self.n}.stderr"
        req = {"args": _args(run_dir, extra, resume), "fault": fault, "stderr": str(err), "kill_after": kill_after}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._line())
        return reply["code"], err.read_text(), reply["seconds"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------------- comparison


def _strip(value: Any) -> Any:
    """Drop wall-clock values (``wall_seconds``, ``time/*``) at any depth."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "wall_seconds" and not str(k).startswith("time/")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _same_tree(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(ref: Path, run: Path) -> None:
    """``run`` ended exactly as ``ref``: final weights, EMA and optimizer state bit for bit, every checkpoint's
    loop state, and the logs and summary apart from wall-clock values; no temporary folder left behind."""
    a, b = latest_checkpoint(ref, log=lambda _: None), latest_checkpoint(run, log=lambda _: None)
    assert a.name == b.name
    for f in ("trainable.safetensors", "ema.safetensors"):
        assert (a / f).is_file() == (b / f).is_file(), f
        if (a / f).is_file():
            _same_tree(load_file(str(a / f)), load_file(str(b / f)), f)
    _same_tree(torch.load(a / "optimizer.pt", weights_only=True), torch.load(b / "optimizer.pt", weights_only=True),
               "optimizer")
    names = sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names
    for name in names:
        if name.startswith("iter-"):
            sa, sb = (json.loads((d / "checkpoints" / name / "state.json").read_text()) for d in (ref, run))
            for s in (sa, sb):
                s.pop("log_positions")  # byte offsets: the rows' time values have different lengths
            _same_tree(_strip(sa), _strip(sb), f"{name}/state.json")
    for f in ("metrics.jsonl", "eval.jsonl"):
        ra, rb = _strip(_jsonl(ref / f)), _strip(_jsonl(run / f))
        assert ra and ra == rb, f
    sa, sb = (_strip(json.loads((d / "summary.json").read_text())) for d in (ref, run))
    assert sa == sb
