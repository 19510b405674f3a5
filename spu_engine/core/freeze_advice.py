"""Which blocks have settled: AutoFreeze's criterion (Liu et al. 2021) as plain arithmetic on per-unit gradient norms.

A block has settled when the relative change of its gradient norm between two intervals,
``|g_k - g_(k-1)| / g_(k-1)``, is below a threshold, or below a percentile of the changes of
the blocks that still train (the paper's median).  Blocks freeze front to back: a frozen
prefix is what saves backward compute, so a settled block behind one that still trains waits
unless gaps are allowed.

The engine's ``auto_freeze: {method: autofreeze}`` and the console's freeze advisor both decide
with this module; it imports no torch, so the console may import it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def relative_change(before: float, now: float) -> float | None:
    """``|now - before| / before``; None when ``before`` is no positive number (a block that had no gradient)."""
    return abs(now - before) / before if before > 0 else None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated linearly between the two nearest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def settled_blocks(
    changes: Mapping[str, float | None],
    blocks: Sequence[str],
    trains: set[str],
    eligible: set[str],
    threshold: float | None = None,
    percentile_q: float = 50.0,
    allow_gaps: bool = False,
) -> tuple[list[str], float | None]:
    """The blocks to freeze now, front to back, and the bound their change had to be below (None: nothing measured).

    ``blocks`` in model order; ``trains``: the blocks with a tensor that trains (the others are frozen already and
    are passed over); ``eligible``: those automatic freezing may decide (a user's own rule takes a block out).  The
    bound is ``threshold`` or the ``percentile_q``-th percentile of the eligible training blocks' changes; a change
    must be strictly below it, so the percentile never freezes the last block it measures.
    """
    measured = [c for b in blocks if b in trains and b in eligible and (c := changes.get(b)) is not None]
    if not measured:
        return [], None
    bound = threshold if threshold is not None else percentile(measured, percentile_q)
    chosen: list[str] = []
    for b in blocks:
        if b not in trains:
            continue
        change = changes.get(b)
        if b in eligible and change is not None and change < bound:
            chosen.append(b)
        elif not allow_gaps:
            break
    return chosen, bound


def block_span(blocks: Sequence[str]) -> str:
    """``block0, block1, block2, block4`` -> ``blocks 0-2, 4``."""
    numbers = sorted(int(b[5:]) for b in blocks)
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    spans = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ("block " if len(numbers) == 1 else "blocks ") + ", ".join(spans)


# --------------------------------------------------------------------------- the console's advisor


@dataclass(frozen=True)
class UnitTrend:
    """One unit's latest statistics and their trend: the least-squares slope over the window, relative to its mean
    (per statistics interval: -0.05 is a fall of 5 % of the level each interval)."""

    unit: str
    grad_norm: float | None
    update_ratio: float | None
    grad_trend: float | None
    ratio_trend: float | None


@dataclass(frozen=True)
class Advice:
    blocks: list[str]  # to freeze, front to back
    reason: str


def relative_slope(values: Sequence[float]) -> float | None:
    """The least-squares slope of ``values`` over their index, divided by their mean; None for fewer than 3 or a zero mean."""
    n = len(values)
    if n < 3:
        return None
    mean = sum(values) / n
    if mean <= 0:
        return None
    x_mean = (n - 1) / 2
    slope = sum((i - x_mean) * (v - mean) for i, v in enumerate(values)) / sum((i - x_mean) ** 2 for i in range(n))
    return slope / mean


Snapshot = Mapping[str, tuple[float, float]]  # unit -> (gradient norm, update / weight ratio) of one statistics event


def trends(history: Sequence[Snapshot], units: Sequence[str], window: int = 8) -> list[UnitTrend]:
    """Each unit's latest numbers and their trend over the last ``window`` snapshots it trained in."""
    out = []
    for unit in units:
        seen = [s[unit] for s in history[-window:] if unit in s and s[unit][0] > 0]
        last = history[-1].get(unit) if history else None
        out.append(
            UnitTrend(
                unit,
                last[0] if last else None,
                last[1] if last else None,
                relative_slope([g for g, _ in seen]),
                relative_slope([r for _, r in seen]),
            )
        )
    return out


def advise(
    history: Sequence[Snapshot],
    blocks: Sequence[str],
    trains: set[str],
    threshold: float = 0.05,
    evals: int = 3,
    per_eval: int = 3,
) -> Advice | None:
    """The front blocks whose gradient norm has settled: the change of its mean over ``per_eval`` snapshots stayed below
    ``threshold`` for the last ``evals`` intervals.  None while there are too few snapshots or no block has settled."""
    needed = (evals + 1) * per_eval
    if len(history) < needed:
        return None
    recent = history[-needed:]
    worst: dict[str, float | None] = {}
    for b in blocks:
        if b not in trains or any(b not in s or s[b][0] <= 0 for s in recent):
            worst[b] = None  # frozen for part of the window: no settled trend to read
            continue
        means = [sum(s[b][0] for s in recent[i * per_eval : (i + 1) * per_eval]) / per_eval for i in range(evals + 1)]
        changes = [relative_change(a, c) for a, c in itertools.pairwise(means)]
        worst[b] = None if any(c is None for c in changes) else max(c for c in changes if c is not None)
    chosen, _ = settled_blocks(worst, blocks, trains, set(blocks), threshold=threshold)
    if not chosen:
        return None
    largest = max(worst[b] or 0.0 for b in chosen)
    return Advice(
        chosen,
        f"{block_span(chosen)}: grad-norm change < {threshold:.0%} over {evals} intervals of {per_eval} stats "
        f"(at most {largest:.1%})",
    )
