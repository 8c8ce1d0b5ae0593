"""credit.adv_scale: the unit-mean-abs rescaling against hand-computed numbers, and 'none' as the identity."""

import pytest
import torch

from otca.credit import CreditConfig, CreditInputs, get_scheme, scale_advantages, unit_mean_abs_factor


def test_factor_by_hand():
    adv = torch.tensor([[2.0, -4.0, 100.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    # trained entries: 2, -4, 0, 1 -> mean |A| = 7 / 4; the masked-out 100 does not count
    assert float(unit_mean_abs_factor(adv, mask)) == pytest.approx(4 / 7)
    assert float(unit_mean_abs_factor(torch.zeros(2, 3), mask)) == 1.0  # nothing to scale
    assert float(unit_mean_abs_factor(adv, torch.zeros(2, 3, dtype=torch.bool))) == 1.0


def _output(name):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(8, 2, generator=g)
    mask = torch.rand(8, 5, generator=g) > 0.3
    mask[:, 0] = True
    inputs = CreditInputs(rewards, torch.arange(8) // 4, mask, torch.linspace(1, 0, 6),
                          gains=torch.rand(8, 5, generator=g))
    return inputs, get_scheme(name)(inputs, CreditConfig())


@pytest.mark.parametrize("name", ["grpo", "otca"])
def test_unit_mean_abs_gives_mean_one_and_keeps_the_direction(name):
    inputs, out = _output(name)
    scaled = scale_advantages(out, inputs.mask, "unit-mean-abs")
    m = inputs.mask
    trained = out.advantages[m].abs()
    s = len(trained) / float(trained.sum())  # by hand: 1 / mean |A|
    torch.testing.assert_close(scaled.advantages, out.advantages * s)
    torch.testing.assert_close(scaled.per_sample, out.per_sample * s)
    assert float(scaled.advantages[m].abs().mean()) == pytest.approx(1.0)
    assert scaled.metrics["adv_scale"] == pytest.approx(s) and scaled.metrics["adv_abs_mean"] == pytest.approx(1.0)
    torch.testing.assert_close(scaled.weights, out.weights)
    assert scale_advantages(out, m, "none") is out


def test_bad_mode_names_the_field():
    inputs, out = _output("grpo")
    with pytest.raises(ValueError, match="credit.adv_scale: expected 'none' or 'unit-mean-abs'"):
        scale_advantages(out, inputs.mask, "bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="adv_scale"):
        CreditConfig(adv_scale="bogus")
