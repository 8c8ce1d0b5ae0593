"""How a rank's rollout batch is cut into forward passes, for the rollout and for the update alike.

The ratio of the first update is exactly 1 only if every update forward sees the same batch as the rollout
forward that produced its samples: a network's output for a sample can differ in the last bit with the batch it
runs in (other kernels and reduction orders at another batch size). The rollout runs its ``b`` samples in
micro-batches ``[0, m), [m, 2m), ...`` (``m = train.micro_batch``); :func:`update_parts` splits them into
``train.updates_per_iter`` optimizer steps made of whole rollout micro-batches, so both phases run the same
forwards.
"""

from __future__ import annotations


def micro_batches(n: int, size: int) -> list[slice]:
    """``[0, size), [size, 2 size), ..., [.., n)``: the rollout's forward passes over ``n`` samples."""
    if size < 1:
        raise ValueError(f"train.micro_batch: expected >= 1, got {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def update_parts(n: int, updates: int, micro_batch: int) -> list[list[slice]]:
    """``updates`` optimizer steps over ``n`` samples, each a run of consecutive whole rollout micro-batches.

    Part ``i`` holds micro-batches ``[i * M // updates, (i + 1) * M // updates)`` of the ``M`` that
    :func:`micro_batches` gives, so every update forward is exactly a rollout forward. When ``n`` is a multiple of
    ``updates * micro_batch`` this is the even split ``[i * n // updates, (i + 1) * n // updates)`` chunked by
    ``micro_batch``; otherwise the parts differ in size by up to one micro-batch (by sample count, up to
    ``micro_batch`` samples) instead of cutting a micro-batch in two.
    """
    if updates < 1:
        raise ValueError(f"train.updates_per_iter: expected >= 1, got {updates}")
    chunks = micro_batches(n, micro_batch)
    if len(chunks) < updates:
        raise ValueError(
            f"train.updates_per_iter: {updates} optimizer steps need at least {updates} micro-batches, but "
            f"{n} samples per process in train.micro_batch={micro_batch} make {len(chunks)}; lower one of them"
        )
    m = len(chunks)
    return [chunks[i * m // updates : (i + 1) * m // updates] for i in range(updates)]
