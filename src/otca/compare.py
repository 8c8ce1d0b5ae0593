"""``otca compare``: several credit schemes, several seeds, identical compute, one table in the paper's form.

Every run is the same config (iterations, prompts, group size G, sampler steps, eval) with only
``train.scheme`` and ``seed`` changed, so the schemes see the same prompts and initial noise at every
iteration of a seed. Runs go to ``OUT/<scheme>/seed-<s>/`` (full run directories); a finished run whose
config matches is reused, so an interrupted comparison picks up where it stopped. Named *variants* (a few
overrides each, e.g. a sampler or a ratio guard) add a row ``<scheme>+<variant>`` per scheme, with the same
seeds, prompts and iterations, in ``OUT/<scheme>+<variant>/seed-<s>/``. The outputs:

- ``table.md`` / ``table.csv``: one row per scheme (plus the base model), one column per training reward and
  eval-only metric after training, mean ± sample std over seeds (Table 1 of the paper), and wall seconds;
- ``runs.csv``: the same metrics for every single run;
- ``curves_iteration.png`` / ``curves_wall.png``: training reward per objective against the iteration and
  against training wall time (mean over seeds, band = ± std, trailing mean over ``smooth`` iterations);
- ``compare.json``: what was run and where (config, overrides, schemes, seeds, commit, versions).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from otca.plots import plot_reward_curves
from otca.runlog import RunLog

DEFAULT_SCHEMES = ("grpo", "flow-grpo", "tcd", "moca", "otca", "pcpo")
# two seeds x six schemes of the embedded default fit in 30 minutes on 2 CPU cores (docs/results.md)
DEFAULT_SEEDS = (0, 1)
# CI-sized runs (seconds each): few iterations, a small batch, few steps, a small eval with 2 samples per
# prompt (diversity needs 2). The user's overrides come after these and win.
QUICK_OVERRIDES = (
    "train.iterations=3",
    "train.prompts_per_iter=2",
    "train.group_size=4",
    "train.micro_batch=8",
    "sampler.num_steps=6",
    "sampler.eval_steps=6",
    "eval.samples_per_prompt=2",
    "plots=false",
)
BASE = "base"  # the table row of the untrained policy (eval before training)
_SET_BY_COMPARE = ("train.scheme", "seed", "out_dir", "progress")


_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: ``scheme`` with ``seed``, in ``run_dir``; a named ``variant`` adds its
    ``overrides`` after the shared ones."""

    scheme: str
    seed: int
    run_dir: Path
    variant: str | None = None
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The run's row in the table: the scheme, or ``<scheme>+<variant>``."""
        return self.scheme if self.variant is None else f"{self.scheme}+{self.variant}"


