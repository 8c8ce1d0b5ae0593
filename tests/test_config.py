from pathlib import Path

import pytest
import yaml

from otca.cli import main
from otca.config import ConfigError, RunConfig, default_config_yaml, dump_config, load_config, render_config
from otca.credit.schemes import SCHEMES
from otca.flow.sde import TRANSITIONS
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
