"""The gradual sparsity schedule of Zhu & Gupta (2017).

    v_t = v_f + (v_i - v_f) * (1 - (t - t_i) / (N dt))^3      for t_i <= t <= t_i + N dt

applied every ``every`` steps: fast pruning while the network has redundant
weights, slower as it approaches the target.  A live change (new target, new
end step, new method or scope) starts a new ramp at the current step from the
sparsity the masks have now, so the curve continues without a jump.
Movement's ramps ``hold``: before ``start`` the sparsity stays at ``initial``
while the scores learn (the reference's ``initial_warmup``), instead of no masks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Ramp:
    start: int  # t_i
    end: int  # t_i + N dt
    initial: float  # v_i
    final: float  # v_f
    every: int  # dt
    kind: str = "cubic"  # or "constant": v_f from ``start`` on
    hold: bool = False  # v_i before ``start`` (else no target there)

    def sparsity(self, step: int) -> float | None:
        """Target sparsity at ``step``; before the ramp starts, ``initial`` if it holds, else None."""
        if step < self.start:
            return self.initial if self.hold else None
        return self.final + (self.initial - self.final) * (1.0 - self.progress(step))

    def progress(self, step: int) -> float:
        """How far along the cubic the ramp is: 0 until ``start``, 1 from ``end`` (soft movement also scales its L1 by it)."""
        if step < self.start:
            return 0.0
        if self.kind == "constant" or step >= self.end:
            return 1.0
        return 1.0 - (1.0 - (step - self.start) / (self.end - self.start)) ** 3

    def due(self, step: int) -> bool:
        """Is ``step`` one at which the masks follow the schedule (every ``every`` steps, and at the end)?"""
        return (step >= self.start or self.hold) and ((step - self.start) % self.every == 0 or step == self.end)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)
