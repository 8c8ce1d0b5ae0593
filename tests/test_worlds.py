"""Worlds are plugins found through the ``otca.worlds`` entry-point group: the digits world is one, and a package
of one's own adds another the same way (here a module in a temporary folder, declared by a stand-in entry point)."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

import otca.registry as registry
from otca.evaluate import PROMPT_SETS, load_prompts


def test_the_digits_world_is_declared_and_registers_what_it_provides():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=registry.WORLDS_GROUP)}
    assert eps.get("digits") == "otca.worlds.digits.register"
    from otca.evaluate import EVAL_SUITES
    from otca.models.registry import policy_kinds
    from otca.rewards.registry import reward_names

    assert "digits-flux" in policy_kinds() and "digits" in EVAL_SUITES
    assert {"digit-alignment", "stroke-quality"} <= set(reward_names())
    assert load_prompts("digits:eval")[0] == "a neat handwritten zero"


@pytest.fixture
def fake_worlds(tmp_path, monkeypatch):
    """Declare worlds ``{name: module source}`` as entry points and let the registries load them afresh."""

    def declare(sources: dict[str, str]) -> None:
        eps = []
        for name, text in sources.items():
            (tmp_path / f"otca_test_world_{name}.py").write_text(text)
            eps.append(importlib.metadata.EntryPoint(name, f"otca_test_world_{name}", registry.WORLDS_GROUP))
        monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [e for e in eps if e.group == group])
        monkeypatch.setattr(registry, "_worlds_loaded", False)

    monkeypatch.syspath_prepend(str(tmp_path))
    yield declare
    PROMPT_SETS._items.pop("toy", None)
    for m in [m for m in sys.modules if m.startswith("otca_test_world_")]:
        del sys.modules[m]


def test_a_world_of_ones_own_registers_through_the_entry_point(fake_worlds):
    fake_worlds({"toy": "from otca.evaluate import register_prompt_set\n"
                        "register_prompt_set('toy')(lambda split: [f'{split} prompt'])\n"})
    assert "toy" not in PROMPT_SETS._items  # not imported yet
    assert load_prompts("toy:train") == ["train prompt"]  # the first look-up loads the worlds
    assert registry.load_worlds() == []  # once per process


def test_a_broken_world_fails_loudly_naming_its_entry_point(fake_worlds):
    fake_worlds({"broken": "raise RuntimeError('no weights here')\n"})
    with pytest.raises(ImportError, match="world 'broken'.*no weights here"):
        PROMPT_SETS.names()
