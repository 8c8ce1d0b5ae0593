"""The ``otca`` command line: train, eval, sample, pretrain, compare, analyze-credit, config.

    otca train                                   # the embedded default with OTCA
    otca train --config FILE key=value ...       # a config file plus overrides
    otca train --resume RUN_DIR [key=value ...]  # continue a run from its latest checkpoint
    otca eval RUN_DIR                            # evaluate a run's latest weights
    otca sample RUN_DIR --prompt "a handwritten seven"
    otca export RUN_DIR [--format lora|merged|full] [--ema] [--out DIR]   # weights diffusers loads
    otca compare [--schemes grpo,otca] [--seeds 0,1,2] [--lr-grid 2e-5,5e-5] [--adv-scale unit-mean-abs] [--quick]
    otca compare --variants "window=sampler.sde_window.size=4;guard=train.ratio_guard=ratio-norm"  # + named rows
    otca analyze-credit [--run RUN_DIR | --config FILE] [key=value ...]            # is dS a proxy? (paper 6.1)
    otca config [--config FILE] [key=value ...]  # the resolved config as YAML, every field's docstring above it
    otca pretrain [--world digits|video] [--out DIR]  # rebuild a world's shipped weights from scratch
    torchrun --nproc_per_node 2 -m otca train    # the same on several processes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="otca", description="GRPO post-training of flow-matching generators with per-step, per-objective credit."
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a policy (default: the embedded tiny FLUX on digits, with OTCA)")
    t.add_argument("--config", help="YAML config file (fields of otca.config.RunConfig)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.scheme=grpo train.lr=1e-4")

    e = sub.add_parser("eval", help="evaluate a run's latest weights on its eval prompts")
    e.add_argument("run_dir")
    e.add_argument(
        "overrides", nargs="*", help="key=value overrides of the run's config (e.g. eval.samples_per_prompt=8)"
    )

    s = sub.add_parser("sample", help="sample images from a run's latest weights")
    s.add_argument("run_dir")
    s.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    s.add_argument("--n", type=int, default=8, help="samples per prompt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="PNG path (default: RUN_DIR/sample.png)")

    x = sub.add_parser("export", help="write a run's weights in diffusers' formats (LoRA, merged, full)")
    x.add_argument("run_dir")
    x.add_argument("--format", default="auto", help="auto (lora for LoRA runs, else full), lora, merged or full")
    x.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    x.add_argument("--out", help="output folder (default: RUN_DIR/export)")

    c = sub.add_parser(
        "compare", help="train several credit schemes over several seeds with identical compute; one table"
    )
    c.add_argument("--config", help="YAML config file shared by every run (default: the embedded default)")
    c.add_argument(
        "--schemes", default=None, help="comma-separated schemes (default: grpo,flow-grpo,tcd,moca,otca,pcpo)"
    )
    c.add_argument("--seeds", default=None, help="comma-separated evaluation seeds (default: 0,1,2; --quick: 0,1)")
    c.add_argument(
        "--variants", default=None,
        help="extra rows <scheme>+NAME with their own overrides, same seeds: 'NAME=key=value [key=value ...];NAME=...' "
        "(e.g. 'window=sampler.sde_window.size=4;cps=sampler.sde=cps')",
    )
    c.add_argument("--baseline", default=None, help="scheme the others are paired with (default: grpo if compared)")
    c.add_argument("--lr-grid", default=None, help="comma-separated learning rates: each scheme's lr is chosen on "
                   "the tuning seeds, then evaluated on --seeds (e.g. 2e-5,5e-5,1e-4)")
    c.add_argument("--tune-seeds", default=None, help="seeds of the lr-tuning runs (default: 100,101)")
    c.add_argument("--tune-metric", default="train-reward", help="what lr tuning maximises: train-reward (final "
                   "weights-summed training reward) or an eval metric, '-name' when lower is better")
    c.add_argument("--adv-scale", default=None, choices=["none", "unit-mean-abs"],
                   help="train.credit.adv_scale for every run (unit-mean-abs: equal step sizes across schemes)")
    c.add_argument("--quick", action="store_true", help="CI-sized runs (a few iterations, small batch, few steps)")
    c.add_argument("--out", default="runs/compare", help="comparison directory (runs go to OUT/<scheme>/seed-<s>)")
    c.add_argument(
        "--jobs", type=int, default=None,
        help="runs trained side by side in separate processes (default: one per CPU core)",
    )
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    c.add_argument("--smooth", type=int, default=5, help="trailing-mean window of the reward curves (iterations)")
    c.add_argument("overrides", nargs="*", help="key=value overrides applied to every run, e.g. train.iterations=20")

    a = sub.add_parser("analyze-credit", help="correlate TCD's similarity gains with per-step reward gains (paper 6.1)")
    src = a.add_mutually_exclusive_group()
    src.add_argument("--run", metavar="RUN_DIR", help="a run: its config.yaml and latest checkpoint")
    src.add_argument(
        "--config", help="a config whose policy (base weights) is analysed (default: the embedded default)"
    )
    a.add_argument("--trajectories", type=int, default=512, help="sampled trajectories to analyse")
    a.add_argument("--view", default="x0", help="what is decoded at each state: x0 (clean prediction) or state")
    a.add_argument("--examples", type=int, default=6, help="example trajectories in the Fig. 6-style plot")
    a.add_argument("--out", help="output folder (default: RUN_DIR/credit_analysis or runs/credit-analysis)")
    a.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. seed=1 sampler.eta=0.3)")

    cf = sub.add_parser(
        "config",
        help="print the config as YAML with every field's docstring (no arguments: the defaults = configs/digits.yaml)",
    )
    cf.add_argument("--config", help="YAML config file to resolve (default: the defaults)")
    cf.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.scheme=grpo")

    pt = sub.add_parser(
        "pretrain", help="retrain a world's base model, text encoder (and judges) from scratch, deterministically"
    )
    pt.add_argument("--world", default="digits", help="which registered world (default: digits, the embedded default)")
    pt.add_argument("--out", default="pretrained", help="output folder for the weights")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these tiny networks "
                    "and the only count that rebuilds the shipped weights bit for bit)")
    return p


def _load_run(run_dir: str, overrides: list[str], fresh_if_none: bool = False):
    from otca.config import load_config
    from otca.trainer import Trainer

    path = Path(run_dir) / "config.yaml"
    cfg = load_config(path, [*overrides, f"out_dir={run_dir}"])
    trainer = Trainer(cfg, Path(run_dir))
    trainer.resume(fresh_if_none)
    return trainer


def cmd_train(args) -> int:
    from otca.config import load_config
    from otca.trainer import Trainer

    if args.resume:
        if args.config:
            raise ValueError("--resume takes the run's own config.yaml; pass changes as key=value overrides")
        trainer = _load_run(args.resume, args.overrides, fresh_if_none=True)
    else:
        trainer = Trainer(load_config(args.config, args.overrides))
    summary = trainer.train()
    if trainer.info.is_main:
        _print_table(summary["eval_before"], summary["eval_after"])
        print(f"run directory: {trainer.run_dir}  ({summary['wall_seconds']:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    trainer = _load_run(args.run_dir, args.overrides)
    res = trainer.evaluate("eval")
    if trainer.info.is_main:
        print(json.dumps(res.metrics, indent=1))
        (Path(args.run_dir) / "eval_latest.json").write_text(json.dumps(res.metrics, indent=1))
    return 0


def cmd_sample(args) -> int:
    import torch

    from otca.flow import make_sigmas
    from otca.plots import save_grid
    from otca.rollout import initial_noise, sample_ode
    from otca.weights import eval_mode, swapped

    trainer = _load_run(args.run_dir, [])
    prompts = [p for p in args.prompt for _ in range(args.n)]
    s = trainer.cfg.sampler
    with swapped(trainer.params, trainer.ema), eval_mode(trainer.policy), torch.no_grad():
        cond = trainer.policy.encode(prompts)
        x = initial_noise(trainer.policy, args.seed, 0, range(len(prompts)), [], same_per_group=False)
        sigmas = make_sigmas(s.eval_steps, s.shift, s.schedule, dynamic=getattr(trainer.policy, "dynamic_shift", None))
        x = sample_ode(trainer.policy, cond, x, sigmas)
        pixels = trainer.policy.decode(x).float().clamp(0, 1).cpu()
    out = Path(args.out or Path(args.run_dir) / "sample.png")
    files = save_grid(pixels, prompts, out, per_row=args.n)  # videos: a GIF grid and a frame strip
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def cmd_export(args) -> int:
    from otca.export import export_run

    out = export_run(args.run_dir, args.out, fmt=args.format, ema=args.ema)
    print(f"exported to {out} ({(out / 'export.json').read_text().strip()})")
    return 0


def _csv(text: str | None, cast=str) -> list | None:
    return None if text is None else [cast(x) for x in text.split(",") if x.strip()]


def cmd_compare(args) -> int:
    from otca.compare import DEFAULT_SCHEMES, DEFAULT_TUNE_SEEDS, compare, parse_variants

    schemes, seeds = _csv(args.schemes) or DEFAULT_SCHEMES, _csv(args.seeds, int) or None
    variants = parse_variants(args.variants) if args.variants else None
    extra = [f"train.credit.adv_scale={args.adv_scale}"] if args.adv_scale else []
    compare(args.config, [*args.overrides, *extra], schemes=schemes, seeds=seeds, variants=variants,
            out_dir=args.out, quick=args.quick, jobs=args.jobs, threads=args.threads, smooth=args.smooth,
            baseline=args.baseline, lr_grid=_csv(args.lr_grid, float) or (),
            tune_seeds=_csv(args.tune_seeds, int) or DEFAULT_TUNE_SEEDS, tune_metric=args.tune_metric)
    print((Path(args.out) / "table.md").read_text())
    print(f"comparison directory: {args.out}")
    return 0


def cmd_analyze_credit(args) -> int:
    from otca.analysis import analyze_credit, format_table

    out = analyze_credit(args.config, args.overrides, run_dir=args.run, trajectories=args.trajectories,
                         view=args.view, out_dir=args.out, examples=args.examples)
    print(format_table(out.results, out.trace.steps))
    print(f"report: {out.out_dir}")
    return 0


def cmd_pretrain(args) -> int:
    import torch

    from otca.pretraining import pretrain_world

    torch.set_num_threads(args.threads)
    for record in pretrain_world(args.world, args.out, seed=args.seed):
        print(json.dumps(record, indent=1, default=str))
    print(f"wrote the {args.world} world's weights to {args.out} (copy them to src/otca/assets to ship them)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from otca.config import default_config_yaml, load_config, render_config

    if args.config is None and not args.overrides:
        sys.stdout.write(default_config_yaml())
    else:
        sys.stdout.write(render_config(load_config(args.config, args.overrides)))
    return 0


def _print_table(before: dict, after: dict) -> None:
    keys = list(after)
    w = max(len(k) for k in keys)
    print(f"{'metric':<{w}}  {'before':>10}  {'after':>10}")
    for k in keys:
        b = before.get(k, float("nan"))
        print(f"{k:<{w}}  {b:>10.4f}  {after[k]:>10.4f}")


def main(argv: list[str] | None = None) -> int:
    import os

    from otca.checkpoint import CheckpointError
    from otca.config import ConfigError
    from otca.registry import UnknownNameError
    from otca.rewards.base import RewardError

    args = _parser().parse_args(argv)
    handler = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "pretrain": cmd_pretrain,
               "compare": cmd_compare, "analyze-credit": cmd_analyze_credit, "config": cmd_config,
               "export": cmd_export}[args.command]
    try:
        return handler(args)
    except (ConfigError, CheckpointError, RewardError, FileNotFoundError, UnknownNameError, ValueError) as e:
        if os.environ.get("OTCA_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"otca: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
