"""``otca compare``: table arithmetic by hand, curve smoothing against a loop, and one tiny comparison end to end."""

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from otca.compare import (
    BASE,
    QUICK_OVERRIDES,
    RunSpec,
    choose_lr,
    compare,
    finished_summary,
    format_markdown,
    mean_std,
    parse_variants,
    plan_runs,
    run_config,
    table_values,
    training_curve,
    write_csv,
)
from otca.runlog import RunLog
from otca.stats import paired_difference_ci, sample_efficiency, trailing_mean

SCHEMES = ("grpo", "otca")
SEEDS = (0, 1)
EXTRA = ("train.iterations=2", "eval.metrics=null", "eval.samples_per_prompt=1")


def test_mean_std_is_the_sample_std_of_the_finite_values():
    assert mean_std([1.0, 2.0, 6.0]) == (3.0, pytest.approx(statistics.stdev([1, 2, 6])))
    m, s = mean_std([4.0, float("nan")])
    assert m == 4.0 and math.isnan(s)
    assert all(math.isnan(x) for x in mean_std([]))


def _summary(before, after, wall):
    after_metrics = {"reward/a": after, "eval/x": after * 10}
    return {"eval_before": {"reward/a": before}, "eval_after": after_metrics, "wall_seconds": wall}


def test_table_values_markdown_and_csv_by_hand(tmp_path):
    summaries = {
        RunSpec("grpo", 0, Path("g0")): _summary(0.5, 0.6, 10.0),
        RunSpec("grpo", 1, Path("g1")): _summary(0.5, 0.8, 12.0),
        RunSpec("otca", 0, Path("o0")): _summary(0.5, 0.9, 11.0),
        RunSpec("otca", 1, Path("o1")): _summary(0.5, 0.7, 13.0),
    }
    values = table_values(summaries)
    assert list(values) == [BASE, "grpo", "otca"]
    assert values[BASE] == {"reward/a": [0.5, 0.5]}  # from the first scheme's runs only
    assert values["grpo"] == {"reward/a": [0.6, 0.8], "eval/x": [6.0, 8.0], "wall_seconds": [10.0, 12.0]}
    md = format_markdown(values).splitlines()
    assert md[0] == "| method | seeds | reward/a | eval/x | wall_seconds |"
    assert md[2] == "| base | 2 | 0.5 ± 0 | - | - |"
    sd_a, sd_x = statistics.stdev([0.6, 0.8]), statistics.stdev([6, 8])
    assert md[3] == f"| grpo | 2 | 0.7 ± {sd_a:.2g} | 7 ± {sd_x:.2g} | 11 ± 1.4 |"
    write_csv(values, tmp_path / "t.csv")
    rows = list(csv.reader(open(tmp_path / "t.csv")))
    assert rows[0] == ["method", "seeds", "reward/a", "reward/a_std", "eval/x", "eval/x_std",
                       "wall_seconds", "wall_seconds_std"]
    assert rows[2][:2] == ["grpo", "2"]
    assert [float(x) for x in rows[2][2:4]] == pytest.approx([0.7, statistics.stdev([0.6, 0.8])])
    assert rows[1][4] == "nan"


def test_plan_and_config_errors_are_one_line():
    with pytest.raises(KeyError, match="unknown credit scheme 'bogus'"):
        plan_runs(["grpo", "bogus"], [0], Path("x"))
    with pytest.raises(ValueError, match="compare seeds: expected a non-empty list without repeats"):
        plan_runs(["grpo"], [0, 0], Path("x"))
    spec = RunSpec("grpo", 3, Path("x/grpo/seed-3"))
    with pytest.raises(ValueError, match="compare override 'train.scheme': set by compare itself"):
        run_config(None, ["train.scheme=otca"], spec)
    cfg = run_config(None, ["train.lr=1e-5"], spec)
    assert (cfg.train.scheme, cfg.seed, cfg.out_dir, cfg.train.lr) == ("grpo", 3, "x/grpo/seed-3", 1e-5)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    values = compare(None, EXTRA, schemes=SCHEMES, seeds=SEEDS, quick=True, out_dir=out, jobs=1, log=lambda line: None)
    return out, values


