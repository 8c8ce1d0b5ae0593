"""RewardSet with multi-objective rewards: columns expand in order, weights follow the columns, and a reward that
returns the wrong number of columns or a non-finite score fails naming itself (and the column)."""

from __future__ import annotations

import pytest
import torch

from otca.config import RewardSpec
from otca.rewards.base import RewardError, RewardSet
from otca.rewards.options import WeightFreeOptions
from otca.rewards.registry import build_reward_set, register_reward


class Columns(WeightFreeOptions):
    k: int = 3
    """How many columns the reward returns (a wrong value tests the shape check)."""
    nan_at: int | None = None
    """Put a NaN in this column of sample 1."""


@register_reward("test-three", Columns)
class ThreeObjectives:
    """Columns ``a, b, c`` = mean pixel times 1, 2, 3 (whatever ``k`` says it returns)."""

    name = "test-three"
    names = ("test-three/a", "test-three/b", "test-three/c")

    def __init__(self, options: Columns = Columns()):  # noqa: B008 (frozen)
        self.k, self.nan_at = options.k, options.nan_at

    def __call__(self, pixels, prompts):
        m = pixels.float().mean(dim=tuple(range(1, pixels.ndim)))  # [B]
        s = torch.stack([m * (j + 1) for j in range(self.k)], dim=1)  # [B, k]
        if self.nan_at is not None:
            s[1, self.nan_at] = float("nan")
        return s


class Single:
    name = "single"
    names = (name,)

    def __call__(self, pixels, prompts):
        return -pixels.float().mean(dim=(1, 2, 3))  # [B]


def _pixels(b: int = 4) -> torch.Tensor:
    return torch.linspace(0, 1, b).view(b, 1, 1, 1).expand(b, 1, 2, 2).contiguous()


def test_columns_expand_in_order_with_their_names():
    rs = RewardSet([Single(), ThreeObjectives()])
    assert rs.names == ["single", "test-three/a", "test-three/b", "test-three/c"] and len(rs) == 4
    x = _pixels()
    m = torch.linspace(0, 1, 4)
    out = rs(x, [""] * 4)
    assert out.shape == (4, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.stack([-m, m, 2 * m, 3 * m], dim=1))
    assert torch.equal(rs.weights, torch.ones(4))


def test_build_reward_set_expands_weights_per_column():
    rs = build_reward_set([RewardSpec(name="stroke-quality", weight=0.5), RewardSpec(name="test-three", weight=2.0)])
    assert rs.names == ["stroke-quality", "test-three/a", "test-three/b", "test-three/c"]
    assert rs.weights.dtype == torch.float32 and rs.weights.tolist() == [0.5, 2.0, 2.0, 2.0]
    rs = build_reward_set([RewardSpec(name="test-three", weight=[1.0, 0.0, 3.0])])
    assert rs.weights.tolist() == [1.0, 0.0, 3.0]


@pytest.mark.parametrize("k", [2, 4])
def test_a_wrong_number_of_columns_fails_naming_the_reward(k):
    rs = RewardSet([Single(), ThreeObjectives(Columns(k=k))])
    with pytest.raises(RewardError) as e:
        rs(_pixels(), [""] * 4)
    assert str(e.value) == (f"reward 'test-three' returned shape (4, {k}), expected (4, 3) "
                            "(columns test-three/a, test-three/b, test-three/c)")


def test_a_single_objective_reward_must_return_b_not_b_by_1():
    class Column(Single):
        def __call__(self, pixels, prompts):
            return super().__call__(pixels, prompts)[:, None]  # [B, 1]

    with pytest.raises(RewardError, match=r"reward 'single' returned shape \(4, 1\), expected \(4,\)"):
        RewardSet([Column()])(_pixels(), [""] * 4)


def test_a_non_finite_score_names_the_reward_and_the_column():
    with pytest.raises(RewardError) as e:
        RewardSet([ThreeObjectives(Columns(nan_at=2))])(_pixels(), [""] * 4)
    assert str(e.value) == ("reward 'test-three' returned 1 non-finite score(s) of 12 "
                            "(first at sample 1, column 'test-three/c')")


def test_duplicate_columns_and_bad_weights_are_errors():
    with pytest.raises(ValueError, match="duplicate reward names"):
        RewardSet([ThreeObjectives(), ThreeObjectives()])
    with pytest.raises(ValueError, match=r"weights must be 3 finite numbers"):
        RewardSet([ThreeObjectives()], torch.ones(2))
    with pytest.raises(ValueError, match=r"weights must be 3 finite numbers"):
        RewardSet([ThreeObjectives()], torch.tensor([1.0, float("inf"), 1.0]))
