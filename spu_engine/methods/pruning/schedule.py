"""The gradual sparsity schedule of Zhu & Gupta (2017).

    v_t = v_f + (v_i - v_f) * (1 - (t - t_i) / (N dt))^3      for t_i <= t <= t_i + N dt

applied every ``every`` steps: fast pruning while the network has redundant
weights, slower as it approaches the target.  A live change (new target, new
end step, new method or scope) starts a new ramp at the current step from the
sparsity the masks have now, so the curve continues without a jump.
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

    def sparsity(self, step: int) -> float | None:
        """Target sparsity at ``step``; None before the ramp starts."""
        if step < self.start:
            return None
        if self.kind == "constant" or step >= self.end:
            return self.final
        remaining = 1.0 - (step - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * remaining**3

    def due(self, step: int) -> bool:
        """Is ``step`` one at which the masks follow the schedule (every ``every`` steps, and at the end)?"""
        return step >= self.start and ((step - self.start) % self.every == 0 or step == self.end)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)
