from pathlib import Path

import pytest
import yaml

from otca.cli import main
from otca.config import (
    ConfigError,
    RunConfig,
    SdeWindowConfig,
    default_config_yaml,
    dump_config,
    load_config,
    render_config,
)
from otca.credit.schemes import SCHEMES
from otca.flow.loss import RATIO_GUARDS
from otca.flow.sde import TRANSITIONS
from otca.flow.window import WINDOWS
from otca.models.registry import POLICIES
from otca.rewards.registry import REWARDS

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_train_the_embedded_default_with_otca():
    cfg = load_config()
    assert cfg.train.scheme == "otca"
    assert cfg.model.kind == "digits-flux"
    assert [r.name for r in cfg.rewards] == ["digit-alignment", "stroke-quality", "jpeg-compressibility"]


def test_every_field_has_a_docstring():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(RunConfig)


def test_overrides_and_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.01\n  scheme: grpo\nsampler:\n  num_steps: 8\n")
    cfg = load_config(f, ["train.lr=1e-4", "train.credit.w_min=0.25", "sampler.sde=dance-sde"])
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML reads '1e-4' as a string; the schema coerces it
    assert cfg.train.scheme == "grpo" and cfg.sampler.num_steps == 8
    assert cfg.train.credit.w_min == 0.25 and cfg.sampler.sde == "dance-sde"
    assert load_config(None, []) == RunConfig()
    # the dumped config reloads to the same config
    g = tmp_path / "d.yaml"
    g.write_text(dump_config(cfg))
    assert load_config(g) == cfg


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["train.lr=-1"], "config field 'train.lr'"),
        (["sampler.final_latent=middle"], "config field 'sampler.final_latent'"),
        (["train.lr"], "expected key=value"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_committed_digits_yaml_is_generated_from_the_docstrings():
    committed = (ROOT / "configs" / "digits.yaml").read_text()
    assert committed == default_config_yaml(), "configs/digits.yaml is stale: run `otca config > configs/digits.yaml`"


def test_rendered_yaml_documents_every_field_and_loads_back(tmp_path):
    cfg = load_config(None, ["train.scheme=grpo", "model.lora={rank: 4}", "rewards=[{name: stroke-quality, weight: 2}]",
                             "train.credit.w_min=0.25", "sampler.sde=dance-sde"])
    text = render_config(cfg)
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert load_config(f) == cfg
    comments = {line.strip()[2:] for line in text.splitlines() if line.strip().startswith("# ")}

    def walk(model_cls):
        for field in model_cls.model_fields.values():
            assert set(field.description.splitlines()) <= comments, field.description
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(RunConfig)
    # a comment sits directly above its field: the line after the docstring of train.lr is train.lr's value
    lines = text.splitlines()
    i = lines.index("  # " + RunConfig.model_fields["train"].annotation.model_fields["lr"].description)
    assert yaml.safe_load(lines[i + 1]) == {"lr": cfg.train.lr}


def test_otca_config_prints_the_defaults_or_the_resolved_config(capsys):
    assert main(["config"]) == 0
    assert capsys.readouterr().out == default_config_yaml()
    assert main(["config", "train.iterations=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["iterations"] == 7


@pytest.mark.parametrize(
    "override, field, kind, registry",
    [
        ("train.scheme=otcaa", "train.scheme", "credit scheme", SCHEMES),
        ("sampler.sde=flow_sde", "sampler.sde", "transition", TRANSITIONS),
        ("sampler.sde_window.mode=slide", "sampler.sde_window.mode", "sde window mode", WINDOWS),
        ("train.ratio_guard=guard", "train.ratio_guard", "ratio guard", RATIO_GUARDS),
        ("model.kind=flux1", "model.kind", "model kind", POLICIES),
        ("rewards=[{name: jpeg-compressibility}, {name: digit-aligment}]", "rewards.1.name", "reward", REWARDS),
    ],
)
def test_an_unknown_registry_name_is_one_line_naming_the_field_and_the_known_names(override, field, kind, registry):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    bad = yaml.safe_load(override.split("=", 1)[1])
    bad = bad[-1]["name"] if isinstance(bad, list) else bad
    known = registry.names()
    assert bad not in known and len(known) >= 2
    assert str(e.value) == f"config: config field '{field}': unknown {kind} {bad!r} (known: {', '.join(known)})"


def test_an_unknown_name_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("rewards:\n- name: digit-alignment\n- name: hpsv3\n")
    with pytest.raises(ConfigError, match=f"^{f}: config field 'rewards.1.name': unknown reward 'hpsv3'"):
        load_config(f)


def test_the_sde_window_section_is_off_by_default_and_turned_on_by_one_of_its_fields(tmp_path):
    assert load_config().sampler.sde_window is None
    assert all(f.description for f in SdeWindowConfig.model_fields.values())
    # from the generated YAML, where the section is null
    cfg = load_config(ROOT / "configs" / "digits.yaml", ["sampler.sde_window.size=3", "sampler.sde_window.mode=random"])
    w = cfg.sampler.sde_window
    assert (w.size, w.mode, w.lo, w.hi, w.shift, w.iters_per_shift) == (3, "random", 0, None, 1, 1)
    assert load_config(None, ["train.ratio_guard=ratio-norm"]).train.ratio_guard == "ratio-norm"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sampler.sde=cps", "train.drop_last_step=false"],
         "config: config field 'train.drop_last_step': false trains the last step, which sampler.sde 'cps' at eta "
         "0.7 makes deterministic (no log-density): set it to true"),
        (["sampler.sde=cps", "sampler.eta=1.5"],
         "config: config field 'sampler.eta': eta: CPS expects a noise level in [0, 1] (std = sigma_next "
         "sin(eta pi/2)), got 1.5"),
        (["sampler.num_steps=6", "sampler.sde_window.size=6"],
         "config: config field 'sampler.sde_window': sde window size: expected at most hi - lo = 5, got 6"),
        (["sampler.num_steps=6", "sampler.sde_window.hi=7"],
         "config: config field 'sampler.sde_window': sde window lo/hi: expected 0 <= lo < hi <= num_steps=6, "
         "got lo=0, hi=7"),
        (["sampler.sde=cps", "train.drop_last_step=false", "sampler.num_steps=6", "sampler.sde_window.hi=6"],
         "config: config field 'train.drop_last_step': false trains the last step, which sampler.sde 'cps' at eta "
         "0.7 makes deterministic (no log-density): set it to true"),
    ],
)
def test_sampler_settings_that_do_not_fit_together_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == message


def test_cps_trains_without_its_last_step():
    assert load_config(None, ["sampler.sde=cps"]).sampler.sde == "cps"  # drop_last_step is on by default
    # a window that ends before the last step never trains it, whatever drop_last_step says
    cfg = load_config(None, ["sampler.sde=cps", "train.drop_last_step=false", "sampler.sde_window.size=4"])
    assert cfg.sampler.sde_window.size == 4
    # the SDE transitions have a density on the last step
    assert not load_config(None, ["sampler.sde=flow-sde", "train.drop_last_step=false"]).train.drop_last_step
