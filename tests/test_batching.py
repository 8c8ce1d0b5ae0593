"""update_parts: every update forward is exactly one rollout forward; hand cases, the aligned case unchanged
from the even split, and the one-line error."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otca.batching import micro_batches, update_parts


def test_hand_cases():
    # 12 samples, micro-batch 8: the rollout runs [0, 8) and [8, 12); the even split [0, 6), [6, 12) would cut both
    assert micro_batches(12, 8) == [slice(0, 8), slice(8, 12)]
    assert update_parts(12, 2, 8) == [[slice(0, 8)], [slice(8, 12)]]
    # 24 samples in 3 micro-batches over 2 steps: micro-batches [0, 1) and [1, 3) (8 + 16 samples), not 12 + 12
    assert update_parts(24, 2, 8) == [[slice(0, 8)], [slice(8, 16), slice(16, 24)]]
    assert update_parts(5, 1, 2) == [[slice(0, 2), slice(2, 4), slice(4, 5)]]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), updates=st.integers(1, 8), micro=st.integers(1, 40))
def test_parts_are_whole_rollout_micro_batches(n, updates, micro):
    rollout = micro_batches(n, micro)
    if len(rollout) < updates:
        with pytest.raises(ValueError, match="train.updates_per_iter.*train.micro_batch"):
            update_parts(n, updates, micro)
        return
    parts = update_parts(n, updates, micro)
    assert len(parts) == updates and all(parts)
    flat = [c for p in parts for c in p]
    assert flat == rollout  # every update forward is a rollout forward, in order, each once
    sizes = [sum(c.stop - c.start for c in p) for p in parts]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= micro
    if n % (updates * micro) == 0:  # aligned settings: exactly the even split, chunked by micro
        for i, p in enumerate(parts):
            lo, hi = i * n // updates, (i + 1) * n // updates
            assert p == [slice(s, min(s + micro, hi)) for s in range(lo, hi, micro)]


def test_error_names_both_fields():
    with pytest.raises(ValueError, match=r"train.updates_per_iter: 3 optimizer steps .* train.micro_batch=8 make 2"):
        update_parts(12, 3, 8)
