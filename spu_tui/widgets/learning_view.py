"""Which layers are learning: per-unit gradient norm and update / weight ratio.

A table rather than a plot: the two quantities differ by orders of magnitude,
and a frozen unit must read as exactly zero.  The bar is log-scaled on the
update ratio (1e-7 .. 1e-2), where fine-tuning updates live.
"""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from ..run_state import RunState

LOG_LOW, LOG_HIGH = -7.0, -2.0


class LearningView(Static):
    def show(self, state: RunState) -> None:
        table = Table(box=None, expand=True, padding=(0, 1), header_style="bold")
        table.add_column("unit", no_wrap=True)
        table.add_column("‖grad‖", justify="right", no_wrap=True)
        table.add_column("upd/w", justify="right", no_wrap=True)
        table.add_column("", ratio=1, no_wrap=True)
        bar_width = max(4, self.size.width - 34)
        for u in state.units:
            s = state.unit_stats.get(u["name"])
            if s is None:
                table.add_row(u["name"], "-", "-", "")
                continue
            ratio = s.get("update_ratio", 0.0)
            table.add_row(u["name"], f"{s.get('grad_norm', 0.0):.2e}", f"{ratio:.1e}", _bar(ratio, bar_width))
        if not state.units:
            table.add_row("waiting for the engine", "", "", "")
        self.update(table)


def _bar(ratio: float, width: int) -> Text:
    if ratio <= 0:
        return Text("frozen" if ratio == 0 else "", style="bright_black")
    level = (math.log10(ratio) - LOG_LOW) / (LOG_HIGH - LOG_LOW)
    n = max(1, round(min(1.0, max(0.0, level)) * width))
    return Text("█" * n, style="green")
