"""The credit analysis's driver and report: trace a run (or a config's policy), compute the metrics for every
reward and the z-scored sum, and write ``analysis.json``, ``analysis.md`` (Table 5) and ``analysis.png`` (Fig. 6).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from otca.analysis.metrics import METRIC_RANGES, ZSUM, Stat, pearson_rows, proxy_metrics
from otca.analysis.trace import VIEWS, CreditTrace, trace_trajectories
from otca.plots import plot_examples


def analyze_trace(trace: CreditTrace) -> dict[str, dict[str, Stat]]:
    """:func:`proxy_metrics` for every reward and for the z-scored sum: ``{target: {metric: Stat}}``."""
    return {name: proxy_metrics(dS, dR) for name, (dS, dR) in trace.targets().items()}


def format_table(results: dict[str, dict[str, Stat]], steps: int) -> str:
    """The paper's Table 5 as Markdown: one row per metric, one column per target (mean ± std)."""
    targets = list(results)
    lines = [
        "| metric | range | " + " | ".join(targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for metric, rng in METRIC_RANGES.items():
        if metric not in results[targets[0]]:
            continue
        cells = [str(results[t][metric]) for t in targets]
        lines.append(f"| {metric} | {rng.replace('T-1', str(steps - 1))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(trace: CreditTrace, results: dict[str, dict[str, Stat]], out_dir: Path, examples: int,
                 meta: dict[str, Any]) -> None:
    """``analysis.json`` (every Stat and ``meta``), ``analysis.md`` (the table) and ``analysis.png`` (Fig. 6)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        **meta,
        "trajectories": trace.gains.shape[0],
        "steps": trace.steps,
        "view": trace.view,
        "results": {t: {m: asdict(s) for m, s in ms.items()} for t, ms in results.items()},
    }
    (out_dir / "analysis.json").write_text(json.dumps(payload, indent=1))
    head = (f"TCD similarity gain dS against the reward gain dR of the decoded view '{trace.view}' of each state, "
            f"{trace.gains.shape[0]} trajectories x {trace.steps} steps (mean ± std over trajectories).\n\n")
    (out_dir / "analysis.md").write_text(head + format_table(results, trace.steps) + "\n")
    dS, dR = trace.targets()[ZSUM]  # [N, steps] each
    plot_examples(dS, dR, pearson_rows(dS, dR), trace.prompts, out_dir / "analysis.png", examples)


@dataclass
class CreditAnalysis:
    """What :func:`analyze_credit` measured and where it wrote the report."""

    results: dict[str, dict[str, Stat]]  # {target: {metric: Stat}}
    trace: CreditTrace
    out_dir: Path


def load_policy_trainer(
    config: str | None, overrides: Sequence[str], run_dir: str | None, out_dir: Path
) -> tuple[Any, dict[str, str]]:
    """A Trainer for a run (its ``config.yaml``, the latest checkpoint's raw weights, not the EMA: training
    rollouts use the raw weights) or for a config's policy with its base weights; and where both came from."""
    from otca.checkpoint import latest_checkpoint, load_checkpoint
    from otca.config import load_config
    from otca.trainer import Trainer

    if run_dir is not None and config is not None:
        raise ValueError("analyze-credit: give a run directory or a config, not both (the run has its config.yaml)")
    source = Path(run_dir) / "config.yaml" if run_dir is not None else config
    cfg = load_config(source, [*overrides, f"out_dir={out_dir}", "progress=false"])
    trainer = Trainer(cfg, out_dir)
    weights = "base"
    if run_dir is not None:
        ckpt = latest_checkpoint(Path(run_dir))
        state = load_checkpoint(ckpt)["weights"]
        missing = sorted(set(trainer.params) - set(state))
        if missing:
            raise ValueError(f"checkpoint '{ckpt}' does not match the model: no tensor '{missing[0]}'")
        with torch.no_grad():
            for name, p in trainer.params.items():
                p.copy_(state[name])
        weights = str(ckpt)
    return trainer, {"source": str(source) if source else "defaults", "weights": weights}


def analyze_credit(
    config: str | None = None,
    overrides: Sequence[str] = (),
    *,
    run_dir: str | None = None,
    trajectories: int = 512,
    view: str = "x0",
    out_dir: str | None = None,
    examples: int = 6,
) -> CreditAnalysis:
    """Sec. 6.1 on a run or on a config's policy (:func:`load_policy_trainer`), with the run's sampler.

    Writes the report to ``out_dir`` (default ``RUN_DIR/credit_analysis``, or ``runs/credit-analysis``).
    """
    from otca.compare import provenance

    VIEWS.get(view)  # an unknown view fails before any model is built
    if trajectories < 1:
        raise ValueError(f"trajectories: expected >= 1, got {trajectories}")
    out = Path(out_dir or (Path(run_dir) / "credit_analysis" if run_dir is not None else "runs/credit-analysis"))
    trainer, where = load_policy_trainer(config, overrides, run_dir, out)
    trace = trace_trajectories(trainer, trajectories, view)
    results = analyze_trace(trace)
    s = trainer.cfg.sampler
    meta = {**where, "overrides": list(overrides), "scheme_of_run": trainer.cfg.train.scheme,
            "num_steps": s.num_steps, "sde": s.sde, "eta": s.eta, "final_latent": s.final_latent, **provenance()}
    write_report(trace, results, out, examples, meta)
    return CreditAnalysis(results, trace, out)
