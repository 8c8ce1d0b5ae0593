import pytest

from otca.config import ConfigError, RunConfig, dump_config, load_config


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
