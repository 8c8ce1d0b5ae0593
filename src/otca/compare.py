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

import numpy as np
import torch

from otca import stats
from otca.plots import plot_pareto, plot_reward_curves
from otca.runlog import RunLog
from otca.stats import trailing_mean

DEFAULT_SCHEMES = ("grpo", "flow-grpo", "tcd", "moca", "otca", "pcpo")
# evaluation seeds of the full mode: three give a (rough) bootstrap interval over seeds (otca.stats)
DEFAULT_SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)
# seeds of the learning-rate tuning runs: never evaluation seeds, so the chosen lr is judged on fresh noise
DEFAULT_TUNE_SEEDS = (100, 101)
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
    overrides: tuple[str, ...] = ()  # the variant's overrides, then this run's own (the lr chosen by tuning)

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
    """The summary of the finished run in ``cfg.out_dir`` if it was trained with exactly ``cfg``, else None.

    "Exactly": its saved config.yaml, read under the current config schema, equals ``cfg``. A run saved before a
    field was added (with a default that keeps the old behaviour) is reused; one saved with a field the schema
    no longer knows, or a differing value, is trained again.
    """
    from otca.config import dump_config, load_config

    saved = Path(cfg.out_dir) / "config.yaml"
    if not saved.is_file():
        return None
    try:
        same = dump_config(load_config(saved)) == dump_config(cfg)
    except ValueError:  # a field the schema no longer has, or a value it no longer accepts
        return None
    return RunLog(cfg.out_dir).summary() if same else None


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
            smoothed = torch.tensor(np.stack([trailing_mean(v, smooth) for v in values.numpy()]))  # [seeds, n]
            curves.setdefault(scheme, {})[name] = (smoothed, wall)
    return curves


# ------------------------------------------------------------------ the fair view: paired, efficiency, trade-off

TRAIN_REWARD = "train/final_reward"  # the weights-summed training reward, trailing mean at the last iteration


def reward_weights(cfg) -> list[float]:
    """beta per score column of ``cfg.rewards`` (a list weight gives one per column of a multi-objective reward)."""
    return [float(w) for r in cfg.rewards for w in (r.weight if isinstance(r.weight, list) else [r.weight])]


