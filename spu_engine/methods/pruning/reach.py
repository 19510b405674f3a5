"""What a pruning schedule reaches by the run's end: the what-if says it before a change is applied, and the log
warns when a schedule that ends after the run's last step leaves the final sparsity unreached."""

from __future__ import annotations

from spu_engine.methods.pruning.schedule import Ramp


def reached_by(ramp: Ramp, last: int) -> float | None:
    """The sparsity the masks hold after step ``last`` (0-based): the ramp's value at its last due step up to there;
    None when the ramp sets none by then."""
    if last < ramp.start:
        return ramp.initial if ramp.hold else None
    for step in range(last, max(ramp.start, last - ramp.every) - 1, -1):
        if ramp.due(step):
            return ramp.sparsity(step)
    return None


def reach_note(ramp: Ramp, last: int, method: str) -> str:
    """``sparsity → 50% at step 599, the run's last`` or, for a schedule that ends later, what the run ends at."""
    final, reached = ramp.final, reached_by(ramp, last)
    if ramp.end <= last and reached is not None:
        where = "the run's last" if ramp.end == last else f"the run's last is {last}"
        return f"{method}: sparsity → {final:.0%} at step {ramp.end} ({where})"
    shown = "nothing pruned" if reached is None else f"reaches {reached:.1%}"
    return (
        f"{method}: {shown} by the run's end (step {last}), not {final:.0%}: the schedule ends at step {ramp.end} "
        "(leave end_step unset to end with the run)"
    )