def test_comparison_writes_every_output_and_its_provenance(comparison):
    out, values = comparison
    for f in ["table.md", "table.csv", "runs.csv", "curves_iteration.png", "curves_wall.png", "compare.json",
              "paired.csv", "efficiency.csv", "hypervolume.csv", "pareto.png"]:
        assert (out / f).is_file(), f
    meta = json.loads((out / "compare.json").read_text())
    assert meta["schemes"] == list(SCHEMES) and meta["seeds"] == list(SEEDS) and meta["baseline"] == "grpo"
    assert meta["overrides"] == [*QUICK_OVERRIDES, *EXTRA]
    assert list(values) == [BASE, *SCHEMES]
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert [(r["scheme"], r["seed"]) for r in runs] == [(s, str(d)) for s in SCHEMES for d in SEEDS]


def test_the_table_is_the_mean_over_seeds_of_every_runs_summary(comparison):
    out, values = comparison
    for scheme in SCHEMES:
        summaries = [json.loads((out / scheme / f"seed-{s}" / "summary.json").read_text()) for s in SEEDS]
        for key in summaries[0]["eval_after"]:
            assert values[scheme][key] == [s["eval_after"][key] for s in summaries]
        want = mean_std([s["eval_after"]["reward/digit-alignment"] for s in summaries])
        row = next(r for r in csv.DictReader(open(out / "table.csv")) if r["method"] == scheme)
        assert float(row["reward/digit-alignment"]) == pytest.approx(want[0])
        assert float(row["reward/digit-alignment_std"]) == pytest.approx(want[1])


def test_schemes_get_identical_compute(comparison):
    """Same prompts and noise: the first rollout (before any update) scores the same under every scheme."""
    out, _ = comparison
    first = {(s, d): RunLog(out / s / f"seed-{d}").rows()[0] for s in SCHEMES for d in SEEDS}
    key = "reward/digit-alignment"
    for d in SEEDS:
        assert first[("grpo", d)][key] == first[("otca", d)][key]
    assert first[("grpo", 0)][key] != first[("grpo", 1)][key]
    def shared(path):  # the config without what compare sets per run
        cfg = yaml.safe_load(path.read_text())
        del cfg["seed"], cfg["out_dir"], cfg["train"]["scheme"]
        return cfg

    cfgs = [shared(out / s / f"seed-{d}" / "config.yaml") for s in SCHEMES for d in SEEDS]
    assert all(c == cfgs[0] for c in cfgs)


def test_cli_reuses_finished_runs_and_prints_the_table(comparison, capsys):
    from otca.cli import main

    out, _ = comparison
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/summary.json")}
    assert len(stamps) == 4
    argv = ["compare", "--quick", "--schemes", ",".join(SCHEMES), "--out", str(out), *EXTRA]
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    printed = capsys.readouterr().out
    assert "| method | seeds |" in printed and "| otca | 2 |" in printed


