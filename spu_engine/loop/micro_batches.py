"""Micro-batches: how a step fits device memory without changing its arithmetic.

``memory.grad_accum`` cuts the step's examples into that many micro-batches; each one's forward and backward adds
``sum(per-sample loss) / examples`` to the gradients, so the update equals the whole batch's (padding aside, which
no loss counts), and activations are held for one micro-batch at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator


def micro_batches(indices: list[int], grad_accum: int) -> Iterator[list[int]]:
    """``indices`` in ``grad_accum`` consecutive parts of (nearly) equal size; never an empty part."""
    size = math.ceil(len(indices) / max(1, min(grad_accum, len(indices) or 1)))
    for start in range(0, len(indices), size or 1):
        yield indices[start : start + size]


def micro_batch_size(batch_size: int, grad_accum: int) -> int:
    return math.ceil(batch_size / max(1, min(grad_accum, batch_size)))
