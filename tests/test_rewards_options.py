"""Reward options are typed: ``build_reward`` validates them through the reward's options class, so a misspelt,
ill-typed or inapplicable option is a one-line error naming the reward and the option, before anything loads."""

from __future__ import annotations

import pytest

from otca.config import RewardSpec
from otca.rewards.options import RewardOptionError, RewardOptions
from otca.rewards.registry import build_reward, build_reward_set, reward_names, reward_options


def _message(name: str, **options) -> str:
    with pytest.raises(RewardOptionError) as e:
        build_reward(name, **options)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name", ["clip-t", "pickscore", "laion-aesthetic", "hpsv2.1", "imagereward", "videoalign",
                                  "jpeg-compressibility", "digit-alignment", "stroke-quality"])
def test_unknown_option_is_a_one_line_error_naming_reward_and_option(name):
    assert _message(name, devcie="cuda") == f"reward '{name}': unknown option 'devcie'"


def test_every_registered_reward_has_an_options_class_with_documented_fields():
    for name in reward_names():
        schema = reward_options(name)
        assert issubclass(schema, RewardOptions)
        for field, info in schema.model_fields.items():
            assert info.description, f"reward '{name}': option '{field}' has no docstring"


@pytest.mark.parametrize(
    "name, options, expect",
    [
        ("clip-t", {"batch_size": "many"}, "reward 'clip-t': option 'batch_size': Input should be a valid integer"),
        ("clip-t", {"batch_size": 0}, "reward 'clip-t': option 'batch_size': Input should be greater than or equal"),
        ("hpsv2.1", {"vision_heads": 0}, "reward 'hpsv2.1': option 'vision_heads': Input should be greater than"),
        ("imagereward", {"tiny": "maybe"}, "reward 'imagereward': option 'tiny': Input should be a valid boolean"),
        ("videoalign", {"columns": ["VQ", "AQ"]}, "reward 'videoalign': option 'columns.1': Input should be 'VQ'"),
        ("videoalign", {"source_fps": 0}, "reward 'videoalign': option 'source_fps': Input should be greater than 0"),
        ("digit-alignment", {"assets_dir": 3}, "reward 'digit-alignment': option 'assets_dir': Input should be"),
    ],
)
def test_wrong_type_is_a_one_line_error_naming_reward_and_option(name, options, expect):
    msg = _message(name, **options)
    assert msg.startswith(expect), msg
    assert f"(got {next(iter(options.values()))!r})" in msg or "columns" in msg


@pytest.mark.parametrize(
    "name, option",
    [("jpeg-compressibility", "tiny"), ("stroke-quality", "device"), ("digit-alignment", "batch_size"),
     ("videoalign", "frames")],
)
def test_a_base_option_the_reward_cannot_use_is_an_error_not_ignored(name, option):
    value = True if option in ("tiny", "frames") else ("cuda" if option == "device" else 4)
    assert _message(name, **{option: value}) == f"reward '{name}': option '{option}' does not apply to this reward"


def test_defaults_are_the_base_ones_unless_a_reward_overrides_them():
    assert reward_options("clip-t")().batch_size == 16 and reward_options("videoalign")().batch_size == 2
    assert reward_options("clip-t")().model_dump(include={"device", "dtype", "tiny", "seed", "frames"}) == {
        "device": "cpu", "dtype": "float32", "tiny": False, "seed": 0, "frames": False}


def test_config_weight_list_must_match_the_columns():
    with pytest.raises(RewardOptionError) as e:
        build_reward_set([RewardSpec(name="videoalign", weight=[1.0, 2.0], options={"tiny": True})])
    assert str(e.value) == ("reward 'videoalign': weight has 2 values, expected 3 (one per column: videoalign/vq, "
                            "videoalign/mq, videoalign/ta) or one number")