def test_a_finished_run_is_reused_when_its_saved_config_means_the_same(tmp_path):
    from otca.config import dump_config

    cfg = run_config(None, EXTRA, RunSpec("grpo", 0, tmp_path / "run"))
    run = Path(cfg.out_dir)
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"wall_seconds": 1.0}))
    tree = yaml.safe_load(dump_config(cfg))
    del tree["train"]["step_rewards_every"]  # saved before the field existed: its default keeps the old behaviour
    (run / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    assert finished_summary(cfg) == {"wall_seconds": 1.0}
    tree["train"]["step_rewards_every"] = 2  # trained with another value
    (run / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    assert finished_summary(cfg) is None
    del tree["train"]["step_rewards_every"]
    tree["train"]["gone_field"] = 1  # a field the schema no longer knows
    (run / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    assert finished_summary(cfg) is None
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "summary.json").unlink()  # killed before it finished
    assert finished_summary(cfg) is None


@pytest.mark.slow  # spawning two workers costs two fresh imports of torch and diffusers
def test_runs_trained_by_worker_processes_equal_the_ones_trained_in_this_process(comparison):
    out, _ = comparison
    runs = [out / "otca" / f"seed-{s}" for s in SEEDS]
    before = [json.loads((r / "summary.json").read_text()) for r in runs]
    for r in runs:
        (r / "summary.json").unlink()
    compare(None, EXTRA, schemes=["otca"], seeds=SEEDS, quick=True, out_dir=out, jobs=2, log=lambda line: None)
    after = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert [a["eval_after"] for a in after] == [b["eval_after"] for b in before]


def test_variants_parse_and_plan_one_row_per_scheme_and_variant():
    text = "window=sampler.sde_window.size=4 sampler.sde_window.mode=random; guard=train.ratio_guard=ratio-norm;"
    variants = parse_variants(text)
    assert variants == {"window": ("sampler.sde_window.size=4", "sampler.sde_window.mode=random"),
                        "guard": ("train.ratio_guard=ratio-norm",)}
    specs = plan_runs(["grpo", "otca"], [0, 1], Path("x"), variants)
    assert [(s.name, s.seed) for s in specs] == [
        (name, seed) for scheme in ("grpo", "otca") for name in (scheme, f"{scheme}+window", f"{scheme}+guard")
        for seed in (0, 1)
    ]
    assert specs[2].run_dir == Path("x/grpo+window/seed-0") and specs[2].overrides == variants["window"]
    cfg = run_config(None, ["train.lr=1e-5"], specs[2])
    assert (cfg.sampler.sde_window.size, cfg.sampler.sde_window.mode, cfg.train.lr) == (4, "random", 1e-5)
    for bad in ["window", "window=", "=train.lr=1", "window=train.lr", "a/b=train.lr=1", "w=train.lr=1;w=seed=2"]:
        with pytest.raises(ValueError, match="compare variant"):
            parse_variants(bad)
    with pytest.raises(ValueError, match="compare override 'seed': set by compare itself"):
        run_config(None, [], RunSpec("grpo", 0, Path("x"), "v", ("seed=3",)))


def test_cli_variants_add_named_rows_with_the_same_seeds(tmp_path, capsys):
    from otca.cli import main

    out = tmp_path / "cmp"
    variants = "window=sampler.sde_window.size=2;guard=train.ratio_guard=ratio-norm"
    argv = ["compare", "--quick", "--schemes", "otca", "--seeds", "0", "--variants", variants, "--jobs", "1",
            "--out", str(out), "train.iterations=1", "eval.metrics=null", "eval.samples_per_prompt=1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for row in ("base", "otca", "otca+window", "otca+guard"):
        assert f"| {row} | 1 |" in printed
    meta = json.loads((out / "compare.json").read_text())
    assert meta["variants"] == {"window": ["sampler.sde_window.size=2"], "guard": ["train.ratio_guard=ratio-norm"]}
    rows = ("otca", "otca+window", "otca+guard")
    cfg = {r: yaml.safe_load((out / r / "seed-0" / "config.yaml").read_text()) for r in rows}
    assert cfg["otca"]["sampler"]["sde_window"] is None and cfg["otca+window"]["sampler"]["sde_window"]["size"] == 2
    assert (cfg["otca"]["train"]["ratio_guard"], cfg["otca+guard"]["train"]["ratio_guard"]) == ("none", "ratio-norm")
    assert cfg["otca"]["seed"] == cfg["otca+window"]["seed"] == cfg["otca+guard"]["seed"] == 0
    # the guard changes only the update: its first rollout is the plain run's, prompt for prompt
    first = {r: RunLog(out / r / "seed-0").rows()[0] for r in cfg}
    assert first["otca+guard"]["reward/digit-alignment"] == first["otca"]["reward/digit-alignment"]
    assert [r["scheme"] for r in csv.DictReader(open(out / "runs.csv"))] == ["otca", "otca+window", "otca+guard"]


def _curves(out, scheme):
    weights = [1.0, 1.0, 1.0]  # the default rewards' weights
    return {d: training_curve(out / scheme / f"seed-{d}", weights) for d in SEEDS}


def test_paired_and_efficiency_tables_recomputed_from_the_run_logs(comparison):
    out, _ = comparison
    md = (out / "table.md").read_text()
    for section in ["## Paired differences against grpo", "## Sample efficiency", "## Trade-off", "## The 0.7x bar",
                    "| otca | 2 |"]:
        assert section in md, section
    g, o = _curves(out, "grpo"), _curves(out, "otca")
    # the weights-summed curve by hand from metrics.jsonl
    rows = RunLog(out / "otca" / "seed-0").rows()
    by_hand = [sum(r[k] for k in r if k.startswith("reward/")) for r in rows]
    assert o[0][0].tolist() == pytest.approx(by_hand)
    final = {name: {d: float(trailing_mean(c[d][0], 5)[-1]) for d in SEEDS} for name, c in (("g", g), ("o", o))}
    want = paired_difference_ci(final["o"], final["g"])
    row = next(r for r in csv.DictReader(open(out / "paired.csv"))
               if r["scheme"] == "otca" and r["metric"] == "train/final_reward")
    assert [float(row[k]) for k in ("diff", "low", "high")] == pytest.approx([want.value, want.low, want.high])
    xs = {d: [1.0 + i for i in range(len(o[d][0]))] for d in SEEDS}
    eff = sample_efficiency({d: o[d][0] for d in SEEDS}, {d: g[d][0] for d in SEEDS}, smooth=5,
                            scheme_x=xs, baseline_x=xs)
    erow = next(csv.DictReader(open(out / "efficiency.csv")))
    assert erow["scheme"] == "otca" and int(erow["seeds"]) == 2
    assert float(erow["iter_ratio"]) == pytest.approx(eff.ratio.value)
    assert int(erow["seeds_reached"]) == sum(r.scheme_at is not None for r in eff.per_seed.values())


def test_choose_lr_by_hand():
    scores = {("a", 1e-5): [1.0, 3.0], ("a", 1e-4): [2.5, 2.0], ("b", 1e-5): [0.0], ("b", 1e-4): [0.0]}
    assert choose_lr(scores) == {"a": 1e-4, "b": 1e-5}  # a: 2.25 > 2.0; b: a tie keeps the smaller lr


def test_lr_grid_tunes_on_its_own_seeds_then_evaluates_with_the_chosen_lr(tmp_path):
    extra = ("train.iterations=1", "eval.metrics=null", "eval.samples_per_prompt=1")
    with pytest.raises(ValueError, match="--tune-seeds"):
        compare(None, extra, schemes=SCHEMES, seeds=(0,), quick=True, out_dir=tmp_path, lr_grid=(1e-5,),
                tune_seeds=(0,), log=lambda line: None)
    compare(None, extra, schemes=SCHEMES, seeds=(0,), quick=True, out_dir=tmp_path, jobs=1, lr_grid=(1e-5, 1e-3),
            tune_seeds=(100,), log=lambda line: None)
    tune = list(csv.DictReader(open(tmp_path / "tune.csv")))
    assert {(r["scheme"], float(r["lr"]), r["seed"]) for r in tune} == {
        (s, lr, "100") for s in SCHEMES for lr in (1e-5, 1e-3)}
    meta = json.loads((tmp_path / "compare.json").read_text())
    for s in SCHEMES:
        mine = {float(r["lr"]): float(r["score"]) for r in tune if r["scheme"] == s}
        assert meta["chosen_lr"][s] == max(mine, key=lambda lr: (mine[lr], -lr))
        cfg = yaml.safe_load((tmp_path / s / "seed-0" / "config.yaml").read_text())
        assert cfg["train"]["lr"] == meta["chosen_lr"][s]
