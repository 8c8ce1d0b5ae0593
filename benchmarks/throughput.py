"""Training samples per second with 1 and 2 processes (``torchrun``, gloo on CPU), and each process's peak RSS.

The global batch is the same for every process count (each process rolls out its share). Figures are
medians over ``--iters`` iterations after one warm-up: rollout-only samples/s and whole-iteration samples/s
(rollout, decode + rewards, credit, update).

    OMP_NUM_THREADS=1 python benchmarks/throughput.py [--procs 1,2] [--iters 5] [--threads 1]
                                                      [--config FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _bench import build_trainer, header, peak_rss_mb, train_iteration


def worker(args) -> None:
    """One torchrun process: time its iterations and write ``rank<r>.json`` to ``--out``."""
    torch.set_num_threads(args.threads)
    trainer = build_trainer(args.config, args.overrides)
    t = trainer.cfg.train
    n_global = t.prompts_per_iter * t.group_size
    rollout, whole = [], []
    for it in range(args.iters + 1):
        marks = [time.perf_counter()]
        train_iteration(trainer, it, lambda phase, marks=marks: marks.append(time.perf_counter()))
        if it:
            rollout.append(marks[1] - marks[0])
            whole.append(marks[-1] - marks[0])
    result = {"rank": trainer.info.rank, "world": trainer.info.world_size, "samples": n_global,
              "rollout_s": statistics.median(rollout), "iteration_s": statistics.median(whole),
              "peak_rss_mib": peak_rss_mb(), "header": header(trainer)}
    Path(args.out, f"rank{trainer.info.rank}.json").write_text(json.dumps(result))


def launch(procs: int, args, out: Path) -> list[dict]:
    with socket.socket() as sock:  # a free port, so concurrent runs on one machine do not clash
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", port,
           __file__, "--worker", "--out", str(out), "--iters", str(args.iters), "--threads", str(args.threads),
           *(["--config", args.config] if args.config else []), *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", default="1,2", help="process counts to measure")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--config", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for n in [int(v) for v in args.procs.split(",")]:
        ranks = launch(n, args, Path(tempfile.mkdtemp(prefix=f"otca-throughput-{n}-")))
        rows.append((n, ranks))
    print(rows[0][1][0]["header"])
    print(f"{'processes':>9}{'rollout samples/s':>19}{'iteration samples/s':>21}{'peak RSS per process (MiB)':>28}")
    for n, ranks in rows:
        slowest = max(ranks, key=lambda r: r["iteration_s"])  # the step ends when the slowest process ends
        rss = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in ranks)
        print(f"{n:>9}{slowest['samples'] / max(r['rollout_s'] for r in ranks):>19.1f}"
              f"{slowest['samples'] / slowest['iteration_s']:>21.1f}{rss:>28}")


if __name__ == "__main__":
    main()
