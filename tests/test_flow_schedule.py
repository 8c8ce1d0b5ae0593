"""make_sigmas / shift_sigmas: hand-computed values, endpoints, monotonicity, the inverse shift, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otca.flow import make_sigmas, shift_sigmas


def test_hand_computed_t4_shift3():
    # linspace(1, 0, 5) = 1, .75, .5, .25, 0 ; 3s / (1 + 2s) = 1, 2.25/2.5, 1.5/2, .75/1.5, 0
    expected = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float32)
    assert torch.equal(make_sigmas(4, shift=3.0), expected)


def test_shift_one_is_linspace():
    assert torch.equal(make_sigmas(16), torch.linspace(1.0, 0.0, 17, dtype=torch.float64).float())


@settings(max_examples=60, deadline=None)
@given(num_steps=st.integers(1, 200), shift=st.floats(0.05, 20.0))
def test_endpoints_and_strictly_decreasing(num_steps, shift):
    sigmas = make_sigmas(num_steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


@settings(max_examples=60, deadline=None)
@given(shift=st.floats(0.1, 10.0))
def test_shift_by_inverse_undoes_shift(shift):
    s = torch.linspace(0.0, 1.0, 33, dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(shift_sigmas(s, shift), 1.0 / shift), s)


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True, "4"])
def test_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        make_sigmas(num_steps)


@pytest.mark.parametrize("shift", [0.0, -1.0, math.nan, math.inf])
def test_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        make_sigmas(4, shift)