def parse_variants(text: str) -> dict[str, tuple[str, ...]]:
    """``"NAME=key=value [key=value ...];NAME=..."`` -> ``{NAME: (key=value, ...)}`` (``otca compare --variants``):
    variants are separated by ``;``, a variant's overrides by spaces."""
    out: dict[str, tuple[str, ...]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, _, rest = part.partition("=")
        name, overrides = name.strip(), tuple(rest.split())
        if not _VARIANT_NAME.fullmatch(name) or not overrides or not all("=" in o for o in overrides):
            raise ValueError(f"compare variant {part!r}: expected NAME=key=value [key=value ...], "
                             "e.g. window=sampler.sde_window.size=4")
        if name in out:
            raise ValueError(f"compare variants: {name!r} is named twice")
        out[name] = overrides
    return out


def plan_runs(
    schemes: Sequence[str], seeds: Sequence[int], out_dir: Path, variants: Mapping[str, Sequence[str]] | None = None
) -> list[RunSpec]:
    """Every (scheme, seed) pair, scheme-major, each scheme followed by its variants (``{name: overrides}``);
    unknown or repeated schemes / seeds, and badly named variants, are errors."""
    from otca.credit import get_scheme

    for name in schemes:
        get_scheme(name)  # raises, listing the known schemes
    for what, items in (("schemes", list(schemes)), ("seeds", list(seeds))):
        if not items or len(set(items)) != len(items):
            raise ValueError(f"compare {what}: expected a non-empty list without repeats, got {items}")
    rows: list[tuple[str | None, tuple[str, ...]]] = [(None, ())]
    for name, overrides in (variants or {}).items():
        if not _VARIANT_NAME.fullmatch(name) or not overrides:
            raise ValueError(f"compare variant {name!r}: expected a name of letters, digits, '_.-' and overrides")
        rows.append((name, tuple(overrides)))
    specs = []
    for scheme in schemes:
        for variant, extra in rows:
            row = Path(out_dir) / RunSpec(scheme, 0, Path(), variant).name
            specs += [RunSpec(scheme, int(seed), row / f"seed-{seed}", variant, extra) for seed in seeds]
    return specs


def run_config(config: str | None, overrides: Sequence[str], spec: RunSpec):
    """The run's ``RunConfig``: the shared config and overrides, the variant's overrides, then this run's scheme,
    seed and directory."""
    from otca.config import load_config

    for item in [*overrides, *spec.overrides]:
        key = item.split("=", 1)[0].strip()
        if key in _SET_BY_COMPARE:
            raise ValueError(f"compare override '{key}': set by compare itself (use --schemes, --seeds, --out)")
    return load_config(config, [*overrides, *spec.overrides, f"train.scheme={spec.scheme}", f"seed={spec.seed}",
                                f"out_dir={spec.run_dir}", "progress=false"])


def finished_summary(cfg) -> dict[str, Any] | None:
    """The summary of the finished run in ``cfg.out_dir`` if it was trained with exactly ``cfg``, else None."""
    from otca.config import dump_config

    saved = Path(cfg.out_dir) / "config.yaml"
    if saved.is_file() and saved.read_text() == dump_config(cfg):
        return RunLog(cfg.out_dir).summary()
    return None


def train_run(cfg, threads: int) -> dict[str, Any]:
    """Train one run (``cfg`` a RunConfig) from scratch with ``threads`` torch threads; returns its summary."""
    from otca.trainer import Trainer

    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a stale or half-written run would mix into metrics.jsonl
    torch.set_num_threads(threads)
    return Trainer(cfg, Path(cfg.out_dir)).train()


# ------------------------------------------------------------------ the table


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (``n - 1``) of the finite values; std is NaN with fewer than 2, both NaN with none."""
    v = [float(x) for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return m, s


def table_values(summaries: dict[RunSpec, dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``{row: {metric: [one value per seed]}}``: the base row (eval before training, from the first row's
    runs), then one row per scheme or variant (eval after training, and ``wall_seconds``)."""
    rows: dict[str, dict[str, list[float]]] = {}
    first = next(iter(summaries)).name
    for spec, s in summaries.items():
        if spec.name == first:
            for k, v in s["eval_before"].items():
                rows.setdefault(BASE, {}).setdefault(k, []).append(v)
        row = rows.setdefault(spec.name, {})
        for k, v in {**s["eval_after"], "wall_seconds": s["wall_seconds"]}.items():
            row.setdefault(k, []).append(v)
    return rows


def _columns(values: dict[str, dict[str, list[float]]]) -> list[str]:
    """Every metric of any row, in order of first appearance."""
    return list(dict.fromkeys(k for row in values.values() for k in row))


def format_markdown(values: dict[str, dict[str, list[float]]]) -> str:
    """Rows x metrics, cells ``mean ± std`` (4 significant digits; ``-`` where a row lacks the metric)."""
    cols = _columns(values)

    def cell(vals: list[float] | None) -> str:
        if not vals:
            return "-"
        m, s = mean_std(vals)
        return f"{m:.4g}" if math.isnan(s) else f"{m:.4g} ± {s:.2g}"

    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, row in values.items():
        n = max(len(v) for v in row.values())
        lines.append(f"| {name} | {n} | " + " | ".join(cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_csv(values: dict[str, dict[str, list[float]]], path: Path) -> None:
    """One row per method: ``method, seeds``, then ``<metric>`` (mean) and ``<metric>_std`` for every metric."""
    cols = _columns(values)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seeds", *[h for c in cols for h in (c, f"{c}_std")]])
        for name, row in values.items():
            stats = [x for c in cols for x in mean_std(row.get(c, []))]
            w.writerow([name, max(len(v) for v in row.values()), *stats])


def write_runs_csv(summaries: dict[RunSpec, dict[str, Any]], path: Path) -> None:
    """Every run's eval metrics after training and its wall seconds, one line per (scheme, seed)."""
    rows = {spec: {**s["eval_after"], "wall_seconds": s["wall_seconds"]} for spec, s in summaries.items()}
    cols = list(dict.fromkeys(k for row in rows.values() for k in row))  # ordered union
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scheme", "seed", *cols])
        for spec, row in rows.items():
            w.writerow([spec.name, spec.seed, *[row.get(c, "") for c in cols]])


# ------------------------------------------------------------------ the curves


def trailing_mean(values: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of the last ``window`` entries up to each position along the last dim ``[..., n] -> [..., n]``
    (shorter at the start)."""
    if window < 1:
        raise ValueError(f"smooth: expected a window >= 1, got {window}")
    c = torch.nn.functional.pad(values.double().cumsum(-1), (1, 0))  # [..., n+1]
    idx = torch.arange(values.shape[-1])  # [n]
    lo = (idx + 1 - window).clamp_min(0)  # [n]
    return (c[..., idx + 1] - c[..., lo]) / (idx + 1 - lo)  # [..., n]


def curve_arrays(specs: Sequence[RunSpec], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [seeds, n], wall [seeds, n])`` of one metric over the runs of one scheme, cut to the shortest."""
    runs = [RunLog(s.run_dir).rows() for s in specs]
    n = min(len(r) for r in runs)
    values = torch.tensor([[row[key] for row in r[:n]] for r in runs], dtype=torch.float64)  # [seeds, n]
    wall = torch.tensor([[row["wall_seconds"] for row in r[:n]] for r in runs], dtype=torch.float64)  # [seeds, n]
    return values, wall


def reward_curves(
    specs: Sequence[RunSpec], reward_names: Sequence[str], smooth: int
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{row: {reward name: (trailing mean over smooth iterations [seeds, n], wall seconds [seeds, n])}}`` for
    every scheme or variant: what :func:`otca.plots.plot_reward_curves` draws."""
    by_scheme: dict[str, list[RunSpec]] = {}
    for s in specs:
        by_scheme.setdefault(s.name, []).append(s)
    curves: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for scheme, runs in by_scheme.items():
        for name in reward_names:
            values, wall = curve_arrays(runs, f"reward/{name}")  # [seeds, n] each
            curves.setdefault(scheme, {})[name] = (trailing_mean(values, smooth), wall)
    return curves


# ------------------------------------------------------------------ the driver


def provenance() -> dict[str, Any]:
    """Where figures come from: otca's git commit (``+dirty`` with local changes), versions, CPU threads."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is not None and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"commit": commit, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def _execute(
    configs: list[Any], threads: int, jobs: int, report: Callable[[int, dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Every config's summary, in order: finished runs are reused, the others trained (``jobs`` processes
    side by side when > 1); ``report(i, summary)`` is called as each run finishes."""
    found = [finished_summary(cfg) for cfg in configs]
    out = {i: s for i, s in enumerate(found) if s is not None}
    for i, s in out.items():
        report(i, s)
    todo = [i for i in range(len(configs)) if i not in out]
    if jobs <= 1 or len(todo) <= 1:
        for i in todo:
            out[i] = train_run(configs[i], threads)
            report(i, out[i])
    else:
        # spawn, not fork: a forked process inherits torch's thread pools in an undefined state
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(train_run, configs[i], threads): i for i in todo}
            for f in as_completed(futures):
                i = futures[f]
                out[i] = f.result()
                report(i, out[i])
    return [out[i] for i in range(len(configs))]


def compare(
    config: str | None = None,
    overrides: Sequence[str] = (),
    *,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    variants: Mapping[str, Sequence[str]] | None = None,
    out_dir: str | Path = "runs/compare",
    quick: bool = False,
    jobs: int | None = None,
    threads: int = 1,
    smooth: int = 5,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, list[float]]]:
    """Train every scheme (and each of its ``variants``, ``{name: overrides}``) with every seed on one config
    and write the table, CSVs, curves and compare.json.

    ``quick`` puts :data:`QUICK_OVERRIDES` before ``overrides``. ``jobs`` runs that many trainings side by
    side (separate processes, ``threads`` torch threads each); None = one per CPU core: these small networks
    gain little from a second thread, and oversubscribed threads on a busy machine are far slower (see
    docs/results.md). Returns :func:`table_values`.
    """
    jobs = jobs if jobs is not None else os.cpu_count() or 1
    if jobs < 1 or threads < 1:
        raise ValueError(f"compare: jobs and threads must be >= 1, got jobs={jobs}, threads={threads}")
    out = Path(out_dir)
    seeds = tuple(seeds)
    overrides = [*(QUICK_OVERRIDES if quick else ()), *overrides]
    specs = plan_runs(schemes, seeds, out, variants)
    configs = [run_config(config, overrides, s) for s in specs]  # every config error before any training
    out.mkdir(parents=True, exist_ok=True)
    t0, done, where = time.time(), [], provenance()  # the code as it was when the runs started

    def report(i: int, summary: dict) -> None:
        done.append(i)
        rewards = {k: v for k, v in summary["eval_after"].items() if k.startswith("reward/")}
        r = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in rewards.items())
        log(f"[{len(done)}/{len(specs)}] {specs[i].name} seed {specs[i].seed}: {summary['wall_seconds']:.0f} s; {r}")

    summaries = dict(zip(specs, _execute(configs, threads, jobs, report), strict=True))
    values = table_values(summaries)
    (out / "table.md").write_text(format_markdown(values) + "\n")
    write_csv(values, out / "table.csv")
    write_runs_csv(summaries, out / "runs.csv")
    # the reward columns as the runs logged them (a multi-objective reward logs one per objective, not its name)
    first = next(iter(summaries.values()))["eval_after"]
    columns = [k.removeprefix("reward/") for k in first if k.startswith("reward/")]
    plot_reward_curves(reward_curves(specs, columns, smooth), out, smooth)
    meta = {"config": config or "defaults", "overrides": list(overrides), "schemes": list(schemes),
            "variants": {k: list(v) for k, v in (variants or {}).items()},
            "seeds": list(seeds), "jobs": jobs, "threads_per_job": threads, "smooth": smooth,
            "wall_seconds": time.time() - t0, **where}
    (out / "compare.json").write_text(json.dumps(meta, indent=1))
    return values