def training_curve(run_dir: Path, weights: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(reward [n], wall [n])`` of one run: ``sum_k beta_k reward/k`` of every iteration's rollout, and the
    seconds from the start of the training loop to the end of each iteration (the eval before training left
    out: row 0's wall minus its own phase times)."""
    rows = RunLog(run_dir).rows()
    keys = [k for k in rows[0] if k.startswith("reward/")] if rows else []
    if not rows or len(keys) != len(weights):
        raise ValueError(f"run {run_dir}: expected metrics rows with {len(weights)} reward columns, got "
                         f"{len(rows)} rows with {keys}")
    reward = np.array([sum(w * r[k] for w, k in zip(weights, keys, strict=True)) for r in rows])  # [n]
    start = rows[0]["wall_seconds"] - sum(v for k, v in rows[0].items() if k.startswith("time/"))
    wall = np.array([r["wall_seconds"] - start for r in rows])  # [n]
    return reward, wall


def run_metrics(summary: dict[str, Any], run_dir: Path, weights: Sequence[float], smooth: int) -> dict[str, float]:
    """One run's numbers for the fair tables: its eval after training, the final smoothed weights-summed training
    reward (``train/final_reward``) and its wall seconds."""
    reward, _ = training_curve(run_dir, weights)
    return {**summary["eval_after"], TRAIN_REWARD: float(trailing_mean(reward, smooth)[-1]),
            "wall_seconds": summary["wall_seconds"]}


def _signed(x: float) -> str:
    return f"{x:+.4g}" if math.isfinite(x) else str(x)


def paired_table(per_run: dict[RunSpec, dict[str, float]], baseline: str) -> tuple[str, list[list[Any]]]:
    """Markdown and CSV rows of every scheme's per-seed difference to ``baseline`` (same seed = same prompts and
    noise), mean with its bootstrap 95 % interval (:func:`otca.stats.paired_difference_ci`), per metric."""
    by = _by_scheme(per_run)
    base = by[baseline]
    cols = [c for c in dict.fromkeys(k for v in base.values() for k in v) if c != "wall_seconds"]
    lines = [f"| scheme - {baseline} | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    rows: list[list[Any]] = []
    for scheme, runs in by.items():
        if scheme == baseline:
            continue
        cells = []
        for c in cols:
            e = stats.paired_difference_ci({s: v[c] for s, v in runs.items()}, {s: v[c] for s, v in base.items()})
            cells.append(f"{_signed(e.value)} [{_signed(e.low)}, {_signed(e.high)}]")
            rows.append([scheme, c, e.value, e.low, e.high, e.n])
        lines.append(f"| {scheme} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def _by_scheme(per_run: dict[RunSpec, Any]) -> dict[str, dict[int, Any]]:
    out: dict[str, dict[int, Any]] = {}
    for spec, v in per_run.items():
        out.setdefault(spec.name, {})[spec.seed] = v
    return out


def efficiency_table(
    curves: dict[RunSpec, tuple[np.ndarray, np.ndarray]], baseline: str, smooth: int, bar: float = 0.7
) -> tuple[str, list[list[Any]], dict[str, stats.Efficiency]]:
    """How fast each scheme reaches the baseline's final weights-summed training reward, per seed
    (:func:`otca.stats.sample_efficiency`, counted in iterations 1..n and in training wall seconds), with the
    ratio of sums over seeds and its bootstrap interval; ``best - threshold`` says how close a scheme that
    misses comes. Returns markdown, CSV rows and the iteration efficiencies."""
    by = _by_scheme(curves)
    base = by[baseline]
    lines = [f"| scheme | seeds reaching {baseline}'s final | iterations (scheme / {baseline}, mean) | "
             f"iteration ratio [95% CI] | wall ratio [95% CI] | best - threshold (mean) | <= {bar}x iterations |",
             "|---|---|---|---|---|---|---|"]
    rows: list[list[Any]] = []
    found: dict[str, stats.Efficiency] = {}
    for scheme, runs in by.items():
        if scheme == baseline:
            continue
        iters = {s: np.arange(1, len(c[0]) + 1, dtype=float) for s, c in runs.items()}
        biters = {s: np.arange(1, len(c[0]) + 1, dtype=float) for s, c in base.items()}
        eff = stats.sample_efficiency({s: c[0] for s, c in runs.items()}, {s: c[0] for s, c in base.items()},
                                      smooth=smooth, scheme_x=iters, baseline_x=biters)
        wall = stats.sample_efficiency({s: c[0] for s, c in runs.items()}, {s: c[0] for s, c in base.items()},
                                       smooth=smooth, scheme_x={s: c[1] for s, c in runs.items()},
                                       baseline_x={s: c[1] for s, c in base.items()})
        found[scheme] = eff
        reached = [r for r in eff.per_seed.values() if r.scheme_at is not None]
        mean_at = np.mean([r.scheme_at for r in reached]) if reached else math.nan
        mean_base = np.mean([r.baseline_at for r in eff.per_seed.values()])
        gap = float(np.mean([r.scheme_best - r.threshold for r in eff.per_seed.values()]))
        lines.append(f"| {scheme} | {len(reached)}/{len(eff.per_seed)} | {mean_at:.3g} / {mean_base:.3g} | "
                     f"{eff.ratio} | {wall.ratio} | {_signed(gap)} | {'yes' if eff.ratio.value <= bar else 'no'} |")
        rows.append([scheme, len(reached), len(eff.per_seed), eff.ratio.value, eff.ratio.low, eff.ratio.high,
                     wall.ratio.value, wall.ratio.low, wall.ratio.high, gap])
    return "\n".join(lines), rows, found


def tradeoff(
    per_run: dict[RunSpec, dict[str, float]], objectives: Sequence[str], base: dict[str, float] | None
) -> tuple[dict[str, torch.Tensor], np.ndarray, dict[str, dict[int, float]]]:
    """The eval-time objectives of every run ``{scheme: [seeds, M]}``, the hypervolume reference point (the
    per-objective minimum over every run and the base model: the nadir of what was measured) and each run's
    hypervolume against it ``{scheme: {seed: hv}}`` (:func:`otca.stats.hypervolume` of the run's point)."""
    by = _by_scheme(per_run)
    points = {sch: torch.tensor([[runs[s][o] for o in objectives] for s in sorted(runs)], dtype=torch.float64)
              for sch, runs in by.items()}
    every = torch.cat(list(points.values())).numpy()  # [N, M]
    if base is not None:
        every = np.vstack([every, [[base[o] for o in objectives]]])
    ref = every.min(axis=0)  # [M]
    hv = {sch: {s: stats.hypervolume([[runs[s][o] for o in objectives]], ref) for s in runs}
          for sch, runs in by.items()}
    return points, ref, hv


def bar_verdict(
    eff: stats.Efficiency, paired: list[list[Any]], scheme: str, signals: dict[str, str], bar: float = 0.7
) -> str:
    """Whether ``scheme`` reaches the baseline's final training reward in ``bar`` x its iterations or fewer
    (point estimate of the ratio) without losing on a monitored held-out signal (a paired difference in the
    wrong direction whose 95 % interval excludes 0); says which part fails."""
    losses = [m for (sch, m, _v, lo, hi, _n) in paired if sch == scheme and m in signals
              and ((signals[m] == "up" and hi < 0) or (signals[m] == "down" and lo > 0))]
    fast = eff.ratio.value <= bar
    if fast and not losses:
        return f"{scheme}: meets the bar (ratio {eff.ratio})"
    why = [] if fast else [f"ratio {eff.ratio} > {bar}"]
    why += [f"loses on {m}" for m in losses]
    return f"{scheme}: misses the bar ({'; '.join(why)})"


# ------------------------------------------------------------------ learning-rate tuning


def tune_score(summary: dict[str, Any], run_dir: Path, weights: Sequence[float], smooth: int, metric: str) -> float:
    """What lr tuning maximises for one run: ``train-reward`` (the final smoothed weights-summed training reward)
    or a metric of the eval after training (``-name``: lower is better)."""
    if metric == "train-reward":
        return run_metrics(summary, run_dir, weights, smooth)[TRAIN_REWARD]
    sign, name = (-1.0, metric[1:]) if metric.startswith("-") else (1.0, metric)
    if name not in summary["eval_after"]:
        raise ValueError(f"compare --tune-metric {metric!r}: expected 'train-reward' or an eval metric "
                         f"({', '.join(summary['eval_after'])})")
    return sign * float(summary["eval_after"][name])


def choose_lr(scores: dict[tuple[str, float], list[float]]) -> dict[str, float]:
    """Per scheme, the lr with the highest mean score over the tuning seeds (the smaller lr on a tie)."""
    best: dict[str, tuple[float, float]] = {}
    for (scheme, lr), vals in sorted(scores.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        m = float(np.mean(vals))
        if scheme not in best or m > best[scheme][1]:
            best[scheme] = (lr, m)
    return {s: lr for s, (lr, _) in best.items()}


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
    seeds: Sequence[int] | None = None,
    variants: Mapping[str, Sequence[str]] | None = None,
    out_dir: str | Path = "runs/compare",
    quick: bool = False,
    jobs: int | None = None,
    threads: int = 1,
    smooth: int = 5,
    baseline: str | None = None,
    lr_grid: Sequence[float] = (),
    tune_seeds: Sequence[int] = DEFAULT_TUNE_SEEDS,
    tune_metric: str = "train-reward",
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, list[float]]]:
    """Train every scheme (and each of its ``variants``, ``{name: overrides}``) with every seed on one config and
    write the tables, CSVs, curves, Pareto plot and compare.json.

    ``quick`` puts :data:`QUICK_OVERRIDES` before ``overrides``; ``seeds`` defaults to :data:`DEFAULT_SEEDS`
    (:data:`QUICK_SEEDS` when quick). ``jobs`` runs that many trainings side by side (separate processes,
    ``threads`` torch threads each); None = one per CPU core: these small networks gain little from a second
    thread, and oversubscribed threads on a busy machine are far slower (see docs/results.md).

    The fair view: ``baseline`` (default ``grpo`` when compared, else the first scheme) is what every other
    scheme is paired with, seed by seed; ``lr_grid`` (several learning rates) first trains every scheme with
    every lr on ``tune_seeds`` and keeps, per scheme, the lr that maximises ``tune_metric`` (see
    :func:`tune_score`), then the evaluation runs use it. Step sizes can also be equalised by the override
    ``train.credit.adv_scale=unit-mean-abs``. Returns :func:`table_values`.
    """
    jobs = jobs if jobs is not None else os.cpu_count() or 1
    if jobs < 1 or threads < 1:
        raise ValueError(f"compare: jobs and threads must be >= 1, got jobs={jobs}, threads={threads}")
    out = Path(out_dir)
    seeds = tuple(seeds if seeds is not None else (QUICK_SEEDS if quick else DEFAULT_SEEDS))
    baseline = baseline or ("grpo" if "grpo" in schemes else schemes[0])
    if baseline not in schemes:
        raise ValueError(f"compare --baseline {baseline!r}: expected one of the compared schemes {list(schemes)}")
    lr_grid = tuple(float(x) for x in lr_grid)
    if lr_grid:
        if set(tune_seeds) & set(seeds):
            raise ValueError(f"compare --tune-seeds {list(tune_seeds)}: expected seeds apart from the evaluation "
                             f"seeds {list(seeds)}")
        if any(o.split("=", 1)[0].strip() == "train.lr" for o in overrides):
            raise ValueError("compare override 'train.lr': set by the lr grid (drop --lr-grid or the override)")
    overrides = [*(QUICK_OVERRIDES if quick else ()), *overrides]
    plan_runs(schemes, seeds, out, variants)  # name and repeat errors before any training
    out.mkdir(parents=True, exist_ok=True)
    t0, where = time.time(), provenance()  # the code as it was when the runs started

    def run_all(specs: list[RunSpec], what: str) -> tuple[list[Any], list[dict[str, Any]]]:
        configs = [run_config(config, overrides, s) for s in specs]  # every config error before any training
        done: list[int] = []

        def report(i: int, summary: dict) -> None:
            done.append(i)
            rewards = {k: v for k, v in summary["eval_after"].items() if k.startswith("reward/")}
            r = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in rewards.items())
            sp = specs[i]
            log(f"{what} [{len(done)}/{len(specs)}] {sp.name} seed {sp.seed} {' '.join(sp.overrides)}: "
                f"{summary['wall_seconds']:.0f} s; {r}")

        return configs, _execute(configs, threads, jobs, report)

    chosen: dict[str, float] = {}
    tune_rows: list[list[Any]] = []
    if lr_grid:
        tspecs = [RunSpec(s, int(d), out / "tune" / s / f"lr-{lr:g}" / f"seed-{d}", overrides=(f"train.lr={lr!r}",))
                  for s in schemes for lr in lr_grid for d in tune_seeds]
        tconfigs, tsums = run_all(tspecs, "tune")
        scores: dict[tuple[str, float], list[float]] = {}
        for sp, cfg, sm in zip(tspecs, tconfigs, tsums, strict=True):
            v = tune_score(sm, sp.run_dir, reward_weights(cfg), smooth, tune_metric)
            scores.setdefault((sp.scheme, cfg.train.lr), []).append(v)
            tune_rows.append([sp.scheme, cfg.train.lr, sp.seed, v])
        chosen = choose_lr(scores)
    specs = [RunSpec(sp.scheme, sp.seed, sp.run_dir, sp.variant,
                     (*sp.overrides, *((f"train.lr={chosen[sp.scheme]!r}",) if chosen else ())))
             for sp in plan_runs(schemes, seeds, out, variants)]
    configs, sums = run_all(specs, "eval")
    summaries = dict(zip(specs, sums, strict=True))
    weights = reward_weights(configs[0])
    values = table_values(summaries)
    per_run = {sp: run_metrics(sm, sp.run_dir, weights, smooth) for sp, sm in summaries.items()}
    curves = {sp: training_curve(sp.run_dir, weights) for sp in specs}
    base_eval = {k: float(np.mean(v)) for k, v in values[BASE].items()}

    paired_md, paired_rows = paired_table(per_run, baseline)
    eff_md, eff_rows, effs = efficiency_table(curves, baseline, smooth)
    objectives = [k for k in summaries[specs[0]]["eval_after"] if k.startswith("reward/")]
    points, ref, hv = tradeoff(per_run, objectives, base_eval)
    plot_pareto(points, objectives, out / "pareto.png", torch.tensor([base_eval[o] for o in objectives]))
    hv_lines = [f"| scheme | hypervolume (mean [95% CI]) | - {baseline} (paired) |", "|---|---|---|"]
    hv_rows = []
    for sch, by_seed in hv.items():
        e = stats.mean_ci(list(by_seed.values()))
        d = stats.paired_difference_ci(by_seed, hv[baseline]) if sch != baseline else None
        hv_lines.append(f"| {sch} | {e} | {'-' if d is None else d} |")
        hv_rows.append([sch, e.value, e.low, e.high, *(() if d is None else (d.value, d.low, d.high))])
    signals = dict(configs[0].eval.monitor.signals)
    verdicts = [bar_verdict(effs[s], paired_rows, s, signals) for s in schemes if s != baseline]

    n_seeds = len(seeds)
    md = [f"## Eval after training (mean ± std over {n_seeds} seeds)", "", format_markdown(values), ""]
    if chosen:
        md += ["## Learning rates chosen on the tuning seeds", "",
               f"grid {list(lr_grid)}, tuning seeds {list(tune_seeds)}, maximising {tune_metric}: "
               + ", ".join(f"{s} {lr:g}" for s, lr in chosen.items()), ""]
    md += [f"## Paired differences against {baseline} (mean over seeds [95% bootstrap CI])", "",
           f"`{TRAIN_REWARD}`: the weights-summed training reward of the rollouts, trailing mean over {smooth} "
           "iterations at the last iteration.", "", paired_md, "",
           f"## Sample efficiency: reaching {baseline}'s final training reward", "",
           "Per seed, the threshold is the baseline's final smoothed weights-summed training reward; iterations "
           "are counted from 1, wall time from the start of the training loop. Ratio = sum over seeds of the "
           "scheme's / the baseline's (inf when the scheme misses on some seed).", "", eff_md, "",
           "## Trade-off between the objectives at eval time", "",
           f"Objectives: {', '.join(objectives)} (all maximised); reference point = the per-objective minimum "
           f"over every run and the base model: {', '.join(f'{x:.4g}' for x in ref)}. Plot: pareto.png.", "",
           "\n".join(hv_lines), "", "## The 0.7x bar", "",
           f"Reach {baseline}'s final training reward in 0.7x its iterations or fewer without losing on a "
           f"monitored held-out signal ({', '.join(f'{k} {v}' for k, v in signals.items())}; a loss = a paired "
           "difference in the wrong direction whose interval excludes 0):", "",
           *([] if any(k in base_eval for k in signals) else
             ["(None of these signals is in this comparison's eval: only the iteration ratio is checked. Set "
              "eval.monitor.signals to metrics the eval suite reports.)", ""]),
           *[f"- {v}" for v in verdicts], ""]
    (out / "table.md").write_text("\n".join(md))
    write_csv(values, out / "table.csv")
    write_runs_csv(summaries, out / "runs.csv")
    _write_rows(out / "paired.csv", ["scheme", "metric", "diff", "low", "high", "seeds"], paired_rows)
    _write_rows(out / "efficiency.csv", ["scheme", "seeds_reached", "seeds", "iter_ratio", "iter_low", "iter_high",
                                         "wall_ratio", "wall_low", "wall_high", "best_minus_threshold"], eff_rows)
    _write_rows(out / "hypervolume.csv", ["scheme", "hv", "low", "high", "diff", "diff_low", "diff_high"], hv_rows)
    if tune_rows:
        _write_rows(out / "tune.csv", ["scheme", "lr", "seed", "score"], tune_rows)
    # the reward columns as the runs logged them (a multi-objective reward logs one per objective, not its name)
    first = next(iter(summaries.values()))["eval_after"]
    columns = [k.removeprefix("reward/") for k in first if k.startswith("reward/")]
    plot_reward_curves(reward_curves(specs, columns, smooth), out, smooth)
    meta = {"config": config or "defaults", "overrides": list(overrides), "schemes": list(schemes),
            "variants": {k: list(v) for k, v in (variants or {}).items()},
            "seeds": list(seeds), "baseline": baseline, "lr_grid": list(lr_grid), "tune_seeds": list(tune_seeds),
            "tune_metric": tune_metric, "chosen_lr": chosen, "jobs": jobs, "threads_per_job": threads,
            "smooth": smooth, "wall_seconds": time.time() - t0, **where}
    (out / "compare.json").write_text(json.dumps(meta, indent=1))
    return values


def _write_rows(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
